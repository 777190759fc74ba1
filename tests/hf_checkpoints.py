"""Random-weight Phi checkpoints in the Hugging Face file layout, built with transformers itself (PhiForCausalLM,
and Phi3ForCausalLM for the later family).

The renames to the two older schemes are written here by hand from the published module names,
independently of lit_gpt's table, so a mistake in that table cannot hide itself in the tests.
"""

import json
import re
from pathlib import Path
from typing import Optional, Sequence

import torch



def tiny_hf_config(n_embd: int = 64, n_head: int = 4, n_layer: int = 2, rotary: float = 0.5,
                   vocab_size: int = 51200, block_size: int = 128, intermediate_size: Optional[int] = None,
                   n_kv_heads: Optional[int] = None):
    from transformers import PhiConfig

    return PhiConfig(
        vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=intermediate_size or 4 * n_embd,
        num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_heads or n_head,
        max_position_embeddings=block_size, partial_rotary_factor=rotary, bos_token_id=50256, eos_token_id=50256,
        tie_word_embeddings=False,
    )


def tiny_phi3_config(n_embd: int = 64, n_head: int = 4, n_kv_heads: Optional[int] = None, n_layer: int = 2,
                     rotary: float = 1.0, vocab_size: int = 256, block_size: int = 64, intermediate_size: int = 96,
                     tied: bool = False, sliding_window: Optional[int] = None, longrope: Optional[int] = None,
                     rope_theta: float = 10000.0):
    """A Phi3Config; longrope=N: longrope with original_max_position_embeddings N and factors unlike each other,
    so that every one of them and the switch between the sets show in the logits."""
    from transformers import Phi3Config

    half = int(n_embd // n_head * rotary) // 2
    rope = None
    if longrope is not None:
        rope = {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(half)],
                "long_factor": [1.0 + 0.7 * i for i in range(half)]}
    return Phi3Config(
        vocab_size=vocab_size, hidden_size=n_embd, intermediate_size=intermediate_size, num_hidden_layers=n_layer,
        num_attention_heads=n_head, num_key_value_heads=n_kv_heads or n_head, max_position_embeddings=block_size,
        original_max_position_embeddings=longrope or block_size, partial_rotary_factor=rotary, rope_theta=rope_theta,
        rope_scaling=rope, sliding_window=sliding_window, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
        pad_token_id=2,
    )


def hub_phi3_config_json(config) -> dict:
    """A Phi3Config as the Hub's config.json files have it (transformers 4.x keys): rope_theta,
    partial_rotary_factor and rope_scaling ("type": "longrope") at the top level, no rope_parameters."""
    rope = dict(config.rope_parameters)
    data = {k: v for k, v in config.to_dict().items() if k != "rope_parameters"}
    data.update(rope_theta=rope["rope_theta"], partial_rotary_factor=rope.get("partial_rotary_factor", 1.0),
                rope_scaling=None if rope["rope_type"] == "default" else
                {"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]})
    return data


def edit_config_json(d: Path, **changes) -> None:
    """Change keys of the config.json in `d` (a value of None removes the key)."""
    path = Path(d) / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}, indent=2))


def random_hf_model(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A PhiForCausalLM (Phi3ForCausalLM for a Phi3Config) whose every parameter (norms and biases too) is random,
    so all of them matter."""
    from transformers import Phi3ForCausalLM, PhiForCausalLM

    torch.manual_seed(seed)
    model = (Phi3ForCausalLM if config.model_type == "phi3" else PhiForCausalLM)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("layernorm" in name or name == "model.norm.weight") and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.02 if name.endswith("weight") and p.dim() == 2 else 0.1)
    return model.to(dtype)


def _to_msft(name: str, n_layer: int) -> str:
    name = name.replace("model.embed_tokens.", "transformer.embd.wte.")
    name = name.replace("model.final_layernorm.", "lm_head.ln.")
    name = re.sub(r"^lm_head\.(weight|bias)$", r"lm_head.linear.\1", name)
    name = name.replace("model.layers.", "transformer.h.")
    name = name.replace(".input_layernorm.", ".ln.").replace(".self_attn.dense.", ".mixer.out_proj.")
    return name


def _to_mixformer(name: str, n_layer: int) -> str:
    name = _to_msft(name, n_layer)
    name = name.replace("transformer.embd.wte.", "layers.0.wte.")
    name = re.sub(r"^transformer\.h\.(\d+)\.", lambda m: f"layers.{int(m.group(1)) + 1}.", name)
    name = re.sub(r"^lm_head\.", f"layers.{n_layer + 1}.", name)
    return name


def hf_state_dict(model, scheme: str) -> dict[str, torch.Tensor]:
    """The model's weights named as in `scheme` ("phi" is transformers' own names, "phi3" too); the old schemes hold
    q, k, v in one Wqkv. Tied embeddings are saved once, as save_pretrained saves them."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del sd["lm_head.weight"]
    if scheme in ("phi", "phi3"):
        return sd
    n_layer = model.config.num_hidden_layers
    out = {}
    for name in list(sd):
        m = re.match(r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", name)
        if m:
            i, wb = m.groups()
            prefix = f"model.layers.{i}.self_attn."
            out[f"transformer.h.{i}.mixer.Wqkv.{wb}"] = torch.cat(
                [sd[f"{prefix}{p}_proj.{wb}"] for p in "qkv"], dim=0)
        elif re.search(r"self_attn\.[kv]_proj", name):
            continue
        else:
            out[_to_msft(name, n_layer)] = sd[name]
    if scheme == "phi-msft":
        return out
    assert scheme == "mixformer-sequential"
    return {_to_mixformer(k, n_layer): v for k, v in out.items()}


def hf_config_json(config, scheme: str) -> dict:
    if scheme in ("phi", "phi3"):
        return config.to_dict()
    old = dict(
        n_embd=config.hidden_size, n_head=config.num_attention_heads, n_layer=config.num_hidden_layers,
        n_inner=None if config.intermediate_size == 4 * config.hidden_size else config.intermediate_size,
        n_positions=config.max_position_embeddings, vocab_size=config.vocab_size,
        rotary_dim=int(config.rope_parameters["partial_rotary_factor"] * config.hidden_size // config.num_attention_heads),
        layer_norm_epsilon=config.layer_norm_eps, activation_function="gelu_new", tie_word_embeddings=False,
        torch_dtype="float32",
    )
    if scheme == "phi-msft":
        return dict(old, model_type="phi-msft", architectures=["PhiForCausalLM"], n_head_kv=None,
                    auto_map={"AutoModelForCausalLM": "modeling_phi.PhiForCausalLM"})
    return dict(old, model_type="mixformer-sequential", architectures=["MixFormerSequentialForCausalLM"],
                architecture={"block_cls": "parallel", "mixer": {}, "mlp": {"mlp_cls": "mlp"}})


def save_weights(state_dict: dict[str, torch.Tensor], out_dir: Path, fmt: str, shards: int) -> None:
    """Write weights as the Hub does: one file, or numbered shards plus an index."""
    from safetensors.torch import save_file

    names = list(state_dict)
    ext, stem = (".safetensors", "model") if fmt == "safetensors" else (".bin", "pytorch_model")
    if shards == 1:
        files = {f"{stem}{ext}": names}
    else:
        per = -(-len(names) // shards)
        files = {f"{stem}-{k + 1:05d}-of-{shards:05d}{ext}": names[k * per:(k + 1) * per] for k in range(shards)}
    for fname, keys in files.items():
        part = {k: state_dict[k] for k in keys}
        if fmt == "safetensors":
            save_file(part, str(out_dir / fname), metadata={"format": "pt"})
        else:
            torch.save(part, out_dir / fname)
    if shards > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in state_dict.values())},
                 "weight_map": {k: f for f, keys in files.items() for k in keys}}
        (out_dir / f"{stem}{ext}.index.json").write_text(json.dumps(index, indent=2))


def make_hf_checkpoint(
    out_dir: Path,
    config=None,
    scheme: str = "phi",
    formats: Sequence[str] = ("safetensors",),
    shards: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
):
    """Write a random Phi checkpoint (config.json, weights, tokenizer files) and return the HF model."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or tiny_hf_config()
    model = random_hf_model(config, seed=seed, dtype=dtype)
    sd = hf_state_dict(model, scheme)
    for fmt in formats:
        save_weights(sd, out_dir, fmt, shards)
    (out_dir / "config.json").write_text(json.dumps(hf_config_json(config, scheme), indent=2, default=str))
    special = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    (out_dir / "generation_config.json").write_text(json.dumps(special))
    if tokenizer:
        from lit_gpt.tokenizer import write_phi_tokenizer

        write_phi_tokenizer(out_dir)
    return model


def lively_checkpoint(d: Path, block_size: int):
    """A random checkpoint whose next token depends on the context.

    With make_hf_checkpoint's weights as they are, the LM head's bias dominates and greedy decoding
    repeats one token forever, which would make greedy comparisons and stop tests say little. Larger
    matrices (x3) and LM head (x5 more) give varied text. Returns the transformers model.
    """
    hf = make_hf_checkpoint(d, tiny_hf_config(block_size=block_size))
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(3)
        hf.lm_head.weight.mul_(5)
    save_weights(hf_state_dict(hf, "phi"), d, "safetensors", 1)
    from lit_gpt.convert import convert_hf_checkpoint

    convert_hf_checkpoint(d, show_progress=False)
    return hf
