"""Model configuration: the named Phi configs, derivation from any Hugging Face config.json, and lit_config.json,
written so that lit-gpt and litgpt read it as the same model (and read from theirs for Phi)."""

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from lit_gpt.utils import NeedsStep, UserError


# config.json's model_type of the three formats Phi checkpoints have had on the Hub
PHI_MODEL_TYPES = ("phi", "phi-msft", "mixformer-sequential")

# The keys of lit_config.json. lit-gpt's Config at the Phi tutorial's commit (Lightning-AI/lit-gpt 74b8df0,
# lit_gpt/config.py) is built with Config(**json), which fails on any key that is not one of its fields, and
# current litgpt does the same: each key here is a field of both. Left out: head_size (lit-gpt then derived it from
# n_embd // n_head, as Phi has it) and the norm and MLP classes (`_norm_class`, `_mlp_class` there, `norm_class_name`,
# `mlp_class_name` in litgpt; both default to Phi's LayerNorm and GptNeoxMLP).
LIT_CONFIG_KEYS = (
    "name", "hf_config", "block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd",
    "rotary_percentage", "parallel_residual", "bias", "lm_head_bias", "n_query_groups", "shared_attention_norm",
    "norm_eps", "gelu_approximate", "intermediate_size", "rope_base",
)
# Phi's block (the one lit_gpt.model implements) in lit-gpt's terms. lit-gpt's defaults are a norm per branch and the
# exact GELU, so these are always written; a lit-gpt config that says otherwise describes another model.
PHI_BLOCK = {"parallel_residual": True, "shared_attention_norm": True, "gelu_approximate": "tanh"}
# More keys lit-gpt and litgpt write, with Phi's value: another value would be another model
PHI_FIXED = {
    "_norm_class": "LayerNorm", "norm_class_name": "LayerNorm", "_mlp_class": "GptNeoxMLP",
    "mlp_class_name": "GptNeoxMLP", "rope_condense_ratio": 1, "condense_ratio": 1, "n_expert": 0,
    "scale_embeddings": False, "norm_qk": False, "post_attention_norm": False, "post_mlp_norm": False,
    "rope_interleave": False, "attn_bias": False, "norm_1": True, "norm_2": True,
}
# ... and keys of theirs that change nothing while those have Phi's values (padding_multiple: the padded vocabulary
# size is given; org: lit-gpt's old spelling of hf_config). Any other key must be off (null, false or 0).
IGNORED_KEYS = (
    "padding_multiple", "org", "n_expert_per_token", "norm_qk_type", "sliding_window_indices", "rope_indices",
    "n_expert_groups", "n_topk_groups", "n_topk_scores_per_group", "routed_scaling_factor", "norm_topk_prob",
)
_SIZES = ("block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd", "head_size", "n_query_groups",
          "intermediate_size", "rope_base")
_REQUIRED = object()


class BadConfig(UserError):
    """Config values no Phi model has: a wrong type, a size that is not positive, heads that do not divide."""


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
        _check_values(self)
        if self.head_size is None:
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
        """A lit_config.json: ours (also as older versions wrote it, with head_size), or lit-gpt's / litgpt's of a
        Phi model, whose keys for other architectures must then have Phi's values."""
        path = Path(path)
        if not path.is_file():
            raise NeedsStep(f"{path} is missing; convert the checkpoint first", "convert", path.parent)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise BadConfig("not a JSON object")
            _check_foreign_keys(data, path)
            return cls(**{**{f.name: data[f.name] for f in fields(cls) if f.name in data}, **overrides})
        except OSError as e:
            raise UserError(f"cannot read {path} ({e})")
        except (ValueError, BadConfig) as e:
            raise NeedsStep(f"{path} is malformed ({e}); delete it and convert the checkpoint again", "convert",
                            path.parent)

    def to_json(self, path: Path) -> None:
        """Write lit_config.json with LIT_CONFIG_KEYS only, so that lit-gpt and litgpt read it as the same model."""
        data = {key: PHI_BLOCK[key] if key in PHI_BLOCK else getattr(self, key) for key in LIT_CONFIG_KEYS}
        if self.head_size != self.n_embd // self.n_head:  # no Phi model has such a head; litgpt reads the key
            data["head_size"] = self.head_size
        # litgpt reads the file as YAML, and YAML 1.1 takes 1e-05 for a string: numbers get a decimal point
        text = re.sub(r'(": -?\d+)(e[-+]\d+)', r"\1.0\2", json.dumps(data, indent=2))
        Path(path).write_text(text)

    @classmethod
    def from_hf_config(cls, path: Path, **overrides: Any) -> "Config":
        """Derive a config from a Hugging Face config.json of any Phi checkpoint.

        Covers the three formats the Hub has held: transformers' "phi", the remote-code "phi-msft"
        and the original "mixformer-sequential". Fine-tunes and mirrors keep these keys, so the
        name of the repo does not matter. Every value is checked (type, range, consistency) before
        anything is computed from it.
        """
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} ({e}); download the checkpoint again")
        if not isinstance(hf, dict):
            raise UserError(f"{path} holds a JSON {type(hf).__name__}, not an object; download the checkpoint again")
        model_type = hf.get("model_type")
        if model_type == "phi":
            kw, activation = _from_phi_keys(hf, path)
        elif model_type in ("phi-msft", "mixformer-sequential"):
            kw, activation = _from_msft_keys(hf, path)
        else:
            raise UserError(f"{path}: model_type {model_type!r} is not a Phi model "
                            f"(expected one of {', '.join(PHI_MODEL_TYPES)})")
        if activation not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise UserError(f"{path}: activation {activation!r} is not supported (Phi uses gelu_new)")
        name = hf.get("_name_or_path")
        name = name if isinstance(name, str) and name else path.parent.name
        kw["vocab_size"] = min(50295, kw["padded_vocab_size"])
        try:
            return cls(**{"name": Path(name).name, **kw, **overrides})
        except BadConfig as e:
            raise UserError(f"{path} does not describe a Phi model lit-phi can build: {e}")


def _from_phi_keys(hf: dict, path: Path) -> tuple[dict, Any]:
    """Config values (checked) and the activation of transformers' "phi" config.json."""
    if hf.get("qk_layernorm"):
        raise UserError(f"{path}: qk_layernorm=true is not supported (no released Phi model uses it)")
    n_embd, n_head = _hf_number(hf, "hidden_size", path), _hf_number(hf, "num_attention_heads", path)
    _check_heads(path, n_embd, "hidden_size", n_head, "num_attention_heads")
    n_groups = _hf_number(hf, "num_key_value_heads", path, n_head)
    _check_heads(path, n_head, "num_attention_heads", n_groups, "num_key_value_heads")
    rope = hf.get("rope_parameters") or {}  # transformers 5 moved the rotary keys there
    if not isinstance(rope, dict):
        raise UserError(f"{path}: rope_parameters is {_shown(rope)}, not an object")
    rotary = _hf_number(rope, "partial_rotary_factor", path,
                        _hf_number(hf, "partial_rotary_factor", path, 0.5, integer=False), integer=False)
    if rotary > 1:
        raise UserError(f"{path}: partial_rotary_factor is {rotary}, more than 1 (the whole head)")
    theta = _hf_number(rope, "rope_theta", path, _hf_number(hf, "rope_theta", path, 10000, integer=False),
                       integer=False)
    kw = dict(
        n_embd=n_embd, n_head=n_head, n_layer=_hf_number(hf, "num_hidden_layers", path), n_query_groups=n_groups,
        intermediate_size=_hf_number(hf, "intermediate_size", path, 4 * n_embd),
        block_size=_hf_number(hf, "max_position_embeddings", path, 2048),
        padded_vocab_size=_hf_number(hf, "vocab_size", path), rotary_percentage=rotary, rope_base=int(theta),
        norm_eps=_hf_number(hf, "layer_norm_eps", path, 1e-5, integer=False),
    )
    return kw, hf.get("hidden_act", "gelu_new")


def _from_msft_keys(hf: dict, path: Path) -> tuple[dict, Any]:
    """Config values (checked) and the activation of the remote-code "phi-msft" / "mixformer-sequential" config.json."""
    n_embd, n_head = _hf_number(hf, "n_embd", path), _hf_number(hf, "n_head", path)
    _check_heads(path, n_embd, "n_embd", n_head, "n_head")
    head_size = n_embd // n_head
    n_groups = _hf_number(hf, "n_head_kv", path, n_head)
    _check_heads(path, n_head, "n_head", n_groups, "n_head_kv")
    rotary_dim = _hf_number(hf, "rotary_dim", path, head_size // 2)
    if rotary_dim > head_size:
        raise UserError(f"{path}: rotary_dim is {rotary_dim}, more than the head size {head_size} (n_embd / n_head)")
    kw = dict(
        n_embd=n_embd, n_head=n_head, n_layer=_hf_number(hf, "n_layer", path), n_query_groups=n_groups,
        intermediate_size=_hf_number(hf, "n_inner", path, 4 * n_embd),
        block_size=_hf_number(hf, "n_positions", path, 2048),
        padded_vocab_size=_hf_number(hf, "vocab_size", path),
        rotary_percentage=rotary_dim / head_size,
        norm_eps=_hf_number(hf, "layer_norm_epsilon", path, 1e-5, integer=False),
    )
    return kw, hf.get("activation_function", "gelu_new")


def _hf_number(hf: dict, key: str, path: Path, default: Any = _REQUIRED, integer: bool = True) -> Any:
    """hf[key], a positive integer (or finite number); `default` where it is absent or null (transformers writes null
    for "unset")."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise UserError(f"{path} lacks the key '{key}'; it is not a complete Phi config.json")
        return default
    is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not is_number or not math.isfinite(value) or value <= 0:
        raise UserError(f"{path}: {key} is {_shown(value)}, not a positive {'integer' if integer else 'number'}")
    return value


def _check_heads(path: Path, total: int, total_key: str, parts: int, parts_key: str) -> None:
    if total % parts:
        raise UserError(f"{path}: {total_key} {total} is not divisible by {parts_key} {parts}")


def _check_values(c: Config) -> None:
    """BadConfig unless every field has its type and a value a Phi model can have."""
    for f in fields(c):
        value = getattr(c, f.name)
        if not _has_field_type(f.name, value):
            raise BadConfig(f"{f.name}={_shown(value)} is not {_type_words(f.name)}")
    for name in _SIZES:
        value = getattr(c, name)
        if value is not None and value < 1:
            raise BadConfig(f"{name}={value} is not positive")
    if not (math.isfinite(c.norm_eps) and c.norm_eps > 0):
        raise BadConfig(f"norm_eps={c.norm_eps} is not a positive number")
    if c.vocab_size > c.padded_vocab_size:
        raise BadConfig(f"vocab_size={c.vocab_size} is more than padded_vocab_size={c.padded_vocab_size}")
    if c.head_size is None and c.n_embd % c.n_head:
        raise BadConfig(f"n_embd={c.n_embd} is not divisible by n_head={c.n_head}")
    if c.n_query_groups is not None and c.n_head % c.n_query_groups:
        raise BadConfig(f"n_head={c.n_head} is not divisible by n_query_groups={c.n_query_groups}")
    if not 0 < c.rotary_percentage <= 1:
        raise BadConfig(f"rotary_percentage={c.rotary_percentage} is not in (0, 1]")
    head_size = c.head_size or c.n_embd // c.n_head
    n_elem = int(c.rotary_percentage * head_size)
    if n_elem < 2 or n_elem % 2:  # the rotation pairs dims i and i + n_elem / 2
        raise BadConfig(f"rotary_percentage={c.rotary_percentage} of the head size {head_size} makes {n_elem} rotary "
                        "dims; it needs an even number")


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


def _type_words(name: str) -> str:
    default = {f.name: f for f in fields(Config)}[name].default
    if name == "hf_config":
        return "an object"
    if default is None or (isinstance(default, int) and not isinstance(default, bool)):
        return "an integer"
    return {bool: "true or false", float: "a number", str: "a string"}[type(default)]


def _check_foreign_keys(data: dict, path: Path) -> None:
    """Refuse a lit-gpt / litgpt config of a model other than Phi: their keys that Phi fixes must have Phi's value."""
    ours = {f.name for f in fields(Config)}
    for key, value in data.items():
        if key in ours or key in IGNORED_KEYS:
            continue
        phi = {**PHI_BLOCK, **PHI_FIXED}.get(key, _REQUIRED)
        if phi is _REQUIRED:
            if not (value is None or value is False or value in ([], {}) or (type(value) in (int, float) and value == 0)):
                raise UserError(f"{path} sets {key}={_shown(value)}, which lit-phi does not know; it does not describe "
                                "a Phi model")
        elif type(value) is not type(phi) or value != phi:
            raise UserError(f"{path} describes a model lit-phi does not implement: {key} is {_shown(value)}, and "
                            f"Phi's is {_shown(phi)}")


def _shown(value: Any) -> str:
    """A value as JSON writes it (true, "2"), as the user sees it in the file."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _phi(name: str, **kw: Any) -> dict:
    return dict(name=name, hf_config=dict(org="microsoft", name=name), vocab_size=50295,
                padded_vocab_size=51200, block_size=2048, **kw)


configs = [
    _phi("phi-1", n_layer=24, n_head=32, n_embd=2048, rotary_percentage=0.5, intermediate_size=8192),
    _phi("phi-1_5", n_layer=24, n_head=32, n_embd=2048, rotary_percentage=0.5, intermediate_size=8192),
    _phi("phi-2", n_layer=32, n_head=32, n_embd=2560, rotary_percentage=0.4, intermediate_size=10240),
]
