"""Random-weight checkpoints of a real Phi shape, in the Hub's file layout, for benchmarks without the Hub."""

import json
from pathlib import Path
from typing import Optional

import torch

from lit_gpt.convert import hf_config_dict, lit_to_qkv, name_map, save_safetensors
from lit_gpt.load import expected_shapes
from lit_gpt.config import Config
from lit_gpt.tokenizer import GPT2_BPE_DIR, write_phi_tokenizer
from lit_gpt.utils import atomic_path


def write_random_hf_checkpoint(
    out_dir: Path,
    model_name: str = "phi-2",
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 2,
    seed: int = 0,
    gpt2_dir: Optional[Path] = None,
    config: Optional[Config] = None,
) -> Path:
    """Write config.json, generation_config.json, tokenizer files and `shards` safetensors shards + index.

    Weights are N(0, 0.02) (LayerNorms at 1 and 0), so activations stay in a sane range and the
    kernels do the same work as on the real weights. Shards are written one at a time.
    `config` replaces the named config (for tests).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or Config.from_name(model_name)
    shapes = expected_shapes(config)
    generator = torch.Generator().manual_seed(seed)

    def random_tensor(name: str) -> torch.Tensor:
        shape = shapes[name]
        if ".norm_1." in name or "ln_f" in name:
            return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=dtype)
        return (torch.randn(shape, generator=generator) * 0.02).to(dtype)

    names = list(name_map(config, "phi").items())  # lit name -> its HF name(s), in file order
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part: dict[str, torch.Tensor] = {}
        for lit_name, hf_names in names[k * per_shard:(k + 1) * per_shard]:
            tensor = random_tensor(lit_name)
            parts = lit_to_qkv(tensor, config) if len(hf_names) == 3 else (tensor,)
            part.update({n: t.contiguous() for n, t in zip(hf_names, parts)})
        with atomic_path(out_dir / fname) as tmp:
            save_safetensors(part, tmp)
        weight_map.update({n: fname for n in part})
        total += sum(t.nbytes for t in part.values())
        del part
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    hf_config = hf_config_dict(config, dtype)
    hf_config["_name_or_path"] = f"microsoft/{config.name}"
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": 50256, "eos_token_id": 50256}))
    write_phi_tokenizer(out_dir, gpt2_dir or GPT2_BPE_DIR)
    return out_dir
