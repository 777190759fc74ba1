"""Quantized models saved once (scripts/quantize.py) and loaded in seconds, memory-mapped, on the same machine.
"""

import json
import sys
from pathlib import Path
from typing import Iterator, Optional

import torch

from lit_gpt.config import Config
from lit_gpt.files import LIT_MODEL, quantized_model_name
from lit_gpt.model import GPT
from lit_gpt.tensor_writer import IncrementalTensorWriter
from lit_gpt.utils import NeedsStep, UserError, atomic_path, first_line, progress


def saved_quantized_path(checkpoint_dir: Path, mode: str, group_size: int = 32) -> Path:
    """Where `save_quantized` writes (and a .json beside it that says what it was made from)."""
    return Path(checkpoint_dir) / quantized_model_name(mode, group_size)


def _source_stamp(checkpoint_dir: Path) -> dict:
    stat = (Path(checkpoint_dir) / LIT_MODEL).stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _pieces(model: GPT) -> list[tuple[str, torch.nn.Module]]:
    """The model as modules whose state dicts together are the model's, a block at a time."""
    t = model.transformer
    return ([("transformer.wte", t.wte)] + [(f"transformer.h.{i}", b) for i, b in enumerate(t.h)]
            + [("transformer.ln_f", t.ln_f), ("lm_head", model.lm_head)])


def stored_tensors(module: torch.nn.Module, prefix: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The module's parameters and persistent buffers as they are in memory (quantized layers in their
    device layout, unlike state_dict's portable form)."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        if leaf not in module.get_submodule(owner)._non_persistent_buffers_set:
            yield f"{prefix}.{name}", tensor.detach()


def quantized_layout(model: GPT) -> tuple[str, int]:
    """(mode, group size) of a model quantized by `lit_gpt.quantize.quantize_model` (the group size of int8 is 0)."""
    from lit_gpt.quantize import Int4Linear, Int8Linear

    layer = model.lm_head
    if isinstance(layer, Int8Linear):
        return "int8", 0
    if isinstance(layer, Int4Linear):
        return "int4", layer.group_size
    raise UserError("the model is not quantized with int8 or int4")


def save_quantized(model: GPT, checkpoint_dir: Path, show_progress: bool = True) -> Path:
    """Save a model that `load_model(checkpoint_dir, "cpu", quantize=..., use_saved=False)` quantized beside its
    lit_model.pth, so that `load_model` with that mode, group size and dtype loads it in seconds instead of
    quantizing again (as long as lit_model.pth does not change). Returns the path.

    The tensors are saved as the CPU kernels hold them (int4: PyTorch's packed CPU layout, which differs
    between CPU builds, so the file is for this machine's torch: a portable quantized state dict is
    `model.state_dict()`).
    """
    from lit_gpt.quantize import cpu_int4_layout_id

    checkpoint_dir = Path(checkpoint_dir)
    mode, group_size = quantized_layout(model)
    stamp = _source_stamp(checkpoint_dir) if (checkpoint_dir / LIT_MODEL).is_file() else None
    out = saved_quantized_path(checkpoint_dir, mode, group_size)
    about = {"mode": mode, "group_size": group_size if mode == "int4" else None,
             "dtype": str(model.transformer.wte.weight.dtype).removeprefix("torch."),
             "int4_layout": cpu_int4_layout_id() if mode == "int4" else None, LIT_MODEL: stamp}
    pieces = _pieces(model)
    with atomic_path(out) as tmp:
        with IncrementalTensorWriter(tmp) as writer:
            for prefix, module in progress(pieces, len(pieces), "saving", show_progress, unit="part"):
                for name, tensor in stored_tensors(module, prefix):
                    writer.add(name, tensor)
        with atomic_path(out.with_suffix(".json")) as tmp_about:
            tmp_about.write_text(json.dumps(about, indent=2))
    return out


def usable_saved_quantized(checkpoint_dir: Path, mode: str, group_size: int,
                           dtype: Optional[torch.dtype]) -> Optional[Path]:
    """The saved quantized checkpoint for this mode, group size and dtype, if there is one, lit_model.pth
    has not changed since it was made and (int4) this torch packs int4 the same way; a note on stderr
    where one exists but does not fit."""
    from lit_gpt.quantize import cpu_int4_layout_id

    path = saved_quantized_path(checkpoint_dir, mode, group_size)
    if not path.is_file():
        return None
    again = "quantizing at load (quantize and save it again to load faster)"
    try:
        about = json.loads(path.with_suffix(".json").read_text())
        made_from, made_in, layout = about[LIT_MODEL], about["dtype"], about["int4_layout"]
    except (OSError, ValueError, KeyError, TypeError):
        print(f"note: {path.with_suffix('.json')} is missing or unreadable; {again}", file=sys.stderr)
        return None
    if (Path(checkpoint_dir) / LIT_MODEL).is_file() and made_from != _source_stamp(checkpoint_dir):
        print(f"note: {path.name} was made from an older lit_model.pth; {again}", file=sys.stderr)
        return None
    if mode == "int4" and layout != cpu_int4_layout_id():
        print(f"note: {path.name} was packed for another torch, CPU build or lit_gpt version; {again}",
              file=sys.stderr)
        return None
    wanted = None if dtype is None else str(dtype).removeprefix("torch.")
    if wanted is not None and wanted != made_in:
        print(f"note: {path.name} holds {made_in} scales, not {wanted}; quantizing at load", file=sys.stderr)
        return None
    return path


def load_saved_quantized(path: Path, config: Config, mode: str, group_size: int) -> GPT:
    """Assign the saved tensors, memory-mapped, to an empty quantized model (checked name by name
    against its shapes and dtypes)."""
    from lit_gpt.quantize import make_empty_quantized

    def broken(problem: str) -> NeedsStep:
        return NeedsStep(f"{problem}; delete it or save it again", "quantize", path.parent)

    try:
        saved = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise broken(f"{path} is truncated or corrupt ({first_line(e)})")
    dtype = saved["transformer.wte.weight"].dtype if "transformer.wte.weight" in saved else torch.float32
    with torch.device("meta"):
        model = GPT(config).to(dtype)
    make_empty_quantized(model, mode, group_size, dtype, torch.device("cpu"))
    for prefix, module in _pieces(model):
        for name, empty in list(stored_tensors(module, prefix)):
            tensor = saved.pop(name, None)
            if tensor is None:
                raise broken(f"tensor {name} is missing from {path}")
            if tensor.shape != empty.shape or tensor.dtype != empty.dtype:
                raise broken(f"{name} is {tensor.dtype} {tuple(tensor.shape)} in {path} but the model needs "
                             f"{empty.dtype} {tuple(empty.shape)}")
            owner_name, _, leaf = name[len(prefix) + 1:].rpartition(".")
            owner = module.get_submodule(owner_name)
            if leaf in owner._parameters:
                owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
            else:
                owner._buffers[leaf] = tensor
    if saved:
        raise broken(f"unexpected tensor {next(iter(saved))} in {path}")
    model.reset_rope_cache(torch.device("cpu"))
    return model.eval()


