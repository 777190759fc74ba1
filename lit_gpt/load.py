"""Loading a converted checkpoint for inference: memory-mapped, cast or quantized a tensor at a time, then (on the
CPU) copied onto huge pages.
"""

import ctypes
import mmap
import os
import re
from pathlib import Path
from typing import Optional, Union

import torch

from lit_gpt.choices import OWN_QUANTIZE_MODES, QuantizeMode, check_choice
from lit_gpt.config import Config
from lit_gpt.files import LIT_CONFIG, LIT_MODEL
from lit_gpt.model import GPT
from lit_gpt.utils import InvalidArgument, NeedsStep, UserError, first_line, progress


def expected_shapes(config: Config) -> dict[str, torch.Size]:
    """The name and shape of every tensor of our state dict for `config` (no memory: built on the meta device)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in GPT(config).state_dict().items()}


def load_lit_state_dict(checkpoint_dir: Path, config: Config) -> dict[str, torch.Tensor]:
    """lit_model.pth, memory-mapped (no copy of the weights in RAM until they are used), checked
    tensor by tensor against what `config` needs. lit-gpt's and litgpt's checkpoints load too: a fine-tuning
    script's {"model": state_dict}, and litgpt's attention layout (see `_from_litgpt_qkv`)."""
    path = Path(checkpoint_dir) / LIT_MODEL
    if not path.is_file():
        raise NeedsStep(f"{path} is missing; convert the checkpoint first", "convert", checkpoint_dir)
    try:
        state_dict = _load_mapped(path)
    except Exception as e:
        raise NeedsStep(f"{path} is truncated or corrupt ({first_line(e)}); convert the checkpoint again", "convert",
                        checkpoint_dir)
    if isinstance(state_dict, dict) and isinstance(state_dict.get("model"), dict):
        state_dict = state_dict["model"]  # lit-gpt's fine-tuning scripts save the model beside the training state
    if not isinstance(state_dict, dict) or not all(isinstance(t, torch.Tensor) for t in state_dict.values()):
        raise NeedsStep(f"{path} holds no state dict (tensors by name); convert the checkpoint again", "convert",
                        checkpoint_dir)
    _check_depth_and_width(state_dict, config, path)  # before building anything sized by the config
    _from_litgpt_qkv(state_dict, config)
    shapes = expected_shapes(config)
    for name, tensor in state_dict.items():
        if name not in shapes:
            raise UserError(f"unexpected tensor {name} in {path}; it does not match lit_config.json")
        if tensor.shape != shapes[name]:
            raise UserError(f"{name} has shape {tuple(tensor.shape)} in {path} but lit_config.json needs "
                            f"{tuple(shapes[name])}")
        if not tensor.is_floating_point():
            raise UserError(f"{name} is {str(tensor.dtype).removeprefix('torch.')} in {path}, not floating point; "
                            "convert the checkpoint again")
    missing = [name for name in shapes if name not in state_dict]
    if missing:
        raise NeedsStep(f"tensor {missing[0]} is missing from {path} ({len(missing)} in all); it does not match "
                        "lit_config.json: convert the checkpoint again", "convert", checkpoint_dir)
    return state_dict


def _load_mapped(path: Path) -> object:
    """torch.load, memory-mapped. Its private (copy-on-write) mapping counts in full against the memory the kernel
    lets a process commit, and Linux refuses one larger than RAM and swap (phi-4's 29 GB on a 24 GB machine): then
    the file is mapped shared, which the file itself backs, and read-only, so that no write reaches it."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as e:
        if "Cannot allocate memory" not in str(e):
            raise
    torch.serialization.set_default_mmap_options(mmap.MAP_SHARED)  # (a function before torch 2.5, so not a `with`)
    try:
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    finally:
        torch.serialization.set_default_mmap_options(mmap.MAP_PRIVATE)
    tensors = loaded.get("model", loaded) if isinstance(loaded, dict) else {}
    _FilePages([t for t in tensors.values() if isinstance(t, torch.Tensor)]).protect()
    return loaded


def _check_depth_and_width(state_dict: dict[str, torch.Tensor], config: Config, path: Path) -> None:
    """n_layer, n_embd and padded_vocab_size of lit_config.json against the state dict's names and embedding shape."""
    held = len({m.group(1) for m in map(re.compile(r"transformer\.h\.(\d+)\.").match, state_dict) if m})
    if held < config.n_layer:
        raise NeedsStep(f"the tensors of transformer.h.{held} are missing from {path}: it holds {held} blocks but "
                        f"lit_config.json says n_layer={config.n_layer}; convert the checkpoint again", "convert",
                        path.parent)
    if held > config.n_layer:
        raise UserError(f"unexpected tensors of transformer.h.{config.n_layer} in {path}: it holds {held} blocks but "
                        f"lit_config.json says n_layer={config.n_layer}")
    embedding = state_dict.get("transformer.wte.weight")
    if embedding is not None and tuple(embedding.shape) != (config.padded_vocab_size, config.n_embd):
        raise UserError(f"transformer.wte.weight has shape {tuple(embedding.shape)} in {path} but lit_config.json needs "
                        f"({config.padded_vocab_size}, {config.n_embd}) (padded_vocab_size, n_embd)")


def _from_litgpt_qkv(state_dict: dict[str, torch.Tensor], config: Config) -> None:
    """litgpt (0.5 on) names the fused q, k, v projection attn.qkv and stacks all queries, then all keys, then all
    values; ours (lit-gpt's, which litgpt still loads) is attn.attn, interleaved per query group. In place."""
    q_size, kv_size = config.n_head * config.head_size, config.n_query_groups * config.head_size
    for name in [n for n in state_dict if ".attn.qkv." in n]:
        tensor = state_dict.pop(name)
        if tensor.shape[0] == q_size + 2 * kv_size:  # (a wrong shape is reported as it is, under our name)
            tensor = qkv_to_lit(*tensor.split((q_size, kv_size, kv_size)), config)
        state_dict[name.replace(".attn.qkv.", ".attn.attn.")] = tensor


def qkv_to_lit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: Config) -> torch.Tensor:
    """Separate q, k, v (output-dim first) -> lit's fused layout, interleaved per query group."""
    g, hs = config.n_query_groups, config.head_size
    q = q.reshape(g, -1, hs, *q.shape[1:])
    k = k.reshape(g, 1, hs, *k.shape[1:])
    v = v.reshape(g, 1, hs, *v.shape[1:])
    return torch.cat((q, k, v), dim=1).reshape(-1, *q.shape[3:])


def load_model(
    checkpoint_dir: Path,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    quantize: Optional[QuantizeMode] = None,
    group_size: int = 32,
    use_saved: bool = True,
    show_progress: bool = False,
    huge_pages: bool = True,
) -> GPT:
    """Build a GPT from a converted checkpoint directory, without a second copy of the weights.

    The model is created on the meta device and takes the memory-mapped tensors as they are (on the
    CPU, in the checkpoint's dtype, the weights are read straight from the page cache). Where a tensor
    must be converted (another dtype or device) or quantized ("int8", "int4", see lit_gpt.quantize),
    it is done one tensor / one block at a time and the file pages just read are handed back, so peak
    memory stays near the size of the result, not the sum of both.

    int8/int4 on the CPU load a quantized checkpoint saved by `save_quantized` (scripts/quantize.py)
    instead, where one of that mode, group size and dtype exists and lit_model.pth has not changed
    since (use_saved=False: always quantize). show_progress: show the quantization block by block.

    huge_pages: on the CPU, copy the weights onto transparent huge pages where that is possible (see
    `onto_huge_pages`): decode steps stream them faster, for a copy at load.
    """
    from lit_gpt.quantized_checkpoint import load_saved_quantized, stored_tensors, usable_saved_quantized

    checkpoint_dir = Path(checkpoint_dir)
    device = torch.device(device)
    if quantize is not None:
        check_choice("quantize", quantize, QuantizeMode)
    config = Config.from_json(checkpoint_dir / LIT_CONFIG)
    if use_saved and quantize in OWN_QUANTIZE_MODES and device.type == "cpu":
        saved = usable_saved_quantized(checkpoint_dir, quantize, group_size, dtype)
        if saved is not None:
            model = load_saved_quantized(saved, config, quantize, group_size)
            if huge_pages:  # (the file's tensors: the model's parameters and persistent buffers)
                onto_huge_pages(model, _FilePages(t for _, t in stored_tensors(model, "")))
            return model
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
        _quantize_loaded(model, quantize, group_size, pages, show_progress)
    if huge_pages and device.type == "cpu":
        onto_huge_pages(model, pages)
    return model.eval()


HUGE_PAGE = 2 << 20  # x86-64's transparent huge page
TRIM_EVERY = 64 << 20  # bytes moved between two hand-backs of freed memory (a file's pages, malloc's)


def onto_huge_pages(model: torch.nn.Module, pages: "_FilePages") -> bool:
    """Move the model's CPU tensors into one anonymous mapping advised for transparent huge pages (Linux, THP
    not off); True if they moved. A decode step streams every weight once: from 4 KB pages (a memory-mapped
    file's, or malloc's) the hardware prefetchers stop at each page's end and each page costs a TLB entry; from 2 MB
    ones the same kernels ran faster (README, Benchmarks). The price is a copy at load (with the kernel's first
    zeroing of those pages). Each tensor's file pages (`pages`) are handed back once it is copied, so the peak stays
    near the model's size. Left where they are where the weights would not fit easily in the memory available (a
    checkpoint larger than RAM stays memory-mapped), and where LIT_GPT_HUGE_PAGES=0 is set."""
    tensors: dict[int, list[torch.Tensor]] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "cpu" and t.numel():
            tensors.setdefault(t.data_ptr(), []).append(t)
    # tensors sharing memory move together only as one and the same view (tied weights); other sharing stays put
    groups = [ts for ts in tensors.values() if all(t.shape == ts[0].shape and t.stride() == ts[0].stride()
                                                   and t.dtype == ts[0].dtype for t in ts)]
    total = sum(_aligned(ts[0].nbytes) for ts in groups)
    if not groups or total < HUGE_PAGE or not _huge_pages_possible(total):
        return False
    region = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel without THP
        region.close()
        return False
    offset = -ctypes.addressof(ctypes.c_char.from_buffer(region)) % HUGE_PAGE  # the first huge page's start
    moved = 0  # bytes since malloc's freed memory was last handed back
    with torch.no_grad():
        for ts in groups:
            old = ts[0].detach()  # the old memory, whichever tensor objects move
            # (frombuffer holds a reference to the mapping: it lives as long as any tensor in it)
            raw = torch.frombuffer(region, dtype=torch.uint8, count=old.nbytes, offset=offset)
            new = raw.view(old.dtype).view(old.shape) if old.dim() else raw.view(old.dtype)[0]
            if old.is_contiguous():  # piece by piece, each piece's file pages handed back as soon as it is copied
                source = old.reshape(-1).view(torch.uint8)
                for begin in range(0, old.nbytes, TRIM_EVERY):
                    raw[begin:begin + TRIM_EVERY].copy_(source[begin:begin + TRIM_EVERY])
                    pages.release(source[begin:begin + TRIM_EVERY])
            else:
                new.copy_(old)
                pages.release(old)
            for t in ts:
                t.data = new
            offset, moved = offset + _aligned(old.nbytes), moved + old.nbytes
            if moved >= TRIM_EVERY:  # malloc's (tensors quantized at load), freed as they moved
                pages.trim_heap()
                moved = 0
    pages.trim_heap()
    return True


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64  # each tensor on a cache line of its own


def _huge_pages_possible(nbytes: int) -> bool:
    if os.environ.get("LIT_GPT_HUGE_PAGES", "1") == "0" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        if "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text():
            return False
        available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return False
    return nbytes <= available // 2  # room for the copy beside everything else, with a margin


def _quantize_loaded(model: GPT, mode: str, group_size: int, pages: "_FilePages", show_progress: bool) -> None:
    """Quantize a model whose weights are memory-mapped, handing each layer's file pages back as soon as it is
    done: the LM head first, then layer by layer. A layer's pages stay resident until it is quantized, and the
    head's (phi-2: 262 MB) weigh least while little else is resident (int4 peak: -0.1 GB); layer by layer, not block
    by block, the peak above the result is one layer's float weights (phi-4: 0.37 GB, a block's would be 0.68)."""
    from lit_gpt.quantize import quantize_model

    def quantize_one(module: torch.nn.Module, name: str) -> None:
        weight = module.get_submodule(name).weight
        others = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and n != name]
        quantize_model(module, mode, group_size, exclude=others)
        pages.release(weight)

    quantize_one(model, "lm_head")
    pages.trim_heap()
    blocks = model.transformer.h
    for block in progress(blocks, len(blocks), f"quantizing to {mode}", show_progress, unit="block"):
        for name in [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]:
            quantize_one(block, name)
        pages.trim_heap()


def _load_bitsandbytes(config: Config, state_dict: dict, device: torch.device, dtype: torch.dtype, mode: str) -> GPT:
    """The tutorial's bitsandbytes modes, through Lightning Fabric's plugin (as lit-gpt does it).

    The Linear layers become bitsandbytes layers and each weight is quantized as it is loaded.
    """
    if device.type != "cuda":
        raise InvalidArgument("quantize", f"{mode} needs a CUDA GPU (bitsandbytes' kernels); on this machine use "
                              "int8 or int4")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise InvalidArgument("quantize", f"{mode} needs bitsandbytes: pip install bitsandbytes")
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
    are dropped with madvise(MADV_DONTNEED): the mapping is private and never written (or, for a file larger
    than a private mapping may be, shared and read-only), so a page that is read again is simply read from the
    file again. Only ranges inside the mapping are touched.
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

    def protect(self) -> None:
        """Make the whole pages of the file's tensors read-only (a write then faults instead of changing the file)."""
        if self.libc is None or self.end <= self.start:
            return
        import ctypes

        self.libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        begin = -(-self.start // mmap.PAGESIZE) * mmap.PAGESIZE
        end = self.end // mmap.PAGESIZE * mmap.PAGESIZE
        if end > begin:
            self.libc.mprotect(begin, end - begin, mmap.PROT_READ)
