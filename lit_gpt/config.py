"""Model configuration: the named Phi configs, and derivation from any Hugging Face config.json."""

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from lit_gpt.utils import NeedsStep, UserError


# config.json's model_type of the three formats Phi checkpoints have had on the Hub
PHI_MODEL_TYPES = ("phi", "phi-msft", "mixformer-sequential")


@dataclass
class Config:
    name: str = ""
    hf_config: dict = field(default_factory=dict)  # {"org": ..., "name": ...} on the Hub
    block_size: int = 2048  # context length
    vocab_size: int = 50257  # what the tokenizer uses
    padded_vocab_size: int = 51200  # rows of the embedding and the LM head
    n_layer: int = 24
    n_head: int = 32
    n_embd: int = 2048
    head_size: Optional[int] = None  # defaults to n_embd // n_head
    n_query_groups: Optional[int] = None  # defaults to n_head (full multi-head attention)
    rotary_percentage: float = 0.5  # share of each head's dims that get rotary embeddings
    rope_base: int = 10000
    intermediate_size: Optional[int] = None  # defaults to 4 * n_embd
    norm_eps: float = 1e-5
    bias: bool = True
    lm_head_bias: bool = True

    def __post_init__(self) -> None:
        if self.head_size is None:
            if self.n_embd % self.n_head:
                raise UserError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
            self.head_size = self.n_embd // self.n_head
        if self.n_query_groups is None:
            self.n_query_groups = self.n_head
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.n_embd

    @property
    def rope_n_elem(self) -> int:
        """Number of dims per head that get rotary embeddings (phi-2: 32 of 80)."""
        return int(self.rotary_percentage * self.head_size)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "Config":
        by_name = {c["name"]: c for c in configs}
        if name not in by_name:
            raise UserError(f"unknown model name {name!r}; supported: {', '.join(by_name)}")
        return cls(**{**by_name[name], **overrides})

    @classmethod
    def from_json(cls, path: Path, **overrides: Any) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise NeedsStep(f"{path} is missing; convert the checkpoint first", "convert", path.parent)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            # lit-gpt writes a few more keys (class names of the norm and MLP); they are fixed for Phi
            kwargs = {f.name: data[f.name] for f in fields(cls) if f.name in data}
            for name, value in kwargs.items():
                if not _has_field_type(name, value):
                    raise ValueError(f"{name}={value!r}")
            return cls(**{**kwargs, **overrides})
        except (ValueError, TypeError) as e:
            raise NeedsStep(f"{path} is malformed ({e}); delete it and convert the checkpoint again", "convert",
                            path.parent)

    def to_json(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def from_hf_config(cls, path: Path, **overrides: Any) -> "Config":
        """Derive a config from a Hugging Face config.json of any Phi checkpoint.

        Covers the three formats the Hub has held: transformers' "phi", the remote-code "phi-msft"
        and the original "mixformer-sequential". Fine-tunes and mirrors keep these keys, so the
        name of the repo does not matter.
        """
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({e}); download the checkpoint again")
        model_type = hf.get("model_type")
        try:
            if model_type == "phi":
                n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
                head_size = n_embd // n_head
                rope = hf.get("rope_parameters") or {}
                rotary = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
                if hf.get("qk_layernorm"):
                    raise UserError(f"{path}: qk_layernorm=true is not supported (no released Phi model uses it)")
                kw = dict(
                    n_embd=n_embd, n_head=n_head, n_layer=hf["num_hidden_layers"],
                    n_query_groups=hf.get("num_key_value_heads") or n_head,
                    intermediate_size=hf.get("intermediate_size") or 4 * n_embd,
                    block_size=hf.get("max_position_embeddings", 2048),
                    padded_vocab_size=hf["vocab_size"],
                    rotary_percentage=rotary,
                    rope_base=int(rope.get("rope_theta", hf.get("rope_theta", 10000))),
                    norm_eps=hf.get("layer_norm_eps", 1e-5),
                )
                activation = hf.get("hidden_act", "gelu_new")
            elif model_type in ("phi-msft", "mixformer-sequential"):
                n_embd, n_head = hf["n_embd"], hf["n_head"]
                head_size = n_embd // n_head
                kw = dict(
                    n_embd=n_embd, n_head=n_head, n_layer=hf["n_layer"],
                    n_query_groups=hf.get("n_head_kv") or n_head,
                    intermediate_size=hf.get("n_inner") or 4 * n_embd,
                    block_size=hf.get("n_positions", 2048),
                    padded_vocab_size=hf["vocab_size"],
                    rotary_percentage=hf.get("rotary_dim", head_size // 2) / head_size,
                    norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                )
                activation = hf.get("activation_function", "gelu_new")
            else:
                raise UserError(f"{path}: model_type {model_type!r} is not a Phi model "
                                f"(expected one of {', '.join(PHI_MODEL_TYPES)})")
        except KeyError as e:
            raise UserError(f"{path} lacks the key {e}; it is not a complete Phi config.json")
        if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise UserError(f"{path}: activation {activation!r} is not supported (Phi uses gelu_new)")
        name = hf.get("_name_or_path") or path.parent.name
        kw["vocab_size"] = min(50295, kw["padded_vocab_size"])
        return cls(**{"name": Path(name).name, **kw, **overrides})


def _has_field_type(name: str, value: Any) -> bool:
    """Whether a value read from JSON fits the field (bools are not ints here; ints are floats)."""
    default = {f.name: f for f in fields(Config)}[name].default
    if name == "hf_config":
        return isinstance(value, dict)
    if default is None:  # the Optional[int] fields
        return value is None or (isinstance(value, int) and not isinstance(value, bool))
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default)) and not isinstance(value, bool)


def _phi(name: str, **kw: Any) -> dict:
    return dict(name=name, hf_config=dict(org="microsoft", name=name), vocab_size=50295,
                padded_vocab_size=51200, block_size=2048, **kw)


configs = [
    _phi("phi-1", n_layer=24, n_head=32, n_embd=2048, rotary_percentage=0.5, intermediate_size=8192),
    _phi("phi-1_5", n_layer=24, n_head=32, n_embd=2048, rotary_percentage=0.5, intermediate_size=8192),
    _phi("phi-2", n_layer=32, n_head=32, n_embd=2560, rotary_percentage=0.4, intermediate_size=10240),
]
