"""Micro-benchmark of weight-only-quantized linear kernels for batch-1 decode on CPU (see `main`)."""

import gc
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Literal, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lit_gpt import gemv  # noqa: E402
from lit_gpt.cli import run_cli  # noqa: E402
from lit_gpt.gemv import onednn_disabled  # noqa: E402
from lit_gpt.utils import InvalidArgument  # noqa: E402

aten = torch.ops.aten


class Kernel:
    """A named candidate: `build(M)` returns a function that runs one sweep and returns its count."""

    def __init__(self, name: str, bytes_per_matrix: int, build: Callable[[int], Callable[[], int]]):
        self.name = name
        self.bytes_per_matrix = bytes_per_matrix
        self.build = build


def _count(gb: float, bytes_per_matrix: int) -> int:
    return max(2, math.ceil(gb * 1e9 / bytes_per_matrix))


def _sweep(fn: Callable, args: List[tuple]) -> Callable[[], int]:
    def run() -> int:
        for a in args:
            fn(*a)
        return len(args)

    return run


def _gemv_sweep(fn: Callable, args: List[tuple]) -> Callable[[], int]:
    """A sweep of one of lit_gpt's gemv.c operations, which return None for inputs they do not take."""
    if fn(*args[0]) is None:
        raise ValueError("gemv.c declines these: it takes one row (int4: of 64-row blocks), on AVX-512 BF16/VNNI/VBMI")
    return _sweep(fn, args)


def _compiled_stack(layers: List[torch.nn.Module], x: torch.Tensor, mode: str, freezing: bool) -> Callable[[], int]:
    """Compile one module that runs all `layers` on `x` (weights are module buffers, so freezing can
    turn them into constants and the C++ GEMM templates can pre-pack them)."""

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(layers)

        def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
            return [layer(x) for layer in self.layers]

    stack = Stack().eval()
    compiled = torch.compile(stack, mode=mode, dynamic=False)
    with torch.no_grad(), torch._inductor.config.patch(freezing=freezing):
        compiled(x)  # compile (and autotune) now, outside the timed rounds

    def run() -> int:
        with torch.no_grad():
            compiled(x)
        return len(layers)

    return run


# ----------------------------------------------------------------------------------------------
# weight sets
# ----------------------------------------------------------------------------------------------


def bf16_kernels(N: int, K: int, gb: float) -> List[Kernel]:
    nbytes = N * K * 2
    ws = [torch.randn(N, K, dtype=torch.bfloat16) for _ in range(_count(gb, nbytes))]

    def build(M: int) -> Callable[[], int]:
        x = torch.randn(M, K, dtype=torch.bfloat16)
        return _sweep(F.linear, [(x, w) for w in ws])

    def aten_gemv(M: int) -> Callable[[], int]:
        x = torch.randn(M, K, dtype=torch.bfloat16)

        def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            with onednn_disabled():  # as our model does for one row where gemv.c is not available
                return F.linear(x, w)

        return _sweep(linear, [(x, w) for w in ws])

    def ours(M: int) -> Callable[[], int]:
        x = torch.randn(M, K, dtype=torch.bfloat16)
        return _gemv_sweep(gemv.linear_bf16, [(x, w, None) for w in ws])

    return [Kernel("bf16 F.linear (baseline)", nbytes, build), Kernel("bf16 F.linear, oneDNN off", nbytes, aten_gemv),
            Kernel("bf16 lit_gpt gemv.c", nbytes, ours)]


class _Bf16Layer(torch.nn.Module):
    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


def bf16_maxautotune_kernels(N: int, K: int, gb: float) -> List[Kernel]:
    # The bf16 baseline as inductor compiles it with max-autotune + freezing (its C++ GEMM template
    # competes with the oneDNN/mkldnn linear). Its own phase: freezing pre-packs a copy of the weights.
    nbytes = N * K * 2
    ws = [torch.randn(N, K, dtype=torch.bfloat16) for _ in range(_count(gb, nbytes))]

    def maxautotune(M: int) -> Callable[[], int]:
        x = torch.randn(M, K, dtype=torch.bfloat16)
        return _compiled_stack([_Bf16Layer(w) for w in ws], x, "max-autotune-no-cudagraphs", freezing=True)

    return [Kernel("bf16 compile max-autotune+freezing", nbytes, maxautotune)]


class _Int8Layer(torch.nn.Module):
    def __init__(self, w: torch.Tensor, s: torch.Tensor, pattern: bool) -> None:
        super().__init__()
        self.register_buffer("w", w)
        self.register_buffer("s", s)
        self.pattern = pattern

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pattern:
            return F.linear(x, self.w.to(x.dtype)) * self.s
        return aten._weight_int8pack_mm(x, self.w, self.s)


def int8_maxautotune_kernels(N: int, K: int, gb: float) -> List[Kernel]:
    # Its own phase: freezing marks the weights as frozen parameters, after which dynamo guards
    # on their identity and other compiled functions taking them as inputs would recompile.
    nbytes = N * K + N * 2
    n = _count(gb, nbytes)
    ws = [torch.randint(-127, 128, (N, K), dtype=torch.int8) for _ in range(n)]
    ss = [torch.rand(N, dtype=torch.bfloat16) / 64 for _ in range(n)]

    def maxautotune(M: int) -> Callable[[], int]:
        x = torch.randn(M, K, dtype=torch.bfloat16)
        layers = [_Int8Layer(w, s, pattern=False) for w, s in zip(ws, ss)]
        return _compiled_stack(layers, x, "max-autotune-no-cudagraphs", freezing=True)

    return [Kernel("int8 compile max-autotune+freezing", nbytes, maxautotune)]


def int8_kernels(N: int, K: int, gb: float, slow_count: int) -> List[Kernel]:
    nbytes = N * K + N * 2
    n = _count(gb, nbytes)
    ws = [torch.randint(-127, 128, (N, K), dtype=torch.int8) for _ in range(n)]
    ss = [torch.rand(N, dtype=torch.bfloat16) / 64 for _ in range(n)]
    # torch._int_mm takes the weight as K x N; a transposed view of the N x K tensor is fine.
    ss_f32 = [s.float() for s in ss]
    kernels = []

    def eager(M: int) -> Callable[[], int]:
        x = torch.randn(M, K, dtype=torch.bfloat16)
        return _sweep(aten._weight_int8pack_mm, [(x, w, s) for w, s in zip(ws, ss)])

    kernels.append(Kernel("int8 aten._weight_int8pack_mm", nbytes, eager))

    def ours(M: int) -> Callable[[], int]:
        x = torch.randn(M, K, dtype=torch.bfloat16)
        return _gemv_sweep(gemv.linear_int8, [(x, w, s, None) for w, s in zip(ws, ss)])

    kernels.append(Kernel("int8 lit_gpt gemv.c", nbytes, ours))

    def pattern_compiled(M: int) -> Callable[[], int]:
        # x is 3-D as in a model: inductor's woq-int8 patterns only match F.linear on 2-D x when it
        # comes through a reshape, and then rewrite it to aten._weight_int8pack_mm
        x = torch.randn(1, M, K, dtype=torch.bfloat16)
        fn = torch.compile(lambda x, w, s: F.linear(x, w.to(x.dtype)) * s, dynamic=False)
        fn(x, ws[0], ss[0])
        return _sweep(fn, [(x, w, s) for w, s in zip(ws, ss)])

    kernels.append(Kernel("int8 compile F.linear(x3d,w.to)*s", nbytes, pattern_compiled))

    def reduce_compiled(M: int) -> Callable[[], int]:
        # Written as a reduction so inductor emits one fused dequant-multiply-sum loop that never
        # materialises the float weight.
        def fn(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            return ((x.unsqueeze(-2).float() * w.float()).sum(-1) * s.float()).to(x.dtype)

        x = torch.randn(M, K, dtype=torch.bfloat16)
        cfn = torch.compile(fn, dynamic=False)
        cfn(x, ws[0], ss[0])
        return _sweep(cfn, [(x, w, s) for w, s in zip(ws, ss)])

    kernels.append(Kernel("int8 compile fused mul+sum", nbytes, reduce_compiled))

    def int_mm(M: int) -> Callable[[], int]:
        def fn(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
            sx = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-6) / 127
            xq = torch.round(x.float() / sx).to(torch.int8)
            return (torch._int_mm(xq, w.t()) * sx * s).to(x.dtype)

        x = torch.randn(M, K, dtype=torch.bfloat16)
        return _sweep(fn, [(x, w, s) for w, s in zip(ws, ss_f32)])

    kernels.append(Kernel("int8 dyn-act torch._int_mm", nbytes, int_mm))

    try:
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
    except Exception:
        Int8Tensor = None
    if Int8Tensor is not None:

        def torchao_int8(M: int) -> Callable[[], int]:
            x = torch.randn(M, K, dtype=torch.bfloat16)
            wts = [
                Int8Tensor(w, s.unsqueeze(-1), block_size=[1, K], dtype=torch.bfloat16)
                for w, s in zip(ws[:slow_count], ss[:slow_count])
            ]
            return _sweep(F.linear, [(x, wt) for wt in wts])

        kernels.append(Kernel("int8 torchao Int8Tensor eager (*)", nbytes, torchao_int8))
    return kernels


class _Int4Layer(torch.nn.Module):
    def __init__(self, w: torch.Tensor, sz: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.register_buffer("w", w)
        self.register_buffer("sz", sz)
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return aten._weight_int4pack_mm_for_cpu(x, self.w, self.group_size, self.sz)


def int4_maxautotune_kernels(N: int, K: int, gb: float, group_size: int) -> List[Kernel]:
    # Its own phase, for the same reason as int8_maxautotune_kernels.
    n = _count(gb, N * K // 2)
    w0 = aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 1)
    ws = [w0.clone() for _ in range(n)]
    szs = [torch.rand(K // group_size, N, 2, dtype=torch.bfloat16) / 16 for _ in range(n)]
    nbytes = N * K // 2 + szs[0].numel() * 2

    def maxautotune(M: int) -> Callable[[], int]:
        x = torch.randn(M, K, dtype=torch.bfloat16)
        layers = [_Int4Layer(w, sz, group_size) for w, sz in zip(ws, szs)]
        return _compiled_stack(layers, x, "max-autotune-no-cudagraphs", freezing=True)

    return [Kernel(f"int4 compile max-autotune+freezing g{group_size}", nbytes, maxautotune)]


def int4_kernels(N: int, K: int, gb: float, group_sizes: List[int]) -> List[Kernel]:
    # The packed weight does not depend on the group size, only the scales do: share it.
    n = _count(gb, N * K // 2)
    q = torch.randint(0, 16, (N, K), dtype=torch.int32)
    w0 = aten._convert_weight_to_int4pack_for_cpu(q, 1)
    del q
    ws = [w0.clone() for _ in range(n)]  # random packed bytes would do too; clone is quick
    kernels = []
    for g in group_sizes:
        if K % g:
            continue
        szs = [torch.rand(K // g, N, 2, dtype=torch.bfloat16) / 16 for _ in range(n)]
        nbytes = N * K // 2 + szs[0].numel() * 2

        def eager(M: int, szs: List[torch.Tensor] = szs, g: int = g) -> Callable[[], int]:
            x = torch.randn(M, K, dtype=torch.bfloat16)
            return _sweep(aten._weight_int4pack_mm_for_cpu, [(x, w, g, sz) for w, sz in zip(ws, szs)])

        kernels.append(Kernel(f"int4 aten._weight_int4pack_mm_for_cpu g{g}", nbytes, eager))

        def ours(M: int, szs: List[torch.Tensor] = szs, g: int = g) -> Callable[[], int]:
            x = torch.randn(M, K, dtype=torch.bfloat16)
            return _gemv_sweep(gemv.linear_int4, [(x, w, sz, None, N, g) for w, sz in zip(ws, szs)])

        kernels.append(Kernel(f"int4 lit_gpt gemv.c g{g}", nbytes, ours))

        if g == group_sizes[0]:

            try:
                from torchao.prototype.quantization.int4 import Int4OpaqueTensor
            except Exception:
                Int4OpaqueTensor = None
            if Int4OpaqueTensor is not None:

                def torchao_int4(M: int, szs: List[torch.Tensor] = szs, g: int = g) -> Callable[[], int]:
                    x = torch.randn(M, K, dtype=torch.bfloat16)
                    wts = [Int4OpaqueTensor(w, sz, [1, g], torch.Size([N, K])) for w, sz in zip(ws, szs)]
                    return _sweep(F.linear, [(x, wt) for wt in wts])

                kernels.append(Kernel(f"int4 torchao Int4OpaqueTensor g{g}", nbytes, torchao_int4))

            def torchao_da8w4(M: int, g: int = g) -> Callable[[], int]:
                from torchao.prototype.quantization.int4.inference_workflow import (
                    Int8DynamicActivationInt4WeightConfig,
                )
                from torchao.quantization import quantize_

                x = torch.randn(M, K, dtype=torch.bfloat16)
                w = torch.randn(N, K, dtype=torch.bfloat16)
                layers = []
                for _ in range(n):  # the same float weight, quantized into n separate copies
                    layer = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
                    layer.weight.data = w
                    quantize_(layer, Int8DynamicActivationInt4WeightConfig(group_size=g))
                    layers.append(layer)
                return _sweep(lambda layer: layer(x), [(layer,) for layer in layers])

            kernels.append(Kernel(f"int4 torchao da8w4 (int8 act) g{g}", N * K // 2, torchao_da8w4))
    return kernels


# ----------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------


def run_phase(
    name: str, kernels: List[Kernel], Ms: List[int], threads: List[int], rounds: int
) -> List[Tuple[int, int, str, int, float, float]]:
    """Returns rows (M, threads, kernel, bytes per matrix, median seconds per matrix, best seconds)."""
    rows = []
    for M in Ms:
        torch._dynamo.reset()
        gc.collect()
        runs: Dict[str, Callable[[], int]] = {}
        for k in kernels:
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    runs[k.name] = k.build(M)
                    runs[k.name]()  # warm up
            except Exception as e:  # a kernel this torch/CPU does not have: report, go on
                print(f"  [{name}] M={M} {k.name}: unavailable ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                continue
            print(f"  [{name}] M={M} built {k.name} in {time.perf_counter() - t0:.1f}s", flush=True)
        times: Dict[Tuple[int, str], List[float]] = {}
        pairs = [(t, k) for t in threads for k in kernels if k.name in runs]
        for r in range(rounds):
            shift = r % len(pairs)
            for t, k in pairs[shift:] + pairs[:shift]:
                torch.set_num_threads(t)
                t0 = time.perf_counter()
                count = runs[k.name]()
                times.setdefault((t, k.name), []).append((time.perf_counter() - t0) / count)
        for t in threads:
            for k in kernels:
                if (t, k.name) in times:
                    ts = times[(t, k.name)]
                    rows.append((M, t, k.name, k.bytes_per_matrix, statistics.median(ts), min(ts)))
        del runs
    return rows


def print_table(rows: List[Tuple[int, int, str, int, float, float]], N: int, K: int) -> None:
    baseline = {(M, t): med for M, t, name, _, med, _ in rows if "(baseline)" in name}
    print(f"\nweight {N}x{K}; GB/s counts the bytes of the weight as the kernel stores it (+ scales);")
    print("speedup = median bf16 F.linear time / median kernel time, same M, threads and phase.\n")
    header = f"{'M':>2} {'thr':>3}  {'kernel':<42} {'MB/mat':>7} {'median ms':>9} {'GB/s':>6} {'speedup':>7}"
    print(header)
    print("-" * len(header))
    for M, t, name, nbytes, med, best in sorted(rows, key=lambda r: (r[0], r[1])):
        base = baseline.get((M, t))
        speed = f"{base / med:6.2f}x" if base else "   n/a"
        print(f"{M:>2} {t:>3}  {name:<42} {nbytes / 1e6:7.1f} {med * 1e3:9.3f} {nbytes / med / 1e9:6.1f} {speed:>7}")


Phase = Literal["int8", "int4", "bf16-maxautotune", "int8-maxautotune", "int4-maxautotune"]


def phase_kernels(phase: Phase, N: int, K: int, gb: float, slow_count: int, group_sizes: List[int]) -> List[Kernel]:
    """The bf16 set (the baseline, oneDNN off, gemv.c) and the phase's own kernels."""
    kernels = bf16_kernels(N, K, gb)
    if phase == "int8":
        kernels += int8_kernels(N, K, gb, slow_count)
    elif phase == "bf16-maxautotune":
        kernels += bf16_maxautotune_kernels(N, K, gb)
    elif phase == "int8-maxautotune":
        kernels += int8_maxautotune_kernels(N, K, gb)
    elif phase == "int4":
        kernels += int4_kernels(N, K, gb, group_sizes)
    elif phase == "int4-maxautotune":
        kernels += int4_maxautotune_kernels(N, K, gb, group_sizes[0])
    return kernels


def main(
    shape: str = "10240x2560",
    gb: float = 1.0,
    m: list[int] = [1, 4],
    threads: list[int] = [1, 2],
    rounds: int = 7,
    phases: list[Phase] = ["int8", "int4", "bf16-maxautotune", "int8-maxautotune", "int4-maxautotune"],
    group_sizes: list[int] = [32, 64, 128],
    slow_count: int = 6,
    only: list[str] = [],
) -> None:
    """Time weight-only-quantized linear kernels for batch-1 decode on the CPU against bf16 F.linear.

    Needs torch and this repo's lit_gpt (torchao rows are skipped when it is not installed). Every kernel
    multiplies a small activation (M = 1 or 4 rows) by a weight matrix of shape N x K (default 10240 x 2560,
    phi-2's MLP up-projection). To measure memory, not the cache (some of these machines report a 480 MB L3),
    each kernel cycles through its own set of independent weight matrices of about --gb gigabytes. Kernels
    are timed interleaved: in every round each (threads, kernel) pair times one full sweep over its set, in a
    rotated order, and the table reports medians over rounds. Speedups are against bf16 F.linear measured in
    the same phase (same process, same rounds, same thread count), so the load that other users put on the
    machine affects both sides alike.

    Every phase also times bf16 F.linear with oneDNN off (ATen's GEMV, which our model uses for one row
    where gemv.c cannot be built) and lit_gpt's gemv.c kernels (one row only), beside the baseline.

    Phases, each holding the bf16 set plus its own, to keep memory near 2-3 x --gb. int8: gemv.c;
    aten._weight_int8pack_mm (eager); `F.linear(x, w.to(x.dtype)) * s` under default torch.compile (x 3-D,
    so inductor's woq-int8 pattern rewrites it to that aten op); a fused multiply-reduce under torch.compile;
    torchao's Int8Tensor (eager); dynamic int8 activations with torch._int_mm (not weight-only: it also
    rounds the activations). int4: gemv.c and aten._weight_int4pack_mm_for_cpu (same packed weight) per
    group size, torchao's Int4OpaqueTensor (the CPU layout of PrototypeInt4WeightOnlyConfig, which calls that
    same aten op). bf16-maxautotune, int8-maxautotune, int4-maxautotune: torch.compile(mode="max-autotune")
    with inductor freezing, where inductor may pick its own C++ GEMM templates (each in its own phase:
    freezing marks the weights as frozen and pre-packs copies of them). torchao's da8w4
    (Int8DynamicActivationInt4WeightConfig) needs torch.ops.torchao.da8w4_linear_cpu, which only a torchao
    built with its CPU extension has; the table says so when it is missing.

    For instance: `python scripts/bench_kernels.py` (default shape, M 1 and 4, threads 1 and 2),
    `python scripts/bench_kernels.py --shape 2560x10240 --phases [int4] --rounds 9`,
    `python scripts/bench_kernels.py --phases [int8,int4] --only [aten] --group_sizes [32,128]`.

    Args:
        shape: Weight shape NxK (out x in features).
        gb: Gigabytes of weights each kernel cycles through.
        m: Activation rows, e.g. [1,4].
        threads: torch.set_num_threads values, e.g. [1,2].
        rounds: Timing rounds (the table reports medians over them).
        phases: The phases to run, in order, e.g. [int8,int4].
        group_sizes: int4 group sizes, e.g. [32,128] (int4-maxautotune takes the first).
        slow_count: Matrices for the (*) rows, which dequantize the whole weight per call.
        only: Run only kernels whose name contains one of these, e.g. [aten,gemv] (the baseline always runs).
    """
    try:
        N, K = (int(v) for v in shape.lower().split("x"))
    except ValueError:
        raise InvalidArgument("shape", f"must be NxK (out x in features), e.g. 10240x2560, got {shape!r}")
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads available")
    rows = []
    for phase in phases:
        kernels = phase_kernels(phase, N, K, gb, slow_count, group_sizes)
        if only:
            kernels = [k for k in kernels if "(baseline)" in k.name or any(s in k.name for s in only)]
        print(f"phase {phase}: {len(kernels)} kernels", flush=True)
        phase_rows = run_phase(phase, kernels, m, threads, rounds)
        if rows:  # the bf16 baseline of later phases is only used for their own speedups
            phase_rows = [(M, t, n if not n.startswith("bf16") else f"{n} [{phase}]", b, med, s)
                          for M, t, n, b, med, s in phase_rows]
        print_table(phase_rows, N, K)
        rows += phase_rows
        del kernels
        torch._dynamo.reset()
        gc.collect()
    print("\n(*) timed over --slow_count matrices only: these dequantize the whole matrix per call, so they are")
    print("    compute-bound and the cache does not flatter them.")


if __name__ == "__main__":
    run_cli(main)
