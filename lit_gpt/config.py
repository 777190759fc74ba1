"""Model configuration: the named Phi configs, derivation from any Hugging Face config.json, and lit_config.json,
written so that lit-gpt and litgpt read it as the same model (and read from theirs for Phi).

Two blocks, chosen by `parallel_residual` (lit-gpt's name): Phi-1/1.5/2's parallel attention and MLP over one
LayerNorm with a GELU MLP (transformers' PhiForCausalLM), and the later family's (Phi-3, Phi-3.5, Phi-4-mini,
phi-4: transformers' Phi3ForCausalLM) sequential residual over two RMSNorms with a SwiGLU MLP, no biases, and
optionally grouped-query attention, tied embeddings, a sliding window and longrope.
"""

import json
import math
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from lit_gpt.utils import NeedsStep, UserError


# config.json's model_type of the three formats Phi-1/1.5/2 checkpoints have had on the Hub, and of the later family
PHI_MODEL_TYPES = ("phi", "phi-msft", "mixformer-sequential", "phi3")

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
# Phi-1/1.5/2's block in lit-gpt's terms. lit-gpt's defaults are a norm per branch and the exact GELU, so these are
# always written; a lit-gpt config that says otherwise describes another model.
PHI_BLOCK = {"parallel_residual": True, "shared_attention_norm": True, "gelu_approximate": "tanh"}
# The two blocks lit_gpt.model implements, by parallel_residual, in lit-gpt's (_norm_class, _mlp_class) and litgpt's
# (norm_class_name, mlp_class_name) terms: a config whose keys mix them describes another model. The sequential
# block's MLP is SwiGLU (LLaMAMLP) and uses no GELU, so gelu_approximate means nothing there.
BLOCK_KEYS = {
    True: {**PHI_BLOCK, "_norm_class": "LayerNorm", "norm_class_name": "LayerNorm", "_mlp_class": "GptNeoxMLP",
           "mlp_class_name": "GptNeoxMLP"},
    False: {"parallel_residual": False, "shared_attention_norm": False, "_norm_class": "RMSNorm",
            "norm_class_name": "RMSNorm", "_mlp_class": "LLaMAMLP", "mlp_class_name": "LLaMAMLP"},
}
# What lit_config.json holds for the sequential block besides LIT_CONFIG_KEYS: litgpt's names of its norm and MLP,
# and ours for what lit-gpt cannot express (so lit-gpt and litgpt do not read these files; neither builds longrope)
SEQUENTIAL_KEYS = ("norm_class_name", "mlp_class_name", "tie_embeddings", "sliding_window", "rope_short_factor",
                   "rope_long_factor", "rope_original_max_seq_len", "rope_attention_factor")
# More keys lit-gpt and litgpt write, with Phi's value: another value would be another model
PHI_FIXED = {
    "rope_condense_ratio": 1, "condense_ratio": 1, "n_expert": 0,
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
          "intermediate_size", "rope_base", "sliding_window", "rope_original_max_seq_len")
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
    # True: Phi-1/1.5/2's block (LayerNorm, GELU MLP, attention and MLP in parallel); False: the later family's
    # (two RMSNorms, SwiGLU MLP with gate and up fused, sequential residual)
    parallel_residual: bool = True
    tie_embeddings: bool = False  # the LM head's weight is the embedding's (Phi-4-mini)
    sliding_window: Optional[int] = None  # each query sees itself and the sliding_window - 1 positions before it
    # longrope ("su"): each rotary frequency divided by its factor, the short ones while the sequence is at most
    # rope_original_max_seq_len long, the long ones beyond; cos and sin scaled by rope_attention_factor (None:
    # derived from block_size / rope_original_max_seq_len, as the checkpoints ship it)
    rope_short_factor: Optional[list] = None
    rope_long_factor: Optional[list] = None
    rope_original_max_seq_len: Optional[int] = None
    rope_attention_factor: Optional[float] = None

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

    @property
    def norm_class_name(self) -> str:
        """The block's norm, in litgpt's words."""
        return BLOCK_KEYS[self.parallel_residual]["norm_class_name"]

    @property
    def mlp_class_name(self) -> str:
        """The block's MLP, in litgpt's words: GptNeoxMLP (fc, GELU, proj) or LLaMAMLP (SwiGLU)."""
        return BLOCK_KEYS[self.parallel_residual]["mlp_class_name"]

    @property
    def longrope(self) -> bool:
        return self.rope_long_factor is not None

    @property
    def longrope_scale(self) -> float:
        """What longrope multiplies cos and sin by, for both factor sets: the attention factor, by default
        sqrt(1 + ln(s) / ln(original)) with s = block_size / original (1 where s <= 1), as transformers' longrope
        computes it for Phi-3 (modeling_rope_utils._compute_longrope_parameters)."""
        if self.rope_attention_factor is not None:
            return float(self.rope_attention_factor)
        return _attention_factor(self.block_size / self.rope_original_max_seq_len, self.rope_original_max_seq_len)

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
        """Write lit_config.json: for Phi-1/1.5/2's block LIT_CONFIG_KEYS only, so that lit-gpt and litgpt read it
        as the same model; for the sequential block those (with its block values) and SEQUENTIAL_KEYS."""
        block = BLOCK_KEYS[self.parallel_residual]
        keys = LIT_CONFIG_KEYS if self.parallel_residual else (
            tuple(k for k in LIT_CONFIG_KEYS if k != "gelu_approximate") + SEQUENTIAL_KEYS)
        data = {key: block[key] if key in block else getattr(self, key) for key in keys}
        if self.head_size != self.n_embd // self.n_head:  # no Phi model has such a head; litgpt reads the key
            data["head_size"] = self.head_size
        # litgpt reads the file as YAML, and YAML 1.1 takes 1e-05 for a string: numbers get a decimal point
        text = re.sub(r'(": -?\d+)(e[-+]\d+)', r"\1.0\2", json.dumps(data, indent=2))
        Path(path).write_text(text)

    @classmethod
    def from_hf_config(cls, path: Path, **overrides: Any) -> "Config":
        """Derive a config from a Hugging Face config.json of any Phi checkpoint.

        Covers the three formats the Hub has held for Phi-1/1.5/2: transformers' "phi", the remote-code
        "phi-msft" and the original "mixformer-sequential", and "phi3" of the later family (Phi-3, Phi-3.5,
        Phi-4-mini, phi-4). Fine-tunes and mirrors keep these keys, so the name of the repo does not matter.
        Every value is checked (type, range, consistency) before anything is computed from it.
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
        elif model_type == "phi3":
            kw, activation = _from_phi3_keys(hf, path)
        else:
            raise UserError(f"{path}: model_type {model_type!r} is not a Phi model "
                            f"(expected one of {', '.join(PHI_MODEL_TYPES)})")
        wanted = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast") if model_type != "phi3" else ("silu",)
        if activation not in wanted:
            raise UserError(f"{path}: activation {activation!r} is not supported ({model_type} uses {wanted[0]})")
        name = hf.get("_name_or_path")
        name = name if isinstance(name, str) and name else path.parent.name
        # what the tokenizer uses: phi-1/1.5/2's is known; the later ones' embeddings are their vocabulary's size
        kw.setdefault("vocab_size", min(50295, kw["padded_vocab_size"]))
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
    rotary, theta = _rotary_keys(hf, rope, path, default_rotary=0.5)
    kw = dict(
        n_embd=n_embd, n_head=n_head, n_layer=_hf_number(hf, "num_hidden_layers", path), n_query_groups=n_groups,
        intermediate_size=_hf_number(hf, "intermediate_size", path, 4 * n_embd),
        block_size=_hf_number(hf, "max_position_embeddings", path, 2048),
        padded_vocab_size=_hf_number(hf, "vocab_size", path), rotary_percentage=rotary, rope_base=int(theta),
        norm_eps=_hf_number(hf, "layer_norm_eps", path, 1e-5, integer=False),
    )
    return kw, hf.get("hidden_act", "gelu_new")


def _from_phi3_keys(hf: dict, path: Path) -> tuple[dict, Any]:
    """Config values (checked) and the activation of transformers' "phi3" config.json, read as Phi3Config reads it
    (transformers 5.24, configuration_phi3.py): the rotary keys from rope_parameters (transformers 5) or the older
    top-level rope_theta / partial_rotary_factor / rope_scaling, its defaults where a key is absent."""
    n_embd, n_head = _hf_number(hf, "hidden_size", path), _hf_number(hf, "num_attention_heads", path)
    head_size = _hf_number(hf, "head_dim", path, None)  # Phi3Attention takes a head_dim where the config has one
    if head_size is None:
        _check_heads(path, n_embd, "hidden_size", n_head, "num_attention_heads")
    n_groups = _hf_number(hf, "num_key_value_heads", path, n_head)
    _check_heads(path, n_head, "num_attention_heads", n_groups, "num_key_value_heads")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rotary, theta = _rotary_keys(hf, rope, path, default_rotary=1.0)
    block_size = _hf_number(hf, "max_position_embeddings", path, 4096)
    window = _hf_number(hf, "sliding_window", path, None)
    kw = dict(
        parallel_residual=False, bias=False, lm_head_bias=False, n_embd=n_embd, n_head=n_head, head_size=head_size,
        n_layer=_hf_number(hf, "num_hidden_layers", path), n_query_groups=n_groups,
        intermediate_size=_hf_number(hf, "intermediate_size", path), block_size=block_size,
        padded_vocab_size=_hf_number(hf, "vocab_size", path), rotary_percentage=rotary, rope_base=int(theta),
        norm_eps=_hf_number(hf, "rms_norm_eps", path, 1e-5, integer=False),
        tie_embeddings=_hf_bool(hf, "tie_word_embeddings", path),
        # a window as long as the context changes nothing (the 128k models ship 262144)
        sliding_window=window if window is not None and window < block_size else None,
        **_longrope_keys(rope, hf, path),
    )
    kw["vocab_size"] = kw["padded_vocab_size"]
    return kw, hf.get("hidden_act", "silu")


def _rotary_keys(hf: dict, rope: Any, path: Path, default_rotary: float) -> tuple[float, float]:
    """partial_rotary_factor and rope_theta (checked), from the rope parameters object (transformers 5) or else the
    top level of config.json."""
    if not isinstance(rope, dict):
        raise UserError(f"{path}: rope_parameters is {_shown(rope)}, not an object")
    rotary = _hf_number(rope, "partial_rotary_factor", path,
                        _hf_number(hf, "partial_rotary_factor", path, default_rotary, integer=False), integer=False)
    if rotary > 1:
        raise UserError(f"{path}: partial_rotary_factor is {rotary}, more than 1 (the whole head)")
    theta = _hf_number(rope, "rope_theta", path, _hf_number(hf, "rope_theta", path, 10000, integer=False),
                       integer=False)
    return rotary, theta


def _longrope_keys(rope: dict, hf: dict, path: Path) -> dict:
    """The longrope fields of a phi3 config.json's rope parameters ({} without longrope). As in Phi3Config, "su"
    (and "yarn") are the older names of longrope, and the top-level original_max_position_embeddings (default 4096)
    is the one that counts; the attention factor is `attention_factor`, else derived from `factor` where given."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in (None, "default"):
        return {}
    if kind not in ("longrope", "su", "yarn"):
        raise UserError(f"{path}: rope type {_shown(kind)} is not supported (Phi-3 uses longrope)")
    factors = {}
    for key in ("short_factor", "long_factor"):
        value = rope.get(key)
        if not (isinstance(value, list) and value and all(_positive_number(v) for v in value)):
            raise UserError(f"{path}: the longrope {key} is {_shown(value)}, not a list of positive numbers")
        factors[key] = [float(v) for v in value]
    original = _hf_number(hf, "original_max_position_embeddings", path, 4096)
    attention = _hf_number(rope, "attention_factor", path, None, integer=False)
    factor = _hf_number(rope, "factor", path, None, integer=False)
    if attention is None and factor is not None:
        attention = _attention_factor(factor, original)
    return dict(rope_short_factor=factors["short_factor"], rope_long_factor=factors["long_factor"],
                rope_original_max_seq_len=original, rope_attention_factor=attention)


def _attention_factor(factor: float, original: int) -> float:
    """longrope's default scale of cos and sin for a context `factor` times the original one (1 for factor <= 1)."""
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _hf_bool(hf: dict, key: str, path: Path) -> bool:
    value = hf.get(key)
    if value is None:  # absent or null: Phi3Config's default
        return False
    if not isinstance(value, bool):
        raise UserError(f"{path}: {key} is {_shown(value)}, not true or false")
    return value


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
    _check_block(c, n_elem)


def _check_block(c: Config, n_elem: int) -> None:
    """What only the sequential block has (transformers' PhiForCausalLM has none of it, Phi3ForCausalLM no biases),
    and longrope's fields: all or none, one factor per rotary frequency."""
    if c.parallel_residual and (c.sliding_window is not None or c.rope_long_factor is not None):
        raise BadConfig("a sliding window and longrope need the sequential block (parallel_residual=false)")
    if not c.parallel_residual and (c.bias or c.lm_head_bias):
        raise BadConfig("the sequential block (parallel_residual=false) has no biases: bias and lm_head_bias must be "
                        "false")
    longrope = (c.rope_short_factor, c.rope_long_factor, c.rope_original_max_seq_len)
    if any(v is None for v in longrope) and any(v is not None for v in longrope + (c.rope_attention_factor,)):
        raise BadConfig("longrope needs rope_short_factor, rope_long_factor and rope_original_max_seq_len together")
    for name in ("rope_short_factor", "rope_long_factor"):
        factors = getattr(c, name)
        if factors is not None and len(factors) != n_elem // 2:
            raise BadConfig(f"{name} holds {len(factors)} factors; the {n_elem} rotary dims need {n_elem // 2}")
        if factors is not None and not all(_positive_number(v) for v in factors):
            raise BadConfig(f"{name}={_shown(factors)} holds a factor that is not a positive number")
    if c.rope_attention_factor is not None and not _positive_number(c.rope_attention_factor):
        raise BadConfig(f"rope_attention_factor={_shown(c.rope_attention_factor)} is not a positive number")


_FIELDS = {f.name: f for f in fields(Config)}


def _kinds(name: str) -> tuple:
    """The types a field takes: (int, NoneType) for Optional[int], (bool,) for a bool..."""
    annotation = _FIELDS[name].type
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Union else (annotation,)


def _has_field_type(name: str, value: Any) -> bool:
    """Whether a value read from JSON fits the field (bools are not ints here; ints are floats; a list holds
    numbers)."""
    for kind in _kinds(name):
        if kind is type(None) and value is None:
            return True
        if kind is bool and isinstance(value, bool):
            return True
        if isinstance(value, bool) or kind is type(None) or kind is bool:
            continue
        if kind is float and isinstance(value, (int, float)):
            return True
        if kind is list and isinstance(value, list):
            return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        if kind in (int, str, dict) and isinstance(value, kind):
            return True
    return False


def _type_words(name: str) -> str:
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
             list: "a list of numbers"}
    return " or ".join(words[k] for k in _kinds(name) if k is not type(None))


def _check_foreign_keys(data: dict, path: Path) -> None:
    """Refuse a lit-gpt / litgpt config of a model other than Phi: their keys that Phi fixes must have the value of
    the block the file describes (by parallel_residual, Phi-1/1.5/2's when absent)."""
    ours = {f.name for f in fields(Config)}
    parallel = data.get("parallel_residual", True)
    block = BLOCK_KEYS.get(parallel, BLOCK_KEYS[True]) if isinstance(parallel, bool) else BLOCK_KEYS[True]
    for key, value in data.items():
        if key in ours or key in IGNORED_KEYS or (key == "gelu_approximate" and parallel is False):
            continue
        phi = {**block, **PHI_FIXED}.get(key, _REQUIRED)
        if phi is _REQUIRED:
            if not (value is None or value is False or value in ([], {}) or (type(value) in (int, float) and value == 0)):
                raise UserError(f"{path} sets {key}={_shown(value)}, which lit-phi does not know; it does not describe "
                                "a Phi model")
        elif type(value) is not type(phi) or value != phi:
            which = "Phi's" if key in PHI_FIXED else f"in Phi's block with parallel_residual={_shown(parallel)} it"
            raise UserError(f"{path} describes a model lit-phi does not implement: {key} is {_shown(value)}, and "
                            f"{which} is {_shown(phi)}")


def _shown(value: Any) -> str:
    """A value as JSON writes it (true, "2"), as the user sees it in the file."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _phi(name: str, **kw: Any) -> dict:
    return dict(name=name, hf_config=dict(org="microsoft", name=name), vocab_size=50295,
                padded_vocab_size=51200, block_size=2048, **kw)


def _phi3(name: str, vocab: int, **kw: Any) -> dict:
    """The later family: the sequential block, no biases, the whole head rotated unless said otherwise."""
    return dict(dict(name=name, hf_config=dict(org="microsoft", name=name), vocab_size=vocab, padded_vocab_size=vocab,
                     parallel_residual=False, bias=False, lm_head_bias=False, rotary_percentage=1.0), **kw)


# longrope factors from the models' config.json (rope_scaling): Phi-3-mini-128k-instruct's as updated in July 2024
PHI3_MINI_128K_ROPE = dict(rope_original_max_seq_len=4096, rope_short_factor=[
    1.1, 1.1, 1.1, 1.3000000000000003, 1.3500000000000003, 1.3500000000000003, 1.4000000000000004,
    1.5500000000000005, *[2.000000000000001] * 17, *[2.0500000000000007] * 6, 2.1000000000000005, 2.1000000000000005,
    2.1500000000000004, *[2.25] * 5, 2.3999999999999995, 2.4499999999999993, 2.499999999999999, 2.6999999999999984,
    2.6999999999999984, 2.7499999999999982, 2.799999999999998, 2.8999999999999977, 3.049999999999997,
], rope_long_factor=[
    1.0700000524520874, 1.1200000047683716, 1.149999976158142, 1.4199999570846558, 1.5699999332427979,
    1.7999999523162842, 2.129999876022339, 2.129999876022339, 3.009999990463257, 5.910000324249268, 6.950000286102295,
    9.070000648498535, 9.930000305175781, 10.710000038146973, 11.130000114440918, 14.609999656677246,
    15.409998893737793, 19.809999465942383, 37.279998779296875, 38.279998779296875, 38.599998474121094,
    40.12000274658203, 46.20000457763672, 50.940006256103516, 53.66000747680664, 54.9373893737793, 56.89738845825195,
    57.28738784790039, 59.98738479614258, 60.86738586425781, 60.887386322021484, 61.71739196777344, 62.91739273071289,
    62.957393646240234, 63.41739273071289, 63.8173942565918, 63.83739471435547, 63.897396087646484, 63.93739700317383,
    64.06739807128906, 64.11434936523438, 64.12435150146484, 64.15435028076172, 64.19435119628906, 64.24435424804688,
    64.57435607910156, 64.69000244140625, 64.76000213623047,
])
PHI35_MINI_ROPE = dict(rope_original_max_seq_len=4096, rope_short_factor=[
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, *[1.0499999523162842] * 5, 1.0699999332427979,
    1.0999999046325684, 1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662,
    1.2899998426437378, 1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083,
    1.8499997854232788, 1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
    *[2.0199997425079346] * 6, *[2.0299997329711914] * 9, 2.0799996852874756, 2.0899996757507324, 2.189999580383301,
    2.2199995517730713, 2.5899994373321533, 2.729999542236328, 2.749999523162842, 2.8399994373321533,
], rope_long_factor=[
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
    1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
    4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137, 17.670000076293945,
    24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523, 32.590003967285156,
    32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156, 50.45000457763672,
    57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457, 62.61000442504883, 62.62000274658203,
    62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094, 63.93000411987305, 63.96000289916992,
    63.970001220703125, 64.02999877929688, 64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938,
    64.4800033569336, 64.51000213623047, 64.52999877929688, 64.83999633789062,
])
PHI4_MINI_ROPE = dict(rope_original_max_seq_len=4096, rope_short_factor=[1.0] * 48, rope_long_factor=[
    1.0, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649, 2.446418898,
    2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845, 5.351743533, 5.984965424,
    6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
    16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6,
    32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
])
_PHI3_MINI = dict(n_layer=32, n_head=32, n_embd=3072, intermediate_size=8192)
_PHI3_MEDIUM = dict(n_layer=40, n_head=40, n_query_groups=10, n_embd=5120, intermediate_size=17920)

configs = [
    _phi("phi-1", n_layer=24, n_head=32, n_embd=2048, rotary_percentage=0.5, intermediate_size=8192),
    _phi("phi-1_5", n_layer=24, n_head=32, n_embd=2048, rotary_percentage=0.5, intermediate_size=8192),
    _phi("phi-2", n_layer=32, n_head=32, n_embd=2560, rotary_percentage=0.4, intermediate_size=10240),
    _phi3("Phi-3-mini-4k-instruct", 32064, block_size=4096, sliding_window=2047, **_PHI3_MINI),
    _phi3("Phi-3-mini-128k-instruct", 32064, block_size=131072, **_PHI3_MINI, **PHI3_MINI_128K_ROPE),
    _phi3("Phi-3.5-mini-instruct", 32064, block_size=131072, **_PHI3_MINI, **PHI35_MINI_ROPE),
    _phi3("Phi-3-medium-4k-instruct", 32064, block_size=4096, sliding_window=2047, **_PHI3_MEDIUM),
    _phi3("Phi-4-mini-instruct", 200064, block_size=131072, n_layer=32, n_head=24, n_query_groups=8, n_embd=3072,
          intermediate_size=8192, rotary_percentage=0.75, tie_embeddings=True, **PHI4_MINI_ROPE),
    _phi3("phi-4", 100352, block_size=16384, rope_base=250000, **_PHI3_MEDIUM),
]
