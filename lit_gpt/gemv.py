"""Our matrix-vector kernels for batch-1 decode on CPUs with AVX-512 _BF16, VNNI and VBMI (the C is in gemv.c).

A decode step multiplies one row of activations by every weight matrix, so its speed is how fast the
weights stream from memory. PyTorch's CPU kernels stream bf16 weights at ~60-75% of the read bandwidth
on these machines and its packed int8 kernel does worse; gemv.c reads each weight row once, front to
back, and reaches about the bandwidth (scripts/bench_kernels.py compares them). The int8 and int4 products also
take a prompt's many rows, where arithmetic sets the speed: integer dot products on tiles of 5 rows (gemv.c's
tiled_product).

One call per operation: `linear_bf16`, `linear_int8`, `linear_int4`, `attend_one`, `attend_decode`, `gelu_tanh`,
`silu_mul`, `layer_norm`, `rms_norm` and `decode_blocks` (a decode step through all of a model's blocks) return the
result, or None where the kernels cannot take these inputs (more rows than the kernel takes, other dtypes or
shapes, autograd, not on the CPU, not contiguous, or no kernels at all); the caller then computes it with PyTorch,
inside `pytorch_fallback`. The first call compiles the library with the system C compiler (~1 s) into
~/.cache/lit_gpt and loads it with ctypes. Where that is not possible (no compiler, a CPU without those
instructions, another OS) or LIT_GPT_GEMV=0 is set, every call returns None and `available()` is False.
Under torch.compile the same calls trace to custom ops; the library must be loaded before tracing (call
`available()` first, as `lit_gpt.generate.compile_decode` does), or they return None there.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Iterator, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from lit_gpt.utils import atomic_path, first_line

SOURCE = Path(__file__).with_name("gemv.c")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx512vbmi")
MAX_HEAD_SIZE = 256  # the longest attention head attend_one takes; gemv.c gets it from the flags below
FEW_ROWS = 8  # the most rows linear_bf16 and decode_blocks take (a decode step of a batch); gemv.c gets it as well
CFLAGS = ["-O3", "-std=gnu11", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni",
          "-mavx512vbmi", "-mfma", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared",
          f"-DMAX_HEAD_SIZE={MAX_HEAD_SIZE}", f"-DFEW_ROWS={FEW_ROWS}"]
_BF16 = torch.bfloat16

_lib: Optional[ctypes.CDLL] = None
_tried = False
_loaded = False  # a plain bool for torch.compile to read (it does not trace ctypes objects)


# ---- building and loading the library -----------------------------------------------------------------


def _cpu_has_flags() -> bool:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return set(CPU_FLAGS) <= set(flags.split(":", 1)[1].split())


def _compiler() -> tuple[str, bytes]:
    """The C compiler ($CC, else cc) as found on PATH, and what identifies it for the build cache: its resolved
    path and --version output (another compiler or version builds its own library)."""
    name = os.environ.get("CC", "cc")
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"no C compiler ({name}) on PATH")
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"{name} --version failed: {first_line(e)}")
    # (its exit status does not matter here: a compiler that cannot build says so when it builds)
    return path, b"\0".join((os.path.realpath(path).encode(), proc.stdout, proc.stderr))


def _build() -> Path:
    """Compile gemv.c unless a build of this source, these flags and this compiler is cached; return its path."""
    compiler, identity = _compiler()
    key = hashlib.sha256(b"\0".join((SOURCE.read_bytes(), " ".join(CFLAGS).encode(), identity))).hexdigest()[:16]
    library = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lit_gpt" / f"gemv-{key}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(library) as tmp:  # concurrent first runs each build, and the last rename wins
        proc = subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(first_line(RuntimeError(proc.stderr or f"{compiler} failed")))
    return library


def _load() -> Optional[ctypes.CDLL]:
    """The library, built and loaded on the first call (None where it cannot be: a one-line note says why)."""
    global _lib, _tried, _loaded
    if _tried:
        return _lib
    _tried = True
    if os.environ.get("LIT_GPT_GEMV", "1") == "0" or platform.system() != "Linux" or not _cpu_has_flags():
        return None
    try:
        # torch is imported, so the OpenMP runtime gemv.c needs (libgomp.so.1) resolves to torch's own:
        # one thread pool, one torch.set_num_threads
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError) as e:
        print(f"note: lit_gpt's AVX-512 decode kernels are not available ({first_line(e)}); "
              "using PyTorch's", file=sys.stderr)
        return None
    for kernel in _KERNELS:
        fn = getattr(lib, kernel.name)
        fn.argtypes, fn.restype = kernel.argtypes, kernel.restype
    _lib, _loaded = lib, True
    return _lib


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call)."""
    return _load() is not None


# ---- the C functions, each declared once ----------------------------------------------------------------


class _Kernel:
    """A function of gemv.c: its C signature (given to ctypes when the library loads) and `run`, which calls it on
    tensors. With an `op` name, torch.compile traces the custom op lit_gpt::<op> in its place: opaque to
    inductor, which fuses the small ops around it and, unlike its own GEMMs, keeps no packed copy of the weights.
    `run`'s type hints are the op's schema, and `empty` (the output, allocated) its fake implementation."""

    def __init__(self, name: str, restype: Optional[type], argtypes: tuple, run: Callable[..., Tensor],
                 op: Optional[str] = None, empty: Optional[Callable[..., Tensor]] = None) -> None:
        self.name, self.restype, self.argtypes, self.run, self.op = name, restype, argtypes, run, None
        if op is not None:
            torch.library.custom_op(f"lit_gpt::{op}", run, mutates_args=()).register_fake(empty)
            self.op = getattr(torch.ops.lit_gpt, op)

    def __call__(self, *args) -> Tensor:
        # eager: a plain ctypes call (~3 us; the custom op's dispatch would add ~7 us, ~130 times per decode step)
        if self.op is not None and torch.compiler.is_compiling():
            return self.op(*args)
        return self.run(*args)


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


_OUT_OF_CACHE = -2  # attend_decode's answer for a position outside the cache (gemv.c's OUT_OF_CACHE)


def _check(status: int) -> None:
    # the int8/int4 products and the attention return -1 where their scratch memory could not be allocated
    if status != 0:
        raise MemoryError("out of memory for the decode kernels' scratch buffers (lit_gpt/gemv.c)")


def _rows_empty(x: Tensor, weight: Tensor, *_) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _run_bf16(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    x, y = x.contiguous(), _rows_empty(x, weight)
    _lib.gemv_bf16(weight.data_ptr(), x.data_ptr(), _ptr(bias), y.data_ptr(), *weight.shape, x.numel() // x.shape[-1])
    return y


def _run_int8(x: Tensor, weight: Tensor, scales: Tensor, bias: Optional[Tensor]) -> Tensor:
    x, y = x.contiguous(), _rows_empty(x, weight)
    _check(_lib.gemv_int8(weight.data_ptr(), x.data_ptr(), scales.data_ptr(), _ptr(bias), y.data_ptr(), *weight.shape,
                          x.numel() // x.shape[-1]))
    return y


def _int4_empty(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor], out_features: int,
                group_size: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


def _run_int4(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor], out_features: int,
              group_size: int) -> Tensor:
    x, y = x.contiguous(), _int4_empty(x, packed, scales, bias, out_features, group_size)
    _check(_lib.gemv_int4(packed.data_ptr(), x.data_ptr(), scales.data_ptr(), _ptr(bias), y.data_ptr(),
                          packed.shape[0], out_features, x.shape[-1], group_size, x.numel() // x.shape[-1]))
    return y


def _run_quantize_x8(x: Tensor) -> Tensor:
    x, y = x.contiguous(), torch.empty(x.shape, dtype=torch.float32)
    _check(_lib.quantize_x8(x.data_ptr(), y.data_ptr(), x.numel()))
    return y


def _empty_like(x: Tensor, *_) -> Tensor:
    return torch.empty_like(x)


def _run_attend_one(q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, scale: float, window: int) -> Tensor:
    B, n_head, _, head_size = q.shape
    position = int(input_pos.reshape(-1)[-1])  # (checked here: under torch.compile the position is not known before)
    if not 0 <= position < k.shape[2]:
        raise IndexError(f"position {position} is outside the cache of {k.shape[2]} positions")
    q = q.contiguous()
    y = _empty_like(q)
    _check(_lib.attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(), B, n_head, k.shape[1], k.shape[2],
                           position, window, head_size, scale))
    return y


def _rotary_inputs(input_pos: Tensor, cos: Tensor, sin: Tensor, rope_n_elem: int) -> tuple[Tensor, Tensor, Tensor]:
    """The new tokens' positions (int64) and their rows of cos and sin (fp32) as attend_decode's C takes them."""
    # (exact: the kernel rounds cos and sin to bf16, as the PyTorch path does)
    return (input_pos.reshape(-1).to(torch.int64).contiguous(), cos.reshape(-1, rope_n_elem).float().contiguous(),
            sin.reshape(-1, rope_n_elem).float().contiguous())


def _check_attention(status: int, positions: Tensor, S: int) -> None:
    if status == _OUT_OF_CACHE:
        raise IndexError(f"a position of {positions.tolist()} is outside the cache of {S} positions")
    _check(status)


def _run_attend_decode(qkv: Tensor, cos: Tensor, sin: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, n_head: int,
                       rope_n_elem: int, scale: float, window: int) -> Tensor:
    B, n_groups, S, head_size = k.shape
    y = qkv.new_empty(B, 1, n_head * head_size)
    positions, cos, sin = _rotary_inputs(input_pos, cos, sin, rope_n_elem)
    status = _lib.attend_decode(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), k.data_ptr(), v.data_ptr(),
                                y.data_ptr(), B, n_head, n_groups, S, positions.data_ptr(), positions.numel() > 1,
                                window, head_size, rope_n_elem, scale)
    _check_attention(status, positions, S)
    return y


def _run_gelu_tanh(x: Tensor) -> Tensor:
    y = _empty_like(x)
    _lib.gelu_tanh(x.data_ptr(), y.data_ptr(), x.numel())
    return y


def _run_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    x, y = x.contiguous(), _empty_like(x)
    _lib.layer_norm(x.data_ptr(), weight.data_ptr(), bias.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1],
                    x.shape[-1], eps)
    return y


def _run_silu_mul(x: Tensor) -> Tensor:
    y = _half_empty(x)
    _lib.silu_mul(x.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], y.shape[-1])
    return y


def _half_empty(x: Tensor) -> Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def _run_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x, y = x.contiguous(), _empty_like(x)
    _lib.rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return y


def _run_decode_blocks(plan: "BlocksPlan", x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, first: int,
                       rope_n_elem: int, scale: float, eps: float, window: int) -> Tensor:
    _, n_groups, S, head_size = plan.k.shape
    out = _empty_like(x)
    positions, cos, sin = _rotary_inputs(input_pos, cos, sin, rope_n_elem)
    status = _lib.decode_blocks(plan.fields, plan.n_layer, plan.sequential, eps, x.data_ptr(), out.data_ptr(),
                                cos.data_ptr(), sin.data_ptr(), first, x.shape[0], plan.n_head, n_groups, S,
                                positions.data_ptr(), positions.numel() > 1, window, head_size, rope_n_elem, scale)
    _check_attention(status, positions, S)
    return out


_P, _I64, _F32, _STATUS = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
_GEMV_BF16 = _Kernel("gemv_bf16", None, (_P,) * 4 + (_I64,) * 3, _run_bf16, "linear_bf16", _rows_empty)
_GEMV_INT8 = _Kernel("gemv_int8", _STATUS, (_P,) * 5 + (_I64,) * 3, _run_int8, "linear_int8", _rows_empty)
_GEMV_INT4 = _Kernel("gemv_int4", _STATUS, (_P,) * 5 + (_I64,) * 5, _run_int4, "linear_int4", _int4_empty)
_ATTEND_ONE = _Kernel("attend_one", _STATUS, (_P,) * 4 + (_I64,) * 7 + (_F32,), _run_attend_one, "attend_one",
                      _empty_like)
# eager only: under torch.compile inductor fuses the rotary embedding and the cache write itself
_ATTEND_DECODE = _Kernel("attend_decode", _STATUS, (_P,) * 6 + (_I64,) * 4 + (_P,) + (_I64,) * 4 + (_F32,),
                         _run_attend_decode)
_GELU_TANH = _Kernel("gelu_tanh", None, (_P, _P, _I64), _run_gelu_tanh, "gelu_tanh", _empty_like)
_SILU_MUL = _Kernel("silu_mul", None, (_P, _P, _I64, _I64), _run_silu_mul, "silu_mul", _half_empty)
_LAYER_NORM = _Kernel("layer_norm", None, (_P,) * 4 + (_I64,) * 2 + (_F32,), _run_layer_norm, "layer_norm",
                      _empty_like)
_RMS_NORM = _Kernel("rms_norm", None, (_P,) * 3 + (_I64,) * 2 + (_F32,), _run_rms_norm, "rms_norm", _empty_like)
# eager only, as attend_decode
_DECODE_BLOCKS = _Kernel("decode_blocks", _STATUS, (_P, _I64, _I64, _F32) + (_P,) * 4 + (_I64,) * 5 + (_P,)
                         + (_I64,) * 4 + (_F32,), _run_decode_blocks)
_QUANTIZE_X8 = _Kernel("quantize_x8", _STATUS, (_P,) * 2 + (_I64,), _run_quantize_x8)  # for tests' references
_KERNELS = (_GEMV_BF16, _GEMV_INT8, _GEMV_INT4, _ATTEND_ONE, _ATTEND_DECODE, _GELU_TANH, _SILU_MUL, _LAYER_NORM,
            _RMS_NORM, _DECODE_BLOCKS, _QUANTIZE_X8)


# ---- the operations: a result, or None for PyTorch to compute it ---------------------------------------


def _usable(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernels can run on these tensors (None for a missing bias): contiguous, on the CPU, for
    inference only (no autograd), with the library loaded (under torch.compile: loaded beforehand)."""
    # plain loops and attribute checks: a decode step asks ~160 times (generators and t.device cost
    # ~2 ms per step)
    for t in tensors:
        if t is not None and not (t.is_cpu and t.is_contiguous()):
            return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return False
    return _loaded if torch.compiler.is_compiling() else _load() is not None


def _few_rows(x: Tensor, in_features: int) -> bool:
    return x.dtype == _BF16 and x.shape[-1] == in_features and 0 < x.numel() <= FEW_ROWS * in_features


def _rows(x: Tensor, in_features: int) -> bool:
    return x.dtype == _BF16 and x.dim() > 0 and x.shape[-1] == in_features and x.numel() > 0


def _bf16_vector(t: Optional[Tensor], n: int) -> bool:
    """Whether t (None: a missing bias, which is fine) holds n bf16 values."""
    return t is None or (t.dtype == _BF16 and t.numel() == n)


def _bf16_weight(weight: Tensor, bias: Optional[Tensor]) -> bool:
    return weight.dtype == _BF16 and weight.dim() == 2 and _bf16_vector(bias, weight.shape[0])


def _int8_weight(weight: Tensor, scales: Tensor, bias: Optional[Tensor]) -> bool:
    return (weight.dtype == torch.int8 and weight.dim() == 2 and _bf16_vector(scales, weight.shape[0])
            and _bf16_vector(bias, weight.shape[0]))


def _int4_weight(packed: Tensor, scales: Tensor, bias: Optional[Tensor], out_features: int, group_size: int) -> bool:
    """Whether packed, scales and bias are an int4 weight as linear_int4 takes it (in_features: packed.shape[1] * 2)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        return False
    rows, K = packed.shape[0], packed.shape[1] * 2
    return (rows % 64 == 0 and 0 < out_features <= rows and group_size > 0 and group_size % 32 == 0
            and K % group_size == 0 and scales.dtype == _BF16 and scales.shape == (rows // 64, K // group_size, 64)
            and _bf16_vector(bias, out_features))


def linear_bf16(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """F.linear(x, weight, bias) for bf16 x of 1 to FEW_ROWS rows (a decode step, of one sequence or a batch), a
    bf16 weight (out_features, in_features) and bias; None where the kernels cannot take these inputs."""
    if _bf16_weight(weight, bias) and _few_rows(x, weight.shape[1]) and _usable(x, weight, bias):
        return _GEMV_BF16(x, weight, bias)
    return None


def linear_int8(x: Tensor, weight: Tensor, scales: Tensor, bias: Optional[Tensor]) -> Optional[Tensor]:
    """x @ (weight * scales[:, None]).T + bias for bf16 x of any number of rows (a decode step, a prompt), an int8
    weight (out_features, in_features) and bf16 scales and bias; None where the kernels cannot take these inputs."""
    if _int8_weight(weight, scales, bias) and _rows(x, weight.shape[1]) and _usable(x, weight, scales, bias):
        return _GEMV_INT8(x, weight, scales, bias)
    return None


def linear_int4(x: Tensor, packed: Tensor, scales: Tensor, bias: Optional[Tensor], out_features: int,
                group_size: int) -> Optional[Tensor]:
    """bf16 x of any number of rows (a decode step, a prompt) times an int4 weight in PyTorch's CPU layout
    (aten._convert_weight_to_int4pack_for_cpu, rows padded to a multiple of 64), W = (q - 8) * scale per group of
    group_size inputs, plus bias; bf16 scales block by block, (rows / 64, in_features / group_size, 64) (see
    blocked_scales), and bias. None where the kernels cannot take these inputs. The caller knows that this torch
    packs int4 in that layout (lit_gpt.quantize checks it)."""
    if (_int4_weight(packed, scales, bias, out_features, group_size) and _rows(x, packed.shape[1] * 2)
            and _usable(x, packed, scales, bias)):
        return _GEMV_INT4(x, packed, scales, bias, out_features, group_size)
    return None


def blocked_scales(scales: Tensor) -> Tensor:
    """int4 scales (groups, rows) block by block as linear_int4 reads them: (rows / 64, groups, 64), each block of 64
    rows' scales in one run of memory."""
    groups, rows = scales.shape
    return scales.view(groups, rows // 64, 64).transpose(0, 1).contiguous()


def unblocked_scales(blocked: Tensor) -> Tensor:
    """The inverse of blocked_scales: (groups, rows)."""
    blocks, groups, _ = blocked.shape
    return blocked.transpose(0, 1).reshape(groups, blocks * 64)


def quantized_activations(x: Tensor) -> Optional[Tensor]:
    """The activation row as linear_int8 and linear_int4 compute with it (x rounded to 8 bits per block of 32
    values, step = the block's largest |x| / 127), as fp32; None without the kernels. For tests and references."""
    if x.dtype == _BF16 and x.dim() == 1 and _usable(x):
        return _QUANTIZE_X8(x)
    return None


def attend_one(q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, scale: float, window: int = 0) -> Optional[Tensor]:
    """Softmax attention of one query per sequence and head over cached positions 0 .. input_pos (with a sliding
    window > 0, over the last `window` of them).

    q: (B, n_head, 1, head_size); k, v: the whole cache (B, n_groups, max_seq_length, head_size), n_head a
    multiple of n_groups; all bf16; input_pos: the query's position (one element). Returns
    (B, n_head, 1, head_size), as F.scaled_dot_product_attention would; None where the kernels cannot take it."""
    if (q.dim() == 4 and q.shape[2] == 1 and q.shape[3] <= MAX_HEAD_SIZE and q.dtype == k.dtype == v.dtype == _BF16
            and k.dim() == 4 and k.shape == v.shape and k.shape[0] == q.shape[0] and k.shape[3] == q.shape[3]
            and q.shape[1] % k.shape[1] == 0 and window >= 0 and _usable(q, k, v)):
        return _ATTEND_ONE(q, k, v, input_pos, scale, window)
    return None


def attend_decode(qkv: Tensor, cos: Tensor, sin: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, n_head: int,
                  rope_n_elem: int, scale: float, window: int = 0) -> Optional[Tensor]:
    """A decode step's attention, from the fused qkv rows to the heads' outputs, in one call (eager only).

    qkv: (B, 1, n_groups * (n_head / n_groups + 2) * head_size), per group its query heads, key and value;
    input_pos: the new tokens' position, one for every sequence (one element) or each sequence's own (B elements);
    cos, sin: the rotary tables at that position (rope_n_elem values) or at each sequence's (B rows of them);
    k, v: a cache (B, n_groups, max_seq_length, head_size), into which the new keys (rotated) and values are
    written. Returns (B, 1, n_head * head_size): each sequence's attention over its positions 0 .. its new one
    (with a sliding window > 0, the last `window` of them), as CausalSelfAttention computes it in PyTorch (the
    rotary embedding rounded to bf16 the same way). Raises IndexError for a position outside the cache. None, with
    k and v untouched, where the kernels cannot take the step (under torch.compile too: inductor fuses these ops
    itself)."""
    if (qkv.dim() == 3 and _decode_attention(cos, sin, k, v, input_pos, n_head, rope_n_elem, window)
            and qkv.shape[:2] == (k.shape[0], 1) and qkv.dtype == _BF16
            and qkv.shape[2] == (n_head + 2 * k.shape[1]) * k.shape[3] and _usable(qkv)):
        return _ATTEND_DECODE(qkv, cos, sin, k, v, input_pos, n_head, rope_n_elem, scale, window)
    return None


def _decode_attention(cos: Tensor, sin: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, n_head: int,
                      rope_n_elem: int, window: int) -> bool:
    """Whether attend_decode's C takes this cache, these positions and rotary tables (eager only)."""
    if torch.compiler.is_compiling() or k.dim() != 4:
        return False
    B, n_groups, S, head_size = k.shape
    rows = input_pos.numel()
    return (k.dtype == v.dtype == _BF16 and k.shape == v.shape and n_head % n_groups == 0
            and head_size <= MAX_HEAD_SIZE and rows in (1, B) and not input_pos.is_floating_point()
            and 0 <= rope_n_elem <= head_size and rope_n_elem % 2 == 0 and cos.is_floating_point()
            and sin.is_floating_point() and window >= 0 and cos.numel() == sin.numel() == rows * rope_n_elem
            and _usable(cos, sin, k, v, input_pos))


_KIND_BF16, _KIND_INT8, _KIND_INT4 = 0, 1, 2  # gemv.c's BF16, INT8, INT4


class Matrix(NamedTuple):
    """A weight matrix as decode_blocks' products read it (gemv.c's `matrix`: the tensors' addresses and sizes); from bf16_matrix, int8_matrix or int4_matrix, which check it as linear_bf16,
    linear_int8 and linear_int4 do. Valid while those tensors live and stay where they are: make one per call."""

    kind: int  # _KIND_BF16, _KIND_INT8 or _KIND_INT4
    w: int
    scales: int
    bias: int
    n_out: int
    in_features: int
    rows: int
    group: int


def bf16_matrix(weight: Tensor, bias: Optional[Tensor]) -> Optional[Matrix]:
    """The matrix of linear_bf16(x, weight, bias); None where the kernels cannot take it (or under torch.compile)."""
    if not torch.compiler.is_compiling() and _bf16_weight(weight, bias) and _usable(weight, bias):
        N, K = weight.shape
        return Matrix(_KIND_BF16, weight.data_ptr(), 0, _ptr(bias) or 0, N, K, N, 0)
    return None


def int8_matrix(weight: Tensor, scales: Tensor, bias: Optional[Tensor]) -> Optional[Matrix]:
    """The matrix of linear_int8(x, weight, scales, bias); None where the kernels cannot take it."""
    if not torch.compiler.is_compiling() and _int8_weight(weight, scales, bias) and _usable(weight, scales, bias):
        N, K = weight.shape
        return Matrix(_KIND_INT8, weight.data_ptr(), scales.data_ptr(), _ptr(bias) or 0, N, K, N, 0)
    return None


def int4_matrix(packed: Tensor, scales: Tensor, bias: Optional[Tensor], out_features: int,
                group_size: int) -> Optional[Matrix]:
    """The matrix of linear_int4(x, packed, scales, bias, out_features, group_size); None where the kernels cannot
    take it."""
    if (not torch.compiler.is_compiling() and _int4_weight(packed, scales, bias, out_features, group_size)
            and _usable(packed, scales, bias)):
        return Matrix(_KIND_INT4, packed.data_ptr(), scales.data_ptr(), _ptr(bias) or 0, out_features,
                      packed.shape[1] * 2, packed.shape[0], group_size)
    return None


class DecodeLayer(NamedTuple):
    """A block as decode_blocks reads it: phi-1/1.5/2's parallel-residual one (a layer norm, a GELU MLP) or the later
    family's sequential one (two RMS norms, a SwiGLU MLP)."""

    norm_weight: Tensor  # its (first) norm's weight, and a layer norm's bias (an RMS norm: None)
    norm_bias: Optional[Tensor]
    norm_2_weight: Optional[Tensor]  # a sequential block's second RMS norm's weight; a parallel block: None
    matrices: Sequence[Optional[Matrix]]  # qkv, proj, fc, the MLP's proj (None: one the kernels cannot take)
    k: Tensor  # its whole KV cache, (rows, n_groups, max_seq_length, head_size)
    v: Tensor


class BlocksPlan(NamedTuple):
    """The blocks of a decode step as decode_blocks runs them, checked once (plan_blocks): gemv.c's decode_layer of
    each, in one C array of addresses and sizes. Valid while the tensors behind them live and stay where they are
    (the model keeps one while its blocks hold the same modules and tensors, see GPT._blocks_plan)."""

    fields: ctypes.Array
    n_layer: int
    sequential: bool
    n_embd: int
    n_head: int
    k: Tensor  # the first block's cache (every block's has its shape)
    v: Tensor


def plan_blocks(layers: Sequence[Optional[DecodeLayer]], n_head: int) -> Optional[BlocksPlan]:
    """The blocks (every block's DecodeLayer, all of one kind; None: one the kernels cannot take) as decode_blocks
    runs them, or None where the kernels cannot take them."""
    if not layers or None in layers or len(layers[0].matrices) != 4 or None in layers[0].matrices:
        return None
    k, v, C = layers[0].k, layers[0].v, layers[0].matrices[0].in_features
    if k.dim() != 4 or k.shape != v.shape:
        return None
    width, sequential = (n_head + 2 * k.shape[1]) * k.shape[3], layers[0].norm_2_weight is not None
    for layer in layers:
        if not _decode_layer(layer, sequential, C, width, n_head * k.shape[3], k):
            return None
    fields = []
    for layer in layers:  # gemv.c's decode_layer
        fields += (layer.norm_weight.data_ptr(), _ptr(layer.norm_bias) or 0, _ptr(layer.norm_2_weight) or 0)
        for matrix in layer.matrices:
            fields += matrix
        fields += (layer.k.data_ptr(), layer.v.data_ptr())
    return BlocksPlan((ctypes.c_int64 * len(fields))(*fields), len(layers), sequential, C, n_head, k, v)


def decode_blocks(plan: Optional[BlocksPlan], x: Tensor, cos: Tensor, sin: Tensor, input_pos: Tensor, rope_n_elem: int,
                  scale: float, eps: float, window: int = 0, row: Optional[int] = None) -> Optional[Tensor]:
    """A decode step through the blocks in one call (eager only), as the model computes it with layer_norm / rms_norm,
    linear_*, attend_decode and gelu_tanh / silu_mul, equal to that bit for bit. Parallel blocks: h = layer_norm(x),
    then x + proj(attention(qkv(h))) + mlp_proj(GELU(fc(h))). Sequential ones: h = rms_norm(x), x1 = x +
    proj(attention(qkv(h))), then x1 + mlp_proj(silu(gate) * up) with [gate | up] = fc(rms_norm_2(x1)).

    plan: the blocks (plan_blocks; None: blocks the kernels cannot take); x: (B, 1, n_embd) bf16, the embedded
    tokens; the step's sequences are the caches' first B rows, or row `row` (B = 1); eps: the norms'; the
    attention's other arguments as attend_decode's. Returns the last block's output. None, with the caches
    untouched, where the kernels cannot take the step."""
    if plan is None or x.dim() != 3 or x.shape[1] != 1 or x.dtype != _BF16:
        return None
    B, _, C = x.shape
    first, k, v = row or 0, plan.k, plan.v
    if (C != plan.n_embd or B > FEW_ROWS or first < 0 or first + B > k.shape[0]
            or not _decode_attention(cos, sin, k[first:first + B], v[first:first + B], input_pos, plan.n_head,
                                     rope_n_elem, window)):
        return None
    if _usable(x):
        return _DECODE_BLOCKS(plan, x, cos, sin, input_pos, first, rope_n_elem, scale, eps, window)
    return None


def _decode_layer(layer: DecodeLayer, sequential: bool, C: int, qkv_width: int, heads_width: int, k: Tensor) -> bool:
    """Whether decode_blocks takes this block, of the kind `sequential` says, for rows of width C (its cache shaped
    as the first block's k)."""
    if len(layer.matrices) != 4 or None in layer.matrices or (layer.norm_2_weight is not None) != sequential:
        return False
    qkv, proj, fc, mlp_proj = layer.matrices
    # a sequential block's norms: two RMS norms' weights; a parallel block's: a layer norm's weight and bias
    norms = (layer.norm_weight, layer.norm_2_weight) if sequential else (layer.norm_weight, layer.norm_bias)
    return (qkv.in_features == fc.in_features == proj.n_out == mlp_proj.n_out == C and qkv.n_out == qkv_width
            and proj.in_features == heads_width and fc.n_out == (2 if sequential else 1) * mlp_proj.in_features
            and (not sequential or layer.norm_bias is None)
            and all(n is not None and n.dtype == _BF16 and n.numel() == C for n in norms)
            and layer.k.shape == layer.v.shape == k.shape and layer.k.dtype == layer.v.dtype == _BF16
            and _usable(*norms, layer.k, layer.v))


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Optional[Tensor]:
    """F.layer_norm(x, x.shape[-1:], weight, bias, eps) for the few bf16 rows of a decode step: within one bf16 step
    of it, equal on most values (see gemv.c); None where the kernels cannot take x."""
    if (x.dtype == _BF16 and x.dim() > 0 and 0 < x.numel() <= FEW_ROWS * x.shape[-1] and weight is not None
            and bias is not None and weight.dtype == bias.dtype == _BF16
            and weight.numel() == bias.numel() == x.shape[-1] and _usable(x, weight, bias)):
        return _LAYER_NORM(x, weight, bias, eps)
    return None


def rms_norm(x: Tensor, weight: Optional[Tensor], eps: float) -> Optional[Tensor]:
    """weight * (x / sqrt(mean(x^2) + eps)), the normalized row rounded to x's dtype first (RMSNorm's forward), for the
    few bf16 rows of a decode step: within one bf16 step of it, equal on most values (see gemv.c); None where the
    kernels cannot take x."""
    if (x.dtype == _BF16 and x.dim() > 0 and 0 < x.numel() <= FEW_ROWS * x.shape[-1] and weight is not None
            and weight.dtype == _BF16 and weight.numel() == x.shape[-1] and _usable(x, weight)):
        return _RMS_NORM(x, weight, eps)
    return None


def gelu_tanh(x: Tensor) -> Optional[Tensor]:
    """F.gelu(x, approximate="tanh") for the few bf16 rows of a decode step: equal for x above -2.9, closer to the
    exact value below (see gemv.c); None where the kernels cannot take x."""
    if x.dtype == _BF16 and x.dim() > 0 and x.numel() <= FEW_ROWS * x.shape[-1] and _usable(x):
        return _GELU_TANH(x)
    return None


def silu_mul(x: Tensor) -> Optional[Tensor]:
    """F.silu(gate) * up for [gate | up] = x (the fused gate_up product's halves) of the few bf16 rows of a decode step,
    (..., width / 2): within one bf16 step of it, equal on most values (see gemv.c); None where the kernels cannot
    take x."""
    if (x.dtype == _BF16 and x.dim() > 0 and x.shape[-1] % 2 == 0 and 0 < x.numel() <= FEW_ROWS * x.shape[-1]
            and _usable(x)):
        return _SILU_MUL(x)
    return None


# ---- where PyTorch computes instead --------------------------------------------------------------------


@contextmanager
def onednn_disabled() -> Iterator[None]:
    """Send CPU matmuls to ATen's own kernels instead of oneDNN, for one-row (decode) steps that our
    kernels do not take (other dtypes, or where gemv.c cannot be built).

    With a single row, ATen runs a bf16/fp16 matrix-vector product with fp32 accumulation that streams
    the weights at about the memory bandwidth; oneDNN's matmul reaches about 60% of it on these CPUs
    (scripts/bench_kernels.py, phase bf16). With more rows oneDNN is the faster one, so it stays on.
    """
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def pytorch_fallback(x: Tensor, one_row: bool) -> ContextManager[None]:
    """The scope of the PyTorch matmul (linear, attention) that computes what our kernels did not take, on `x`:
    for one row (one token of one sequence) on the CPU, eager, without oneDNN (see onednn_disabled)."""
    if one_row and x.is_cpu and not torch.compiler.is_compiling():
        return onednn_disabled()
    return nullcontext()
