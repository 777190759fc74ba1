"""Weight-only int8 / int4 quantization of `nn.Linear` layers, for faster decoding.

At batch size 1 a decode step reads every weight once and does little arithmetic on it, so it is
bound by memory bandwidth: storing weights in 8 or 4 bits reads 2x or ~3.5x fewer bytes than bf16.
The kernels (measured with scripts/bench_kernels.py; see the numbers there):

- int8, per output channel, symmetric: `W ~ q * scale[n]`, q in [-127, 127].
  CPU: bf16 rows (a decode step, a prompt) go through our gemv.c kernels where they build (AVX-512
  BF16/VNNI/VBMI), which round the activations to 8 bits per block of 32 (as llama.cpp's q8_0 does) and multiply
  with integer dot products; otherwise `aten._weight_int8pack_mm` (stock PyTorch; bf16/fp16/fp32 activations),
  and for a prompt of bf16 rows the bf16 matrix product on tiles of the dequantized weight (DEQUANTIZED_MIN_ROWS).
  CUDA and others: `F.linear(x, q.to(x.dtype)) * scale`, the pattern that inductor turns into a
  fused kernel under torch.compile (gpt-fast's int8 path); eager it is correct but not fast.
- int4, group-wise, symmetric (as llama.cpp's q4_0): `W ~ (q - 8) * scale[n, g]`, q in [0, 15], one scale per
  `group_size` consecutive inputs (4.5 bits a weight with groups of 32). PyTorch's kernels take (scale, zero)
  pairs (tinygemm's convention), the zero here 0.
  CPU: bf16 rows through our gemv.c kernels (8-bit activations, as for int8), which read PyTorch's packed
  weight; otherwise `aten._weight_int4pack_mm_for_cpu`;
  CUDA: `aten._weight_int4pack_mm` (tinygemm, bf16 only).
  The packed weight layout is the kernel's own and differs per device (and per CPU instruction
  set), so layers are packed for the device their weight is on when `quantize_model` runs.

torchao wraps these same aten kernels on CPU, so nothing here needs it.

Checkpoints: `state_dict()` of a quantized layer holds a portable form (int8: q and scales; int4:
q as two nibbles per byte, high nibble first, plus tinygemm's scales_and_zeros, zeros 0), converted to the
kernel's layout on `load_state_dict()`, so a checkpoint saved on one device loads on another.
To load one, build the model (on the meta device will do), call `make_empty_quantized` with the same
mode and group size, then `load_state_dict(..., assign=True)`. scripts/quantize.py
(lit_gpt.quantized_checkpoint.save_quantized) saves a whole model in the kernels' own CPU layout instead, so that
it loads on the same machine in seconds, without repacking.
"""

from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_gpt import gemv
from lit_gpt.choices import INT4_GROUP_SIZES, OWN_QUANTIZE_MODES
from lit_gpt.utils import UserError

aten = torch.ops.aten

# Quantize this many weight elements at a time: the float32 temporaries (4 MB) stay in cache, which
# measured 2-4x faster than 16-64 MB chunks, and memory does not grow with the layer size.
# Row chunks are multiples of 64: the int4 packings work on independent blocks of at most 64 rows
# (CPU) or 8 rows (CUDA), so packing or unpacking chunk by chunk, at any such chunk size, gives the
# same bytes as doing the whole matrix at once.
_CHUNK_ELEMENTS = 1 << 20
# Unpacking int4 (state_dict, dequantize) caches an index per chunk shape (4 MB each).
_UNPACK_CHUNK_ELEMENTS = 1 << 20

# Without our kernels (another CPU, LIT_GPT_GEMV=0), an int8 product of this many bf16 rows or more (a prompt)
# multiplies by the weight dequantized to bf16 with the bf16 matrix product, PyTorch's int8 kernel being several
# times slower on many rows (phi-2's fc1 at 480 rows: 92 against 28 ms); a tile of _TILE_ELEMENTS weights at a
# time, so memory grows by one tile (8 MB), not by a bf16 copy of the layer.
DEQUANTIZED_MIN_ROWS = 16
_TILE_ELEMENTS = 1 << 22

def check_int4_group_size(group_size: int) -> None:
    """A UserError unless both int4 kernels (CPU, tinygemm) take this group size."""
    if group_size not in INT4_GROUP_SIZES:
        raise UserError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")


def quantize_model(
    model: nn.Module, mode: str, group_size: int = 32, exclude: Sequence[str] = ()
) -> None:
    """Replace every `nn.Linear` in `model` (in place) by a weight-only quantized linear.

    mode: "int8" (per output channel) or "int4" (groups of `group_size` inputs; 32, 64, 128 or 256).
    exclude: names of Linear modules to keep in float (as in `model.named_modules()`, e.g. "lm_head").

    Layers are quantized one at a time and each float layer is dropped as soon as its replacement
    exists, so peak memory stays near the float model's (memory-mapped weights are only read).
    The weights may be bf16, fp16 or fp32; scales and biases keep that dtype.
    """
    if isinstance(model, nn.Linear):
        raise UserError("quantize_model replaces the Linear layers inside a model: wrap a bare Linear in a module")
    if mode not in OWN_QUANTIZE_MODES:
        raise UserError(f"unknown quantization mode {mode!r}: choose one of {', '.join(OWN_QUANTIZE_MODES)}")
    if mode == "int4":
        check_int4_group_size(group_size)
    # check every layer before touching any, so a bad shape leaves the model as it was
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in exclude]
    if mode == "int4":
        for name, m in linears:
            if m.in_features % group_size:
                raise UserError(f"int4 group size {group_size} does not divide {name}'s {m.in_features} input features")
            device = m.weight.device.type
            if device not in ("cpu", "cuda"):
                raise UserError(f"int4 quantization needs CPU or CUDA weights; {name} is on {device}")
            if device == "cpu" and not hasattr(aten, "_weight_int4pack_mm_for_cpu"):
                raise UserError(f"int4 on CPU needs torch >= 2.6 (this is {torch.__version__})")
    while linears:
        name, linear = linears.pop(0)
        q = Int8Linear.from_linear(linear) if mode == "int8" else Int4Linear.from_linear(linear, group_size)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, q)
        del linear, q  # nothing references the float layer any more: its weight is freed here


def make_empty_quantized(model: nn.Module, mode: str, group_size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Replace every `nn.Linear` in `model` (in place; e.g. a model built on the meta device) by an empty
    quantized layer of the same shape on `device`, for `load_state_dict` of a saved quantized model."""
    for name, m in [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]:
        bias = m.bias is not None
        if mode == "int8":
            q = Int8Linear(m.in_features, m.out_features, bias=bias, dtype=dtype, device=device)
        else:
            q = Int4Linear(m.in_features, m.out_features, bias=bias, group_size=group_size, dtype=dtype, device=device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, q)


def _row_chunks(n_rows: int, n_cols: int, elements: Optional[int] = None) -> List[slice]:
    rows = max(64, ((elements or _CHUNK_ELEMENTS) // max(n_cols, 1)) // 64 * 64)
    return [slice(i, min(i + rows, n_rows)) for i in range(0, n_rows, rows)]


def _bias_buffer(linear: nn.Linear) -> Optional[torch.Tensor]:
    return None if linear.bias is None else linear.bias.detach().clone()


# ------------------------------------------------------------------------------------------------
# int8
# ------------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T + bias, with an int8 weight (out_features, in_features)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, bias=False, dtype=w.dtype, device=w.device)
        for rows in _row_chunks(*w.shape):
            chunk = w[rows].to(torch.float32, copy=True)  # a copy: the in-place ops below must not touch w
            lo, hi = chunk.amin(dim=1), chunk.amax(dim=1)  # (torch.aminmax is ~8x slower on CPU)
            # round the scale to its storage dtype first, so that dequantize() is exactly what the
            # kernel computes with
            scale = (torch.maximum(-lo, hi) / 127).clamp(min=1e-12).to(w.dtype)
            q.scales[rows] = scale
            q.weight[rows] = chunk.div_(scale.float()[:, None]).round_().clamp_(-127, 127)  # (exact ints -> int8)
        q.bias = _bias_buffer(linear)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gemv.linear_int8(x, self.weight, self.scales, self.bias)  # on CPU
        if y is not None:
            return y
        x2 = x.reshape(-1, self.in_features)
        scales = self.scales.to(x.dtype)
        if self._by_dequantized_tiles(x2):
            y = self._dequantized_product(x2.contiguous())
        elif x.device.type == "cpu":
            with gemv.pytorch_fallback(x, one_row=x2.shape[0] == 1):
                y = aten._weight_int8pack_mm(x2.contiguous(), self.weight, scales)
        else:
            y = F.linear(x2, self.weight.to(x.dtype)) * scales
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def decode_matrix(self) -> Optional[gemv.Matrix]:
        """The weight as gemv.decode_blocks reads it; None where the kernels cannot."""
        return gemv.int8_matrix(self.weight, self.scales, self.bias)

    def _by_dequantized_tiles(self, x2: torch.Tensor) -> bool:
        return (x2.shape[0] >= DEQUANTIZED_MIN_ROWS and x2.is_cpu and x2.dtype == self.scales.dtype == torch.bfloat16
                and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and x2.requires_grad))

    def _dequantized_product(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 (M, in_features) times dequantize(torch.bfloat16).T, the weight dequantized a tile of rows at a time
        (q * scale, bf16 times bf16, is exact in fp32 and rounded to bf16 once, as dequantize does)."""
        step = max(1, _TILE_ELEMENTS // self.in_features)
        y = x2.new_empty(x2.shape[0], self.out_features)
        for start in range(0, self.out_features, step):
            rows = slice(start, start + step)
            y[:, rows] = x2 @ torch.mul(self.weight[rows].to(torch.bfloat16), self.scales[rows, None]).t()
        return y

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer multiplies by: W_hat = q * scale."""
        return (self.weight.float() * self.scales.float()[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


# ------------------------------------------------------------------------------------------------
# int4
# ------------------------------------------------------------------------------------------------


def _inner_k_tiles(in_features: int) -> int:
    # tinygemm on CUDA needs in_features % (inner_k_tiles * 16) == 0; 8 is its fastest setting
    return next(t for t in (8, 4, 2) if in_features % (t * 16) == 0)


def _pack_int4(q: torch.Tensor, device_type: str) -> torch.Tensor:
    """Pack q (rows, in_features), int32 in [0, 15], into the int4 kernel's layout for `device_type`."""
    if device_type == "cpu":
        return aten._convert_weight_to_int4pack_for_cpu(q, 1)
    if device_type == "cuda":
        if _torch_version() < (2, 5):  # older torch took the int32 matrix itself
            return aten._convert_weight_to_int4pack(q, _inner_k_tiles(q.shape[1]))
        nibbles = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
        return aten._convert_weight_to_int4pack(nibbles, _inner_k_tiles(q.shape[1]))
    raise UserError(f"int4 quantization supports CPU and CUDA weights, not {device_type}")


def _torch_version() -> tuple:
    return tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


def _packed_int4_shape(rows: int, cols: int, device_type: str) -> tuple:
    if device_type == "cuda":
        tiles = _inner_k_tiles(cols)
        return (rows // 8, cols // (tiles * 16), 32, tiles // 2)
    return (rows, cols // 2)


@lru_cache(maxsize=8)
def _int4_slots(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """For the packed form of a (rows, cols) chunk: the flat index r * cols + c of the value each
    nibble holds (nibbles in storage order, low nibble of each byte first).

    Found by packing the coordinates themselves, 4 bits at a time, so this reads any of the
    kernels' layouts (CPU AVX512 / AVX2 / scalar, CUDA tinygemm) without hard-coding them."""
    index = torch.arange(rows * cols, device=device, dtype=torch.int32)
    slots = torch.zeros_like(index)
    for shift in range(0, max(1, (rows * cols - 1).bit_length()), 4):
        probe = ((index >> shift) & 15).view(rows, cols)
        slots |= _nibbles(_pack_int4(probe, device.type)).int() << shift
    return slots  # int32: 4 MB per chunk shape in the cache


@lru_cache(maxsize=1)
def _cpu_int4_layout_is_gemvs() -> bool:
    """Whether this torch packs int4 for the CPU the way lit_gpt/gemv.c reads it: blocks of 64 rows,
    32 bytes per column, byte j holding row j (low nibble) and row j + 32 (high nibble)."""
    rows, cols = 128, 64
    i = torch.arange(rows * cols)
    byte, high = i // 2, i % 2
    block, column, j = byte // (cols * 32), byte % (cols * 32) // 32, byte % 32
    expected = (block * 64 + j + 32 * high) * cols + column
    return torch.equal(_int4_slots(rows, cols, torch.device("cpu")).long(), expected)


def _gemv_reads_cpu_int4() -> bool:
    """Whether our decode kernel reads CPU int4 layers here: this torch packs them as gemv.c reads them, and the
    kernels are built (such layers hold their scales block by block)."""
    return _cpu_int4_layout_is_gemvs() and gemv.available()


def cpu_int4_layout_id() -> str:
    """A fingerprint of how CPU int4 layers are held here: how this torch packs int4 (it differs between CPU
    builds) and where the scales lie (block by block for our kernel): a saved layer is only read back where the
    fingerprint is the same."""
    import hashlib

    packing = hashlib.sha256(_int4_slots(128, 64, torch.device("cpu")).numpy().tobytes()).hexdigest()[:16]
    return packing + ("-symmetric-scales-by-64-rows" if _gemv_reads_cpu_int4() else "-symmetric")


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """All 4-bit values of a packed tensor, in storage order (low nibble of each byte first)."""
    b = packed.contiguous().view(torch.uint8).view(-1)
    return torch.stack((b & 15, b >> 4), dim=-1).view(-1)


class Int4Linear(nn.Module):
    """y = x @ W_hat.T + bias with W_hat[n, k] = (q[n, k] - 8) * scale[n, g], g = k // group_size.

    `weight` holds q packed for the device's int4 kernel. Where our CPU kernel reads the layer (gemv_layout),
    `scales` holds the scales block by block, (padded out_features / 64, in_features // group_size, 64)
    (gemv.blocked_scales); elsewhere `scales_and_zeros` holds them as PyTorch's kernels take them,
    (in_features // group_size, padded out_features, 2), the zeros 0. Rows are padded to a multiple of 16 (the
    CPU kernel's need); the output is cut back to out_features.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        group_size: int = 32,
        dtype: torch.dtype = torch.bfloat16,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        check_int4_group_size(group_size)
        if in_features % group_size:
            raise UserError(f"int4 group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_out = -(-out_features // 16) * 16
        device = torch.device(device or "cpu")
        if device.type not in ("cpu", "cuda"):
            raise UserError(f"int4 quantization supports CPU and CUDA weights, not {device.type}")
        shape = _packed_int4_shape(self.padded_out, in_features, device.type)
        dtype_packed = torch.int32 if device.type == "cuda" else torch.uint8
        # whether gemv.c reads this layer (a plain bool, decided here, outside torch.compile)
        self.gemv_layout = device.type == "cpu" and self.padded_out % 64 == 0 and _gemv_reads_cpu_int4()
        groups = in_features // group_size
        self.register_buffer("weight", torch.zeros(shape, dtype=dtype_packed, device=device))
        self.register_buffer(*self._held_scales(torch.zeros(groups, self.padded_out, dtype=dtype, device=device)))
        self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, group_size: int = 32) -> "Int4Linear":
        w = linear.weight
        N, K = w.shape
        q = cls(K, N, bias=False, group_size=group_size, dtype=w.dtype, device=w.device)
        scales = torch.empty(K // group_size, q.padded_out, dtype=w.dtype, device=w.device)
        packed = []
        for rows in _row_chunks(q.padded_out, K):
            n = rows.stop - rows.start
            chunk = w[rows.start : min(rows.stop, N)].to(torch.float32, copy=True)  # in-place ops below
            if chunk.shape[0] < n:  # rows padded up to a multiple of 16 quantize zeros
                chunk = F.pad(chunk, (0, 0, 0, n - chunk.shape[0]))
            groups = chunk.view(n, K // group_size, group_size)
            # as q4_0: the value of largest magnitude becomes q - 8 = -8 exactly, the rest round to -8 .. 7
            extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
            scale = (extreme / -8).to(w.dtype)
            scale = torch.where(scale == 0, torch.full_like(scale, 1e-6), scale)  # (an all-zero group: q = 8)
            # quantize against the rounded scale, so dequantize() is what the kernel computes
            qi = groups.div_(scale.float()[..., None]).round_().add_(8).clamp_(0, 15)
            packed.append(_pack_int4(qi.view(n, K).to(torch.int32), w.device.type))
            scales[:, rows] = scale.t()
        q.weight = torch.cat(packed) if len(packed) > 1 else packed[0]
        setattr(q, *q._held_scales(scales))
        q.bias = _bias_buffer(linear)
        return q

    def _pack_nibbles(self, nibbles: torch.Tensor) -> torch.Tensor:
        """The portable form (out_features, in_features / 2), high nibble first, packed for this layer's
        device, a chunk of rows at a time (the padding rows hold q = 8, i.e. W = zero = 0)."""
        device, K = self.weight.device, self.in_features
        packed = []
        for rows in _row_chunks(self.padded_out, K):
            q = torch.full((rows.stop - rows.start, K), 8, dtype=torch.int32, device=device)
            real = nibbles[rows.start : min(rows.stop, self.out_features)].to(device)
            q[: real.shape[0]] = torch.stack((real >> 4, real & 15), dim=-1).view(real.shape[0], K)
            packed.append(_pack_int4(q, device.type))
        return torch.cat(packed) if len(packed) > 1 else packed[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemv_layout:  # on CPU
            y = gemv.linear_int4(x, self.weight, self.scales, self.bias, self.out_features, self.group_size)
            if y is not None:
                return y
        x2 = x.reshape(-1, self.in_features).contiguous()
        if x.device.type == "cpu":
            sz = self.pytorch_scales().to(x.dtype)
            with gemv.pytorch_fallback(x, one_row=x2.shape[0] == 1):
                y = aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, sz)
        else:  # tinygemm computes in bf16 only
            sz = self.pytorch_scales().to(torch.bfloat16)
            y = aten._weight_int4pack_mm(x2.to(torch.bfloat16), self.weight, self.group_size, sz).to(x.dtype)
        if self.padded_out != self.out_features:
            y = y[:, : self.out_features]
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def pytorch_scales(self) -> torch.Tensor:
        """The (scale, zero) pairs as PyTorch's int4 kernels take them, (groups, padded rows, 2), the zeros 0."""
        if not self.gemv_layout:
            return self.scales_and_zeros
        scales = gemv.unblocked_scales(self.scales)
        return torch.stack((scales, torch.zeros_like(scales)), dim=-1)

    def _held_scales(self, scales: torch.Tensor) -> tuple[str, torch.Tensor]:
        """The buffer's name and value that hold scales (groups, padded rows) in this layer's layout."""
        if self.gemv_layout:
            return "scales", gemv.blocked_scales(scales)
        return "scales_and_zeros", torch.stack((scales, torch.zeros_like(scales)), dim=-1)

    def decode_matrix(self) -> Optional[gemv.Matrix]:
        """The weight as gemv.decode_blocks reads it; None where the kernels cannot."""
        if not self.gemv_layout:
            return None
        return gemv.int4_matrix(self.weight, self.scales, self.bias, self.out_features, self.group_size)

    @torch.no_grad()
    def int_weight(self) -> torch.Tensor:
        """q as a (out_features, in_features) uint8 matrix of values 0..15, unpacked from the kernel layout."""
        out = []
        K = self.in_features
        offset = 0
        flat = self.weight.contiguous().view(torch.uint8).view(-1)
        for rows in _row_chunks(self.padded_out, K, _UNPACK_CHUNK_ELEMENTS):
            n = rows.stop - rows.start
            nbytes = n * K // 2
            slots = _int4_slots(n, K, self.weight.device)
            chunk = torch.empty(n * K, dtype=torch.uint8, device=self.weight.device)
            chunk[slots.long()] = _nibbles(flat[offset : offset + nbytes])
            out.append(chunk.view(n, K))
            offset += nbytes
        return torch.cat(out)[: self.out_features]

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this layer multiplies by: W_hat = (q - 8) * scale, per group."""
        G = self.group_size
        q = self.int_weight().float().view(self.out_features, -1, G)
        scale = self.pytorch_scales()[:, : self.out_features, 0].float().t()[..., None]
        return ((q - 8) * scale).view(self.out_features, self.in_features).to(dtype)

    # -- checkpoints: the state dict holds q as plain nibbles, not the device-specific layout --

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        q = self.int_weight()
        destination.pop(prefix + "scales", None)  # (our kernel's layout: the portable form is the pairs below)
        destination[prefix + "weight"] = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # (N, K/2)
        destination[prefix + "scales_and_zeros"] = self.pytorch_scales()[:, : self.out_features].clone()

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        key_w, key_sz = prefix + "weight", prefix + "scales_and_zeros"
        if key_w in state_dict and key_sz in state_dict:
            nibbles, sz = state_dict[key_w], state_dict[key_sz]
            expected = (self.out_features, self.in_features // 2)
            if tuple(nibbles.shape) != expected or nibbles.dtype != torch.uint8:
                raise UserError(
                    f"{key_w}: expected a uint8 int4 weight of shape {expected}, got {nibbles.dtype} {tuple(nibbles.shape)}"
                    " (was the checkpoint quantized with another mode or group size?)"
                )
            if tuple(sz.shape) != (self.in_features // self.group_size, self.out_features, 2):
                raise UserError(
                    f"{key_sz}: shape {tuple(sz.shape)} does not match group size {self.group_size}"
                    " (quantize the model with the checkpoint's group size before loading it)"
                )
            if sz[..., 1].any():
                raise UserError(f"{key_sz}: nonzero int4 zero points (asymmetric int4 from an older lit_gpt); "
                                "quantize the model again")
            state_dict = dict(state_dict)  # do not change the caller's dict
            state_dict[key_w] = self._pack_nibbles(nibbles)
            held = self.scales if self.gemv_layout else self.scales_and_zeros
            padded = torch.zeros(sz.shape[0], self.padded_out, dtype=held.dtype, device=held.device)
            padded[:, : self.out_features] = sz[..., 0].to(padded.device, padded.dtype)
            del state_dict[key_sz]
            name, value = self._held_scales(padded)
            state_dict[prefix + name] = value
            # the parent call reads from this local dict: it is not the caller's
            return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int4, group_size={self.group_size}"
        )
