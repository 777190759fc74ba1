"""Where and in what precision a model runs, and the numbers the scripts report about it (memory, bytes per step)."""

import resource
import sys
from typing import Optional, Union

import torch

from lit_gpt.choices import Precision, check_choice

DTYPE_OF_PRECISION = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}


def cpu_supports_bf16() -> bool:
    """Whether the CPU has native bf16 math (x86 AVX512-BF16/AMX, Arm BF16); without it bf16 is emulated."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_precision(device: torch.device) -> Precision:
    """bf16 on GPUs that have it (else fp16); on CPUs bf16 where the CPU supports it natively, else fp32.

    Measured for a decode step on an AMD EPYC with AVX512-BF16 (2 shared threads, torch 2.13), 4 phi-2
    layers + LM head, fp32 and bf16 interleaved, min / median ms per step: 127/137 vs 63/72 and 141/152 vs
    73/82 on a quiet machine; 251/309 vs 265/315 under heavy load from other processes. bf16 was never
    more than ~5% slower, up to 2x faster (a decode step reads every weight once, and bf16 halves the
    bytes), and it halves the memory (phi-2: 5.6 GB instead of 11). Without native support bf16 is
    emulated and slower, hence fp32 there.
    """
    if device.type == "cuda":
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    return "bf16-true" if cpu_supports_bf16() else "32-true"


def default_device() -> torch.device:
    """Where the scripts run: CUDA if available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def choose_device(precision: Optional[Precision] = None) -> tuple[torch.device, str, torch.dtype]:
    """default_device(), and the precision given or the device's default. Returns (device, precision, dtype)."""
    device = default_device()
    precision = precision or default_precision(device)
    check_choice("precision", precision, Precision)
    if device.type == "cpu" and precision == "bf16-true" and not cpu_supports_bf16():
        print("note: this CPU has no native bf16; it is emulated and slower than 32-true precision", file=sys.stderr)
    return device, precision, DTYPE_OF_PRECISION[precision]


def decode_step_bytes(model: torch.nn.Module, batch_size: int = 1) -> int:
    """Bytes of weights one decode step reads: every parameter and quantized weight buffer, but of the
    embedding only the looked-up rows (gpt-fast counts the whole table, 5% of phi-2, which is not read).
    """
    total = sum(t.nbytes for t in model.parameters())
    # quantized layers hold their weights, scales and biases as buffers
    total += sum(t.nbytes for name, t in model.named_buffers()
                 if name not in ("cos", "sin", "causal_mask") and ".kv_cache." not in name)
    wte = model.transformer.wte.weight
    return total - wte.nbytes + batch_size * wte.size(1) * wte.element_size()


def peak_memory(device: torch.device) -> str:
    """Peak memory of this process, as text: CUDA's max allocated, or the CPU's max resident set."""
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB (CUDA max allocated)"
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return f"{rss_kb * 1024 / 1e9:.2f} GB (max resident set, memory-mapped weights included)"


def sync(device: Union[torch.device, str]) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def kv_cache_bytes(config, batch_size: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of the KV cache (keys and values of every layer) and its causal mask for `batch_size` sequences of
    `length` tokens."""
    per_layer = 2 * batch_size * config.n_query_groups * length * config.head_size * dtype.itemsize
    return config.n_layer * per_layer + length * length


def free_memory(device: torch.device) -> int:
    """Bytes that can still be allocated: CUDA's free memory, or the host's MemAvailable (Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: allocation itself will say
