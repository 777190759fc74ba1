"""Our matrix-vector kernels for batch-1 decode on CPUs with AVX-512 BF16, VNNI and VBMI (the C is in gemv.c).

A decode step multiplies one row of activations by every weight matrix, so its speed is how fast the
weights stream from memory. PyTorch's CPU kernels stream bf16 weights at ~60-75% of the read bandwidth
on these machines and its packed int8 kernel does worse; gemv.c reads each weight row once, front to
back, and reaches about the bandwidth (scripts/bench_kernels.py compares them).

The library is compiled on first use with the system C compiler (~1 s) into ~/.cache/lit_gpt and
loaded with ctypes. Where that is not possible (no compiler, a CPU without those instructions, another OS)
or LIT_GPT_GEMV=0 is set, `available()` is False and the model uses PyTorch's kernels.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

from lit_gpt.utils import atomic_path, first_line

SOURCE = Path(__file__).with_name("gemv.c")
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx512vbmi")
MAX_HEAD_SIZE = 256  # the longest attention head attend_one takes; gemv.c gets it from the flags below
CFLAGS = ["-O3", "-std=gnu11", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni",
          "-mavx512vbmi", "-mfma", "-fopenmp", "-fPIC", "-shared", f"-DMAX_HEAD_SIZE={MAX_HEAD_SIZE}"]

_lib: Optional[ctypes.CDLL] = None
_tried = False
_loaded = False  # a plain bool for torch.compile to read (it does not trace ctypes objects)


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
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.gemv_bf16.argtypes = [p, p, p, p, i64, i64]
    lib.gemv_int8.argtypes = [p, p, p, p, p, i64, i64]
    lib.gemv_int4.argtypes = [p, p, p, p, p, i64, i64, i64, i64]
    lib.attend_one.argtypes = [p, p, p, p, i64, i64, i64, i64, i64, i64, ctypes.c_float]
    lib.attend_decode.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float]
    lib.gemv_bf16.restype = None
    for fn in (lib.gemv_int8, lib.gemv_int4, lib.attend_one, lib.attend_decode):
        fn.restype = ctypes.c_int  # 0, or -1: its scratch memory could not be allocated
    _lib, _loaded = lib, True
    return _lib


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call)."""
    return _load() is not None


def usable(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether the kernels can take these tensors (None for a missing one): contiguous, on the CPU,
    for inference only (no autograd), with the kernels built (under torch.compile: built beforehand,
    as `lit_gpt.generate.compile_decode` does)."""
    # plain loops and attribute checks: a decode step asks ~160 times (generators and t.device cost
    # ~2 ms per step)
    for t in tensors:
        if t is not None and not (t.is_cpu and t.is_contiguous()):
            return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return False
    return _loaded if torch.compiler.is_compiling() else available()


def takes(x: torch.Tensor, weight: torch.Tensor, weight_dtype: torch.dtype, in_features: int,
          *bf16_tensors: Optional[torch.Tensor]) -> bool:
    """Whether x is one bf16 row that the kernels can multiply by a layer: its weight stored as
    `weight_dtype`, and its other tensors (scales, bias; None for a missing one) in bf16."""
    if x.numel() != in_features or x.dtype != torch.bfloat16 or weight.dtype != weight_dtype:
        return False
    for t in bf16_tensors:
        if t is not None and t.dtype != torch.bfloat16:
            return False
    return usable(x, weight, *bf16_tensors)


def _out(x: torch.Tensor, n: int) -> torch.Tensor:
    return torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16)


def _ptr(t: Optional[torch.Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("out of memory for the decode kernels' scratch buffers (lit_gpt/gemv.c)")


# In eager mode each kernel is a plain ctypes call (~3 us; the custom op's dispatch would add ~7 us, and a
# decode step makes ~130 of them). Under torch.compile they are custom ops: opaque to inductor, which fuses
# the small ops around them and, unlike its own GEMMs, keeps no packed copy of the weights.


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """F.linear(x, weight, bias) for one row: bf16 weight and bias (where `takes` says so)."""
    if torch.compiler.is_compiling():
        return torch.ops.lit_gpt.linear_bf16(x, weight, bias)
    return _gemv_bf16(x, weight, bias)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x @ (weight * scales[:, None]).T + bias for one row: int8 weight, bf16 scales and bias (where `takes` says so)."""
    if torch.compiler.is_compiling():
        return torch.ops.lit_gpt.linear_int8(x, weight, scales, bias)
    return _gemv_int8(x, weight, scales, bias)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: Optional[torch.Tensor],
                out_features: int, group_size: int) -> torch.Tensor:
    """One row times an int4 weight in PyTorch's CPU layout (aten._convert_weight_to_int4pack_for_cpu, rows
    padded to a multiple of 64), W = (q - 8) * scale + zero per group; bf16 scales, zeros and bias."""
    if torch.compiler.is_compiling():
        return torch.ops.lit_gpt.linear_int4(x, packed, scales_and_zeros, bias, out_features, group_size)
    return _gemv_int4(x, packed, scales_and_zeros, bias, out_features, group_size)


def takes_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attend_one` can take this decode step: one query per sequence, bf16 cache and query."""
    return (q.size(2) == 1 and q.size(-1) <= MAX_HEAD_SIZE
            and q.dtype == k.dtype == v.dtype == torch.bfloat16 and usable(k, v))


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax attention of one query per sequence and head over cached positions 0 .. input_pos.

    q: (B, n_head, 1, head_size); k, v: the whole cache (B, n_groups, max_seq_length, head_size), contiguous;
    all bf16; input_pos: the query's position (one element). Returns (B, n_head, 1, head_size), as
    F.scaled_dot_product_attention would."""
    if torch.compiler.is_compiling():
        return torch.ops.lit_gpt.attend_one(q, k, v, input_pos, scale)
    return _attend(q, k, v, input_pos, scale)


def takes_decode(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 length: int) -> bool:
    """Whether `attend_decode` can take this step: eager (under torch.compile inductor fuses the small ops
    itself and calls `attend_one`), one bf16 query row per sequence, a bf16 cache with room for `length`
    positions."""
    return (not torch.compiler.is_compiling() and qkv.size(1) == 1 and qkv.dtype == k.dtype == v.dtype == torch.bfloat16
            and cos.is_floating_point() and k.size(-1) <= MAX_HEAD_SIZE and 1 <= length <= k.size(2)
            and usable(qkv, cos, sin, k, v))


def attend_decode(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  length: int, n_head: int, rope_n_elem: int, scale: float) -> torch.Tensor:
    """A decode step's attention, from the fused qkv row to the heads' outputs, in one call.

    qkv: (B, 1, n_groups * (n_head / n_groups + 2) * head_size), per group its query heads, key and value;
    cos, sin: (1, rope_n_elem) rotary tables at the new position, length - 1; k, v: the cache
    (B, n_groups, max_seq_length, head_size), into which the new key (rotated) and value are written.
    Returns (B, 1, n_head * head_size): attention over positions 0 .. length - 1, as CausalSelfAttention
    computes it in PyTorch (the rotary embedding rounded to bf16 the same way)."""
    B, n_groups, S, head_size = k.shape
    y = torch.empty(B, 1, n_head * head_size, dtype=torch.bfloat16)
    cos, sin = cos.float(), sin.float()  # (exact: the kernel rounds them to bf16, as the PyTorch path does)
    _check(_lib.attend_decode(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(),
                              B, n_head, n_groups, S, length - 1, head_size, rope_n_elem, scale))
    return y


def _gemv_bf16(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    x = x.contiguous()
    y = _out(x, weight.shape[0])
    _lib.gemv_bf16(weight.data_ptr(), x.data_ptr(), _ptr(bias), y.data_ptr(), *weight.shape)
    return y


def _gemv_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    x = x.contiguous()
    y = _out(x, weight.shape[0])
    _check(_lib.gemv_int8(weight.data_ptr(), x.data_ptr(), scales.data_ptr(), _ptr(bias), y.data_ptr(), *weight.shape))
    return y


def _gemv_int4(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, bias: Optional[torch.Tensor],
               out_features: int, group_size: int) -> torch.Tensor:
    x = x.contiguous()
    y = _out(x, out_features)
    rows, in_features = scales_and_zeros.shape[1], x.shape[-1]
    _check(_lib.gemv_int4(packed.data_ptr(), x.data_ptr(), scales_and_zeros.data_ptr(), _ptr(bias), y.data_ptr(), rows,
                          out_features, in_features, group_size))
    return y


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor, scale: float) -> torch.Tensor:
    B, n_head, _, head_size = q.shape
    q = q.contiguous()
    y = torch.empty_like(q)
    length = int(input_pos.reshape(-1)[-1]) + 1
    _check(_lib.attend_one(q.data_ptr(), k.data_ptr(), v.data_ptr(), y.data_ptr(), B, n_head, k.shape[1], k.shape[2],
                           length, head_size, scale))
    return y


# the same functions as custom ops, for torch.compile
_linear_bf16 = torch.library.custom_op("lit_gpt::linear_bf16", _gemv_bf16, mutates_args=())
_linear_int8 = torch.library.custom_op("lit_gpt::linear_int8", _gemv_int8, mutates_args=())
_linear_int4 = torch.library.custom_op("lit_gpt::linear_int4", _gemv_int4, mutates_args=())
_attend_one = torch.library.custom_op("lit_gpt::attend_one", _attend, mutates_args=())


@_linear_bf16.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_linear_int8.register_fake
def _(x, weight, scales, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_linear_int4.register_fake
def _(x, packed, scales_and_zeros, bias, out_features, group_size):
    return x.new_empty(*x.shape[:-1], out_features)


@_attend_one.register_fake
def _(q, k, v, input_pos, scale):
    return torch.empty_like(q)
