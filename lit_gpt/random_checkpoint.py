"""Random-weight checkpoints of a real Phi shape, in the Hub's file layout or directly in ours, for benchmarks
without the Hub."""

import json
from pathlib import Path
from typing import Callable, Optional

import torch

from lit_gpt.convert import hf_config_dict, hf_scheme, hf_tensors, name_map, save_safetensors
from lit_gpt.files import LIT_CONFIG, LIT_MODEL
from lit_gpt.load import expected_shapes
from lit_gpt.config import Config
from lit_gpt.tensor_writer import IncrementalTensorWriter
from lit_gpt.tokenizer import EOT, GPT2_BPE_DIR, write_phi_tokenizer
from lit_gpt.utils import atomic_path

PHI_TOKENIZER_SIZE = 50295  # Phi-1/1.5/2's tokenizer: GPT-2's 50257 tokens and 38 runs of spaces and tabs
PHI_EOS = 50256  # its <|endoftext|>


def _random_tensors(config: Config, dtype: torch.dtype, seed: int) -> Callable[[str], torch.Tensor]:
    """Our tensor of a name: N(0, 0.02) (norms at 1 and 0), so activations stay in a sane range and the kernels do
    the same work as on the real weights."""
    shapes = expected_shapes(config)
    generator = torch.Generator().manual_seed(seed)

    def random_tensor(name: str) -> torch.Tensor:
        shape = shapes[name]
        if ".norm_" in name or "ln_f" in name:
            return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=dtype)
        return (torch.randn(shape, generator=generator) * 0.02).to(dtype)

    return random_tensor


def write_random_hf_checkpoint(
    out_dir: Path,
    model_name: str = "phi-2",
    dtype: torch.dtype = torch.bfloat16,
    shards: int = 2,
    seed: int = 0,
    gpt2_dir: Optional[Path] = None,
    config: Optional[Config] = None,
) -> Path:
    """Write config.json, generation_config.json, tokenizer files and `shards` safetensors shards + index, one shard
    at a time. `config` replaces the named config (for tests)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or Config.from_name(model_name)
    random_tensor = _random_tensors(config, dtype, seed)
    names = list(name_map(config, hf_scheme(config)).items())  # lit name -> its HF name(s), in file order
    per_shard = -(-len(names) // shards)
    weight_map, total = {}, 0
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part: dict[str, torch.Tensor] = {}
        for lit_name, hf_names in names[k * per_shard:(k + 1) * per_shard]:
            part.update(hf_tensors(lit_name, random_tensor(lit_name), hf_names, config))
        with atomic_path(out_dir / fname) as tmp:
            save_safetensors(part, tmp)
        weight_map.update({n: fname for n in part})
        total += sum(t.nbytes for t in part.values())
        del part
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    eos = _write_tokenizer(out_dir, config, gpt2_dir)
    hf_config = hf_config_dict(config, dtype, eos, eos)
    hf_config["_name_or_path"] = f"microsoft/{config.name}"
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    return out_dir


def write_random_lit_checkpoint(out_dir: Path, model_name: str = "phi-2", dtype: torch.dtype = torch.bfloat16,
                                seed: int = 0, config: Optional[Config] = None) -> Path:
    """lit_config.json and lit_model.pth (one tensor at a time) with the tokenizer files, without the Hub's files:
    half the disk of write_random_hf_checkpoint and its conversion (phi-4 in bf16: 29 GB instead of 58)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = config or Config.from_name(model_name)
    random_tensor = _random_tensors(config, dtype, seed)
    with atomic_path(out_dir / LIT_MODEL) as tmp:
        with IncrementalTensorWriter(tmp) as writer:
            for name in expected_shapes(config):
                writer.add(name, random_tensor(name))
    _write_tokenizer(out_dir, config, None)
    config.to_json(out_dir / LIT_CONFIG)
    return out_dir


def _write_tokenizer(out_dir: Path, config: Config, gpt2_dir: Optional[Path]) -> int:
    """Tokenizer files and generation_config.json; returns the eos id. Phi-1/1.5/2's tokenizer where the vocabulary
    holds it, else GPT-2's cut to the vocabulary (see `write_small_bpe_tokenizer`): random weights need a tokenizer
    whose ids fit, not the model's own."""
    if config.padded_vocab_size >= PHI_TOKENIZER_SIZE:
        write_phi_tokenizer(out_dir, gpt2_dir or GPT2_BPE_DIR)
        eos = PHI_EOS
    else:
        eos = write_small_bpe_tokenizer(out_dir, config.padded_vocab_size, gpt2_dir or GPT2_BPE_DIR)
    (out_dir / "generation_config.json").write_text(json.dumps({"bos_token_id": eos, "eos_token_id": eos}))
    return eos


def write_small_bpe_tokenizer(out_dir: Path, size: int, gpt2_dir: Path = GPT2_BPE_DIR) -> int:
    """tokenizer.json and tokenizer_config.json of GPT-2's byte-level BPE cut to `size` ids: the tokens with ids
    below size - 1, the merges among them, and <|endoftext|> (bos and eos) as id size - 1. Returns that id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    gpt2_dir = Path(gpt2_dir)
    vocab = {token: i for token, i in json.loads((gpt2_dir / "encoder.json").read_text(encoding="utf-8")).items()
             if i < size - 1}
    lines = (gpt2_dir / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
    merges = [(a, b) for a, b in merges if a in vocab and b in vocab and a + b in vocab]
    vocab[EOT] = size - 1
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    out_dir = Path(out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
              "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return size - 1
