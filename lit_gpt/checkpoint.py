"""Checkpoint I/O: Hugging Face <-> lit weight names, conversion both ways, and loading for inference.

One table (WEIGHT_NAMES) says where each of our tensors lives in each of the three naming schemes
Phi checkpoints have had on the Hub; both converters are driven by it.
"""

import io
import json
import mmap
import pickle
import shutil
import sys
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from lit_gpt.config import Config
from lit_gpt.download import TOKENIZER_FILES
from lit_gpt.model import GPT
from lit_gpt.utils import UserError, atomic_path, first_line

SCHEMES = ("phi", "phi-msft", "mixformer-sequential")

# lit name -> name in each scheme, in the order of SCHEMES. Placeholders: {i} block index,
# {j} = i + 1 and {last} = n_layer + 1 (MixFormer is one flat Sequential: embedding, blocks, head),
# {wb} expands to "weight" and "bias". A tuple holds q, k, v kept apart; a single qkv name holds
# them concatenated as [q; k; v] on the output dim.
WEIGHT_NAMES = [
    ("transformer.wte.weight",
     "model.embed_tokens.weight", "transformer.embd.wte.weight", "layers.0.wte.weight"),
    ("transformer.h.{i}.norm_1.{wb}",
     "model.layers.{i}.input_layernorm.{wb}", "transformer.h.{i}.ln.{wb}", "layers.{j}.ln.{wb}"),
    ("transformer.h.{i}.attn.attn.{wb}",
     ("model.layers.{i}.self_attn.q_proj.{wb}", "model.layers.{i}.self_attn.k_proj.{wb}",
      "model.layers.{i}.self_attn.v_proj.{wb}"),
     "transformer.h.{i}.mixer.Wqkv.{wb}", "layers.{j}.mixer.Wqkv.{wb}"),
    ("transformer.h.{i}.attn.proj.{wb}",
     "model.layers.{i}.self_attn.dense.{wb}", "transformer.h.{i}.mixer.out_proj.{wb}", "layers.{j}.mixer.out_proj.{wb}"),
    ("transformer.h.{i}.mlp.fc.{wb}",
     "model.layers.{i}.mlp.fc1.{wb}", "transformer.h.{i}.mlp.fc1.{wb}", "layers.{j}.mlp.fc1.{wb}"),
    ("transformer.h.{i}.mlp.proj.{wb}",
     "model.layers.{i}.mlp.fc2.{wb}", "transformer.h.{i}.mlp.fc2.{wb}", "layers.{j}.mlp.fc2.{wb}"),
    ("transformer.ln_f.{wb}",
     "model.final_layernorm.{wb}", "lm_head.ln.{wb}", "layers.{last}.ln.{wb}"),
    ("lm_head.{wb}",
     "lm_head.{wb}", "lm_head.linear.{wb}", "layers.{last}.linear.{wb}"),
]

# buffers some old checkpoints carry that are recomputed, not loaded
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.masked_bias", "attention.bias")

QUANTIZE_MODES = ("int8", "int4", "bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8")



def name_map(config: Config, scheme: str) -> dict[str, tuple[str, ...]]:
    """Every lit tensor name -> its source name(s) in `scheme` (three names for q, k, v kept apart)."""
    col = 1 + SCHEMES.index(scheme)
    out: dict[str, tuple[str, ...]] = {}
    for row in WEIGHT_NAMES:
        lit, theirs = row[0], row[col]
        theirs = theirs if isinstance(theirs, tuple) else (theirs,)
        blocks = range(config.n_layer) if "{i}" in lit else [None]
        kinds = ("weight", "bias") if "{wb}" in lit else [None]
        for i in blocks:
            for wb in kinds:
                fmt = dict(i=i, j=None if i is None else i + 1, last=config.n_layer + 1, wb=wb)
                out[lit.format(**fmt)] = tuple(t.format(**fmt) for t in theirs)
    return out


def detect_scheme(names: set[str]) -> str:
    """Which naming scheme a checkpoint uses, from its tensor names alone."""
    for scheme, marker in (("phi", "model.embed_tokens.weight"), ("phi-msft", "transformer.embd.wte.weight"),
                           ("mixformer-sequential", "layers.0.wte.weight")):
        if marker in names:
            return scheme
    sample = ", ".join(sorted(names)[:3])
    raise UserError(f"the weights are not in any known Phi naming scheme (found e.g. {sample})")


def qkv_to_lit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Config) -> torch.Tensor:
    """Separate q, k, v (output-dim first) -> lit's fused layout, interleaved per query group."""
    g, hs = config.n_query_groups, config.head_size
    q = q.reshape(g, -1, hs, *q.shape[1:])
    k = k.reshape(g, 1, hs, *k.shape[1:])
    v = v.reshape(g, 1, hs, *v.shape[1:])
    return torch.cat((q, k, v), dim=1).reshape(-1, *q.shape[3:])


def lit_to_qkv(qkv: torch.Tensor, config: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, hs = config.n_query_groups, config.head_size
    q_per_kv = config.n_head // g
    grouped = qkv.reshape(g, q_per_kv + 2, hs, *qkv.shape[1:])
    q, k, v = grouped.split((q_per_kv, 1, 1), dim=1)
    rest = qkv.shape[1:]
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def expected_shapes(config: Config) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in GPT(config).state_dict().items()}


class WeightFiles:
    """The tensors of a Hugging Face checkpoint directory, read one at a time from its weight files.

    Files are memory-mapped (safetensors, or .bin zip archives) but each read opens its own mapping,
    which goes away with the tensor: a mapping held for the whole run would count every page read
    so far as resident, and peak memory would grow to the size of the model. .bin files are only
    ever unpickled with weights_only=True, so a checkpoint cannot run code.
    """

    def __init__(self, checkpoint_dir: Path) -> None:
        self.files = find_weight_files(checkpoint_dir)
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}  # from the file headers, no data read
        for path in self.files:
            with self._open(path) as tensors:
                for name in tensors.keys():
                    self.where[name] = path
                    self.shapes[name] = tensors.shape(name)

    def get(self, name: str) -> torch.Tensor:
        try:
            with self._open(self.where[name]) as tensors:
                return tensors.get(name)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read {name} from {self.where[name]} ({first_line(e)}); "
                            "the file is corrupt: delete it and download the checkpoint again")

    @contextmanager
    def _open(self, path: Path) -> Iterator["_Tensors"]:
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                handle = safe_open(str(path), framework="pt")
                yield _Tensors(handle.keys, lambda n: handle.get_slice(n).get_shape(), handle.get_tensor)
            else:
                with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
                    warnings.simplefilter("ignore")
                    sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                yield _Tensors(sd.keys, lambda n: sd[n].shape, sd.__getitem__)
        except pickle.UnpicklingError as e:
            raise UserError(f"{path} holds more than tensors and was not loaded, as it could run code "
                            f"({first_line(e)}); use a safetensors checkpoint instead")
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path} is truncated or corrupt ({first_line(e)}); "
                            "delete it and download the checkpoint again")


class _Tensors:
    """The three things read from an open weight file, whatever its format."""

    def __init__(self, keys, shape, get) -> None:
        self.keys = keys
        self.shape = lambda name: tuple(shape(name))
        self.get = get


def find_weight_files(checkpoint_dir: Path) -> list[Path]:
    checkpoint_dir = Path(checkpoint_dir)
    for pattern, index_name in (("*.safetensors", "model.safetensors.index.json"),
                                ("*.bin", "pytorch_model.bin.index.json")):
        index = checkpoint_dir / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise UserError(f"{index} is malformed ({e}); download the checkpoint again")
            missing = [s for s in shards if not (checkpoint_dir / s).is_file()]
            if missing:
                raise UserError(f"shard {missing[0]} listed in {index.name} is missing from {checkpoint_dir}; "
                                "run the download again to fetch it")
            return [checkpoint_dir / s for s in shards]
        files = sorted(p for p in checkpoint_dir.glob(pattern) if p.name != "training_args.bin")
        if files:
            return files
    raise UserError(f"no weights (*.safetensors or *.bin) in {checkpoint_dir}; download them with "
                    f"`python scripts/download.py --repo_id {hub_repo_id(checkpoint_dir)}`")


def hub_repo_id(checkpoint_dir: Path) -> str:
    """checkpoints/<org>/<name> -> "<org>/<name>" (what the download script takes)."""
    parts = Path(checkpoint_dir).resolve().parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else "<org>/<name>"


def convert_hf_checkpoint(
    checkpoint_dir: Path, model_name: Optional[str] = None, dtype: Optional[str] = None, progress: bool = True
) -> Path:
    """Convert a Hugging Face Phi checkpoint in `checkpoint_dir` into lit_config.json + lit_model.pth.

    Tensors are read, remapped and written one at a time, so memory stays near one tensor.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"{checkpoint_dir} does not exist; download a checkpoint first with "
                        "`python scripts/download.py --repo_id microsoft/phi-2`")
    target_dtype = parse_dtype(dtype)
    weights = WeightFiles(checkpoint_dir)

    if model_name is not None:
        config = Config.from_name(model_name)
    elif (checkpoint_dir / "config.json").is_file():
        config = Config.from_hf_config(checkpoint_dir / "config.json")
    else:
        raise UserError(f"{checkpoint_dir} has no config.json; pass --model_name (phi-1, phi-1_5 or phi-2)")

    scheme = detect_scheme(set(weights.where))
    names = name_map(config, scheme)
    shapes = expected_shapes(config)
    wanted = [n for sources in names.values() for n in sources]
    missing = [n for n in wanted if n not in weights.where]
    if missing:
        raise UserError(f"tensor {missing[0]} is missing from the checkpoint in {checkpoint_dir} "
                        f"(expected for {config.n_layer} layers, scheme {scheme})")
    unexpected = sorted(n for n in set(weights.where).difference(wanted) if not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise UserError(f"unexpected tensor {unexpected[0]} in the checkpoint in {checkpoint_dir} "
                        f"({len(unexpected)} in all); it does not match the config")
    # check every shape from the file headers before writing anything
    for lit_name, sources in names.items():
        parts = [weights.shapes[s] for s in sources]
        fused = (sum(p[0] for p in parts), *parts[0][1:])  # q, k, v stack on the output dim
        if any(p[1:] != parts[0][1:] for p in parts) or fused != tuple(shapes[lit_name]):
            found = " + ".join(str(p) for p in parts)
            raise UserError(f"{' + '.join(sources)} has shape {found} but the config needs {tuple(shapes[lit_name])} "
                            f"for {lit_name}; the config.json does not match the weights")

    def converted() -> Iterator[tuple[str, torch.Tensor]]:
        for lit_name, sources in names.items():
            parts = [weights.get(s) for s in sources]
            if len(parts) == 1 and ".attn.attn." in lit_name:  # a fused [q; k; v]
                parts = parts[0].split([config.n_head * config.head_size] + 2 * [config.n_query_groups * config.head_size])
            tensor = qkv_to_lit(*parts, config) if len(parts) == 3 else parts[0]
            yield lit_name, tensor.to(target_dtype) if target_dtype else tensor

    out = checkpoint_dir / "lit_model.pth"
    with atomic_path(out) as tmp:
        with IncrementalTensorWriter(tmp) as writer:
            for lit_name, tensor in _progress(converted(), len(names), "converting", progress):
                writer.add(lit_name, tensor)
        with atomic_path(checkpoint_dir / "lit_config.json") as tmp_config:
            config.to_json(tmp_config)
    return out


def convert_if_needed(checkpoint_dir: Path) -> None:
    """Convert a directory that holds Hugging Face weights but no lit_model.pth (as litgpt does after a
    download), saying so in one line on stderr; anything else is left for loading to judge."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir() or (checkpoint_dir / "lit_model.pth").is_file():
        return
    if not (checkpoint_dir / "config.json").is_file():
        return
    try:
        find_weight_files(checkpoint_dir)
    except UserError:
        return
    print(f"{checkpoint_dir} holds Hugging Face weights but no lit_model.pth; converting it first", file=sys.stderr)
    convert_hf_checkpoint(checkpoint_dir, progress=False)


def convert_lit_checkpoint(checkpoint_dir: Path, output_dir: Path) -> Path:
    """Write a transformers-loadable directory (config.json, model.safetensors, tokenizer files)."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    config = Config.from_json(checkpoint_dir / "lit_config.json")
    state_dict = load_lit_state_dict(checkpoint_dir, config)
    bos_id = eos_id = 50256  # Phi's <|endoftext|>, unless the checkpoint's tokenizer says otherwise
    if (checkpoint_dir / "tokenizer.json").is_file():
        from lit_gpt.tokenizer import Tokenizer

        tokenizer = Tokenizer(checkpoint_dir)
        bos_id, eos_id = tokenizer.bos_id, tokenizer.eos_id
    output_dir.mkdir(parents=True, exist_ok=True)
    save_hf_checkpoint(state_dict, config, output_dir, bos_id, eos_id)
    for name in ("generation_config.json", *TOKENIZER_FILES):
        if (checkpoint_dir / name).is_file():
            with atomic_path(output_dir / name) as tmp:
                shutil.copyfile(checkpoint_dir / name, tmp)
    return output_dir


def save_hf_checkpoint(state_dict: dict[str, torch.Tensor], config: Config, output_dir: Path,
                       bos_id: Optional[int] = 50256, eos_id: Optional[int] = 50256) -> None:
    """model.safetensors and config.json of a lit state dict, in transformers' current Phi format."""
    from safetensors.torch import save_file

    hf_state_dict = {}
    for lit_name, targets in name_map(config, "phi").items():
        tensor = state_dict[lit_name]
        parts = lit_to_qkv(tensor, config) if len(targets) == 3 else (tensor,)
        for target, part in zip(targets, parts):
            hf_state_dict[target] = part.contiguous()
    with atomic_path(Path(output_dir) / "model.safetensors") as tmp:
        save_file(hf_state_dict, str(tmp), metadata={"format": "pt"})
    dtype = next(iter(state_dict.values())).dtype
    with atomic_path(Path(output_dir) / "config.json") as tmp:
        tmp.write_text(json.dumps(hf_config_dict(config, dtype, bos_id, eos_id), indent=2))


def hf_config_dict(config: Config, dtype: torch.dtype, bos_id: Optional[int] = 50256,
                   eos_id: Optional[int] = 50256) -> dict:
    """config.json for transformers' PhiForCausalLM (the current format)."""
    return {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": config.padded_vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_query_groups,
        "max_position_embeddings": config.block_size,
        "partial_rotary_factor": config.rotary_percentage,
        "rope_theta": float(config.rope_base),
        "layer_norm_eps": config.norm_eps,
        "hidden_act": "gelu_new",
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def load_lit_state_dict(checkpoint_dir: Path, config: Config) -> dict[str, torch.Tensor]:
    """lit_model.pth, memory-mapped (no copy of the weights in RAM until they are used), checked
    tensor by tensor against what `config` needs."""
    path = Path(checkpoint_dir) / "lit_model.pth"
    if not path.is_file():
        raise UserError(f"{path} is missing; convert the checkpoint first with "
                        f"`python scripts/convert_hf_checkpoint.py --checkpoint_dir {checkpoint_dir}`")
    try:
        state_dict = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is truncated or corrupt ({first_line(e)}); convert the checkpoint again")
    shapes = expected_shapes(config)
    for name, tensor in state_dict.items():
        if name not in shapes:
            raise UserError(f"unexpected tensor {name} in {path}; it does not match lit_config.json")
        if tensor.shape != shapes[name]:
            raise UserError(f"{name} has shape {tuple(tensor.shape)} in {path} but lit_config.json needs "
                            f"{tuple(shapes[name])}")
    missing = [name for name in shapes if name not in state_dict]
    if missing:
        raise UserError(f"tensor {missing[0]} is missing from {path} ({len(missing)} in all); "
                        "it does not match lit_config.json: convert the checkpoint again")
    return state_dict


def load_model(
    checkpoint_dir: Path,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    quantize: Optional[str] = None,
    group_size: int = 32,
    use_saved: bool = True,
    progress: bool = False,
) -> GPT:
    """Build a GPT from a converted checkpoint directory, without a second copy of the weights.

    The model is created on the meta device and takes the memory-mapped tensors as they are (on the
    CPU, in the checkpoint's dtype, the weights are read straight from the page cache). Where a tensor
    must be converted (another dtype or device) or quantized ("int8", "int4", see lit_gpt.quantize),
    it is done one tensor / one block at a time and the file pages just read are handed back, so peak
    memory stays near the size of the result, not the sum of both.

    int8/int4 on the CPU load a quantized checkpoint saved by `save_quantized` (scripts/quantize.py)
    instead, where one of that mode, group size and dtype exists and lit_model.pth has not changed
    since (use_saved=False: always quantize). progress: show the quantization block by block.
    """
    checkpoint_dir = Path(checkpoint_dir)
    device = torch.device(device)
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise UserError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    config = Config.from_json(checkpoint_dir / "lit_config.json")
    if use_saved and quantize in ("int8", "int4") and device.type == "cpu":
        saved = _saved_quantized(checkpoint_dir, quantize, group_size, dtype)
        if saved is not None:
            return _load_saved_quantized(saved, config, quantize, group_size)
    state_dict = load_lit_state_dict(checkpoint_dir, config)
    if quantize is not None and quantize.startswith("bnb."):
        return _load_bitsandbytes(config, state_dict, device, dtype or torch.bfloat16, quantize)
    pages = _FilePages(state_dict.values())
    for name, tensor in state_dict.items():
        target_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        if tensor.device != device or tensor.dtype != target_dtype:
            state_dict[name] = tensor.to(device=device, dtype=target_dtype)
            pages.release(tensor)
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(state_dict, strict=True, assign=True)
    del state_dict
    model.reset_rope_cache(device)
    if quantize:
        from lit_gpt.quantize import quantize_model

        # The LM head first, then block by block: each layer's file pages stay resident until it is done,
        # and the head's (phi-2: 262 MB) weigh least while little else is resident (int4 peak: -0.1 GB).
        head = model.lm_head.weight
        all_but_head = [name for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and name != "lm_head"]
        quantize_model(model, quantize, group_size, exclude=all_but_head)
        pages.release(head)
        pages.trim_heap()
        for block in _progress(model.transformer.h, len(model.transformer.h), f"quantizing to {quantize}", progress,
                               unit="block"):
            weights = [m.weight for m in block.modules() if isinstance(m, torch.nn.Linear)]
            quantize_model(block, quantize, group_size)
            for weight in weights:
                pages.release(weight)
            pages.trim_heap()
    return model.eval()


# ---- quantized checkpoints: quantize once (scripts/quantize.py), load in seconds ------------------------


def saved_quantized_path(checkpoint_dir: Path, mode: str, group_size: int = 32) -> Path:
    """Where `save_quantized` writes: lit_model.int8.pth or lit_model.int4-g<group_size>.pth (and a .json
    beside it that says what it was made from)."""
    name = "lit_model.int8.pth" if mode == "int8" else f"lit_model.int4-g{group_size}.pth"
    return Path(checkpoint_dir) / name


def _source_stamp(checkpoint_dir: Path) -> dict:
    stat = (Path(checkpoint_dir) / "lit_model.pth").stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _pieces(model: GPT) -> list[tuple[str, torch.nn.Module]]:
    """The model as modules whose state dicts together are the model's, a block at a time."""
    t = model.transformer
    return ([("transformer.wte", t.wte)] + [(f"transformer.h.{i}", b) for i, b in enumerate(t.h)]
            + [("transformer.ln_f", t.ln_f), ("lm_head", model.lm_head)])


def _stored_tensors(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's parameters and persistent buffers as they are in memory (quantized layers in their
    device layout, unlike state_dict's portable form)."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        if leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
            yield f"{prefix}.{name}", tensor.detach()


def save_quantized(checkpoint_dir: Path, mode: str, group_size: int = 32, dtype: Optional[torch.dtype] = None,
                   progress: bool = True) -> Path:
    """Quantize lit_model.pth (int8 or int4, as `load_model` does) and save the whole model beside it, so
    that `load_model(..., quantize=mode)` on the CPU loads it in seconds instead of quantizing again.
    Returns the path.

    The tensors are saved as the CPU kernels hold them (int4: PyTorch's packed CPU layout, which differs
    between CPU builds, so the file is for this machine's torch: a portable quantized state dict is
    `model.state_dict()`); scales, biases, embedding and norms in `dtype` (default: as in lit_model.pth).
    """
    from lit_gpt.quantize import MODES, check_int4_group_size, cpu_int4_layout_id

    checkpoint_dir = Path(checkpoint_dir)
    if mode not in MODES:  # (load_model would also take the bitsandbytes modes)
        raise UserError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "int4":
        check_int4_group_size(group_size)  # before loading anything
    stamp = _source_stamp(checkpoint_dir) if (checkpoint_dir / "lit_model.pth").is_file() else None
    model = load_model(checkpoint_dir, "cpu", dtype, quantize=mode, group_size=group_size, use_saved=False,
                       progress=progress)
    out = saved_quantized_path(checkpoint_dir, mode, group_size)
    about = {"mode": mode, "group_size": group_size if mode == "int4" else None,
             "dtype": str(model.transformer.wte.weight.dtype).removeprefix("torch."),
             "int4_layout": cpu_int4_layout_id() if mode == "int4" else None, "lit_model.pth": stamp}
    with atomic_path(out) as tmp:
        with IncrementalTensorWriter(tmp) as writer:
            for prefix, module in _progress(_pieces(model), len(_pieces(model)), "saving", progress, unit="part"):
                for name, tensor in _stored_tensors(module, prefix):
                    writer.add(name, tensor)
        with atomic_path(out.with_suffix(".json")) as tmp_about:
            tmp_about.write_text(json.dumps(about, indent=2))
    return out


def _saved_quantized(checkpoint_dir: Path, mode: str, group_size: int, dtype: Optional[torch.dtype]) -> Optional[Path]:
    """The saved quantized checkpoint for this mode, group size and dtype, if there is one, lit_model.pth
    has not changed since it was made and (int4) this torch packs int4 the same way; a note on stderr
    where one exists but does not fit."""
    from lit_gpt.quantize import cpu_int4_layout_id

    path = saved_quantized_path(checkpoint_dir, mode, group_size)
    if not path.is_file():
        return None
    again = f"quantizing at load (save it again with `python scripts/quantize.py --checkpoint_dir {checkpoint_dir}`)"
    try:
        about = json.loads(path.with_suffix(".json").read_text())
        made_from, made_in, layout = about["lit_model.pth"], about["dtype"], about["int4_layout"]
    except (OSError, ValueError, KeyError, TypeError):
        print(f"note: {path.with_suffix('.json')} is missing or unreadable; {again}", file=sys.stderr)
        return None
    if (Path(checkpoint_dir) / "lit_model.pth").is_file() and made_from != _source_stamp(checkpoint_dir):
        print(f"note: {path.name} was made from an older lit_model.pth; {again}", file=sys.stderr)
        return None
    if mode == "int4" and layout != cpu_int4_layout_id():
        print(f"note: {path.name} was packed by another torch or CPU build; {again}", file=sys.stderr)
        return None
    wanted = None if dtype is None else str(dtype).removeprefix("torch.")
    if wanted is not None and wanted != made_in:
        print(f"note: {path.name} holds {made_in} scales, not {wanted}; quantizing at load", file=sys.stderr)
        return None
    return path


def _load_saved_quantized(path: Path, config: Config, mode: str, group_size: int) -> GPT:
    """Assign the saved tensors, memory-mapped, to an empty quantized model (checked name by name
    against its shapes and dtypes)."""
    from lit_gpt.quantize import make_empty_quantized

    fix = f"delete it or save it again with `python scripts/quantize.py --checkpoint_dir {path.parent}`"
    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is truncated or corrupt ({first_line(e)}); {fix}")
    dtype = saved["transformer.wte.weight"].dtype if "transformer.wte.weight" in saved else torch.float32
    with torch.device("meta"):
        model = GPT(config).to(dtype)
    make_empty_quantized(model, mode, group_size, dtype, torch.device("cpu"))
    for prefix, module in _pieces(model):
        for name, empty in list(_stored_tensors(module, prefix)):
            tensor = saved.pop(name, None)
            if tensor is None:
                raise UserError(f"tensor {name} is missing from {path}; {fix}")
            if tensor.shape != empty.shape or tensor.dtype != empty.dtype:
                raise UserError(f"{name} is {tensor.dtype} {tuple(tensor.shape)} in {path} but the model needs "
                                f"{empty.dtype} {tuple(empty.shape)}; {fix}")
            owner_name, _, leaf = name[len(prefix) + 1:].rpartition(".")
            owner = module.get_submodule(owner_name)
            if leaf in owner._parameters:
                owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
            else:
                owner._buffers[leaf] = tensor
    if saved:
        raise UserError(f"unexpected tensor {next(iter(saved))} in {path}; {fix}")
    model.reset_rope_cache(torch.device("cpu"))
    return model.eval()


def _load_bitsandbytes(config: Config, state_dict: dict, device: torch.device, dtype: torch.dtype, mode: str) -> GPT:
    """The tutorial's bitsandbytes modes, through Lightning Fabric's plugin (as lit-gpt does it).

    The Linear layers become bitsandbytes layers and each weight is quantized as it is loaded.
    """
    if device.type != "cuda":
        raise UserError(f"--quantize {mode} needs a CUDA GPU (bitsandbytes' kernels); on this machine use "
                        "--quantize int8 or --quantize int4")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError(f"--quantize {mode} needs bitsandbytes: pip install bitsandbytes")
    import lightning as L
    from lightning.fabric.plugins import BitsandbytesPrecision

    fabric = L.Fabric(devices=1, accelerator="cuda", plugins=BitsandbytesPrecision(mode[len("bnb."):], dtype))
    with fabric.init_module(empty_init=True):
        model = GPT(config)
    model.load_state_dict(state_dict, strict=True)
    model.reset_rope_cache(device)
    return model.eval()


class _FilePages:
    """Hands memory back to the OS while a memory-mapped checkpoint is converted or quantized.

    Pages of a file mapping that were read stay counted as resident while the mapping lives (and it
    lives as long as any tensor from the file). After a tensor was converted or quantized, its pages
    are dropped with madvise(MADV_DONTNEED): the mapping is private and never written, so a page
    that is read again is simply read from the file again. Only ranges inside the mapping are touched.
    glibc also keeps freed temporaries (the quantizer's float chunks) in its heap; malloc_trim returns them.
    """

    def __init__(self, tensors) -> None:
        cpu = [t for t in tensors if t.device.type == "cpu" and t.numel()]
        self.start = min((t.data_ptr() for t in cpu), default=0)
        self.end = max((t.data_ptr() + t.nbytes for t in cpu), default=0)
        try:
            import ctypes

            self.libc = ctypes.CDLL(None, use_errno=True)
            self.libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            self.libc.malloc_trim  # glibc only
        except (OSError, AttributeError):  # not Linux/glibc: memory is left to the OS
            self.libc = None

    def release(self, tensor: torch.Tensor) -> None:
        if self.libc is None or tensor.device.type != "cpu":
            return
        begin, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
        if not (self.start <= begin and end <= self.end):
            return  # not from the file (already converted): never drop anonymous memory
        begin = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the tensor only
        end = end // mmap.PAGESIZE * mmap.PAGESIZE
        if end > begin:
            self.libc.madvise(begin, end - begin, mmap.MADV_DONTNEED)

    def trim_heap(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)


def parse_dtype(dtype: Optional[str]) -> Optional[torch.dtype]:
    if dtype is None:
        return None
    choices = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in choices:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(choices)}")
    return choices[dtype]


def _progress(items, total: int, desc: str, enabled: bool, unit: str = "tensor"):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr)


class IncrementalTensorWriter:
    """Writes a torch.save-compatible state dict one tensor at a time.

    torch.save pickles the whole dict at once, so every tensor would have to be in memory together.
    Here each tensor's bytes go into the zip archive as soon as it is added; only small
    placeholders are pickled at the end. The result loads with torch.load(weights_only=True, mmap=True).
    """

    def __init__(self, path: Path) -> None:
        self.zip = torch._C.PyTorchFileWriter(str(path))
        self.tensors: dict[str, _SavedTensor] = OrderedDict()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        if tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # a view into a bigger storage: write only its own bytes
        key = str(len(self.tensors))
        self.zip.write_record(f"data/{key}", tensor.untyped_storage(), tensor.nbytes)
        self.tensors[name] = _SavedTensor(key, tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.numel())

    def close(self) -> None:
        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _SavedStorage):
                    return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
                return None

        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(self.tensors)
        data = buf.getvalue()
        self.zip.write_record("data.pkl", data, len(data))
        self.zip.write_record(".format_version", "1", 1)
        self.zip.write_record(".storage_alignment", "64", 2)
        self.zip.write_record("byteorder", sys.byteorder, len(sys.byteorder))
        self.zip.write_end_of_file()

    def __enter__(self) -> "IncrementalTensorWriter":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.zip.write_end_of_file()  # close the file; the caller discards it


class _SavedStorage:
    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        self.key, self.numel = key, numel
        # the legacy typed-storage class (e.g. torch.BFloat16Storage) is how torch.save names dtypes
        self.storage_type = getattr(torch, torch.storage._dtype_to_storage_type_map()[dtype])


class _SavedTensor:
    def __init__(self, key, dtype, shape, stride, numel) -> None:
        self.storage = _SavedStorage(key, dtype, numel)
        self.shape, self.stride = shape, stride

    def __reduce_ex__(self, protocol):
        # unpickles as the tensor itself, exactly as torch.save writes tensors
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, self.shape, self.stride, False, OrderedDict())
