"""Our AVX-512 decode kernels (lit_gpt/gemv.c): results against float32 references, the layers that use
them, and the fallback to PyTorch's kernels where they cannot be built."""

import copy
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import Spy, needs_kernels
from lit_gpt import gemv, quantize
from lit_gpt.model import Linear
from lit_gpt.quantize import Int4Linear, Int8Linear

ROOT = Path(__file__).resolve().parent.parent


def _bf16_linear(in_features: int, out_features: int, bias: bool = True) -> Linear:
    torch.manual_seed(in_features * 31 + out_features)
    layer = Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.05)
        if bias:
            layer.bias.normal_(0, 0.1)
    return layer.to(torch.bfloat16).requires_grad_(False)


def _row(in_features: int) -> torch.Tensor:
    return torch.randn(1, 1, in_features).to(torch.bfloat16)


def _assert_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    # fp32 accumulation, one rounding to bf16 at the end: within a couple of bf16 steps of the output's scale
    err = (y.float() - ref).abs().max().item()
    assert err <= 8e-3 * max(ref.abs().max().item(), 1e-3), (err, ref.abs().max().item())


@needs_kernels
def test_kernels_build_and_load_on_this_machine():
    assert gemv.available()


@needs_kernels
@pytest.mark.parametrize("in_features", [1, 31, 32, 64, 65, 200, 2560, 5000])  # 5000: wide rows, four at a time
@pytest.mark.parametrize("out_features", [1, 5, 64, 130])
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_kernel_matches_float32(in_features, out_features, bias):
    layer = _bf16_linear(in_features, out_features, bias)
    x = _row(in_features)
    y = gemv.linear_bf16(x, layer.weight, layer.bias)
    assert y.shape == (1, 1, out_features) and y.dtype == torch.bfloat16
    _assert_close(y, F.linear(x.float(), layer.weight.float(), None if layer.bias is None else layer.bias.float()))


@needs_kernels
@pytest.mark.parametrize("rows", range(2, gemv.FEW_ROWS + 1))  # each count has its own code
@pytest.mark.parametrize("in_features", [31, 64, 2560])
@pytest.mark.parametrize("out_features", [1, 5, 130])  # 1, 5: fewer rows than one pass takes, and a tail
def test_bf16_kernel_takes_a_few_rows(rows, in_features, out_features):
    layer = _bf16_linear(in_features, out_features, True)
    x = torch.randn(rows, 1, in_features).to(torch.bfloat16)  # a decode step of `rows` sequences
    y = gemv.linear_bf16(x, layer.weight, layer.bias)
    assert y.shape == (rows, 1, out_features) and y.dtype == torch.bfloat16
    _assert_close(y, F.linear(x.float(), layer.weight.float(), layer.bias.float()))


def _x8(x: torch.Tensor) -> torch.Tensor:
    """The activation row as the int8/int4 kernels compute with it (8 bits per block of 32), fp32."""
    return gemv.quantized_activations(x.reshape(-1)).view(x.shape)


@needs_kernels
@pytest.mark.parametrize("in_features", [1, 16, 31, 33, 63, 64, 65, 130, 2560, 6000])  # 6000: a partial block
def test_activations_round_to_8_bits_per_block_of_32(in_features):
    x = _row(in_features).reshape(-1) * 4
    x[in_features // 2] *= 50  # an outlier: its block's step grows, the other blocks' do not
    xq = gemv.quantized_activations(x)
    pad = -in_features % 32
    blocks = F.pad(x.float(), (0, pad)).view(-1, 32)
    step = (blocks.abs().amax(dim=1) / 127).repeat_interleave(32)[:in_features]
    assert ((xq - x.float()).abs() <= step / 2 * (1 + 1e-5)).all()  # round to nearest: half a step at most
    levels = xq / torch.where(step > 0, step, 1)  # whole numbers of steps, at most 127
    assert (levels - levels.round()).abs().max() < 1e-3 and levels.abs().max() <= 127 + 1e-3


@needs_kernels
@pytest.mark.parametrize("in_features", [1, 16, 63, 64, 65, 130, 2560, 6000])  # 6000: a partial block
@pytest.mark.parametrize("out_features", [1, 17, 64])
def test_int8_kernel_matches_dequantized_weight(in_features, out_features, monkeypatch):
    """Against the dequantized weight times the activations as the kernel rounds them: only fp32 summation
    order and the output's rounding to bf16 differ."""
    spy = Spy(monkeypatch, "linear_int8")
    q = Int8Linear.from_linear(_bf16_linear(in_features, out_features))
    x = _row(in_features) * 4  # activations of a few units, as after a LayerNorm
    y = q(x)
    assert spy.calls == 1
    _assert_close(y, F.linear(_x8(x), q.dequantize(), q.bias.float()))


@needs_kernels
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize(("in_features", "out_features"), [(256, 64), (512, 128), (768, 320), (2560, 192)])
def test_int4_kernel_matches_dequantized_weight_and_pytorch(group_size, in_features, out_features, monkeypatch):
    spy = Spy(monkeypatch, "linear_int4")
    q = Int4Linear.from_linear(_bf16_linear(in_features, out_features), group_size)
    x = _row(in_features) * 4
    y = q(x)
    assert spy.calls == 1
    _assert_close(y, F.linear(_x8(x), q.dequantize(), q.bias.float()))
    # PyTorch's own kernel on the same packed weight (where ours decline), with x as it is
    monkeypatch.setattr(gemv, "linear_int4", lambda *args: None)
    _assert_close(q(x), F.linear(x.float(), q.dequantize(), q.bias.float()))


@needs_kernels
@pytest.mark.parametrize("rows", [2, 3, 4, 5, 7, 13, 40])  # int4: up to 4 row by row, then in tiles of 5 rows
@pytest.mark.parametrize(("in_features", "out_features", "group_size"),
                         [(256, 64, 32), (2560, 250, 128), (96, 192, 32)])  # 250: stored as 256 rows
def test_int4_kernels_take_any_number_of_rows(rows, in_features, out_features, group_size, monkeypatch):
    """A decode step of several sequences, a prompt: each row as the one-row product computes it (its own 8-bit
    activations), but for the fp32 summation order; row by row (up to 4 rows) bit for bit the one-row product."""
    spy = Spy(monkeypatch, "linear_int4")
    q = Int4Linear.from_linear(_bf16_linear(in_features, out_features), group_size)
    x = torch.randn(rows, 1, in_features).to(torch.bfloat16) * 4
    y = q(x)
    assert spy.calls == 1 and y.shape == (rows, 1, out_features)
    _assert_close(y, F.linear(torch.stack([_x8(row) for row in x]), q.dequantize(), q.bias.float()))
    if rows < 5:
        assert torch.equal(y[1], q(x[1:2])[0])


@needs_kernels
@pytest.mark.parametrize("rows", [2, 3, 4, 5, 13, 40])  # up to 4 row by row, then in tiles of 5 rows
@pytest.mark.parametrize(("in_features", "out_features"), [(256, 64), (1000, 200), (6000, 17), (65, 130)])
def test_int8_kernels_take_any_number_of_rows(rows, in_features, out_features, monkeypatch):
    """Each row of x with its own 8-bit activations; tiled, the weight rows 64 at a time (the last block partial
    here but for 64 outputs) and the columns 64 at a time (a partial last one but for 256); row by row (up to 4
    rows) bit for bit the one-row product."""
    spy = Spy(monkeypatch, "linear_int8")
    q = Int8Linear.from_linear(_bf16_linear(in_features, out_features))
    x = torch.randn(1, rows, in_features).to(torch.bfloat16) * 4
    y = q(x)
    assert spy.calls == 1 and y.shape == (1, rows, out_features)
    _assert_close(y, F.linear(torch.stack([_x8(row) for row in x[0]]), q.dequantize(), q.bias.float()))
    if rows < 5:
        assert torch.equal(y[:, 1], q(x[:, 1:2])[:, 0])


def _quantized(kind: str, in_features: int, out_features: int):
    layer = _bf16_linear(in_features, out_features)
    return Int8Linear.from_linear(layer) if kind == "int8" else Int4Linear.from_linear(layer, 32)


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("outlier", [1.0, 100.0, 1000.0])
def test_quantized_kernels_error_is_bounded_by_the_activations_rounding(kind, outlier):
    """The int8/int4 kernels round the activations to 8 bits per block of 32 (as llama.cpp's q8_0 does). With an
    outlier channel (as LayerNorm outputs have) only its own block loses precision: the error against the exact
    product stays within half a step per value times the weights' magnitude, plus the output's bf16 rounding."""
    q = _quantized(kind, 2560, 256)
    x = _row(2560)
    x[..., 300] = outlier
    w = q.dequantize()
    ref = F.linear(x.float(), w, q.bias.float())
    step = x.float().view(-1, 32).abs().amax(dim=1) / 127
    bound = (w.abs().view(256, -1, 32).sum(dim=2) * step / 2).sum(dim=1)  # per output
    err = (q(x).float() - ref).abs().view(-1)
    assert (err <= bound + 8e-3 * ref.abs().view(-1) + 1e-3).all(), (err - bound).max()


@needs_kernels
@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_quantized_kernels_pass_a_nan_or_infinite_activation_on(kind, bad):
    q = _quantized(kind, 512, 64)
    x = _row(512)
    x[..., 7] = bad
    assert torch.isnan(q(x)).all()
    for rows in (3, 9):  # (int4: row by row, tiled) in a step of several sequences, a prompt: that row only
        y = q(torch.cat([_row(512)] * (rows // 2) + [x] + [_row(512)] * (rows // 2)))
        assert torch.isnan(y[rows // 2]).all() and not torch.isnan(torch.cat([y[: rows // 2], y[rows // 2 + 1:]])).any()


def test_int8_prompt_without_the_kernels_multiplies_by_bf16_tiles_of_the_dequantized_weight(monkeypatch):
    """Where our kernels decline (another CPU, LIT_GPT_GEMV=0), an int8 layer given DEQUANTIZED_MIN_ROWS rows or more
    computes x @ dequantize(bf16).T with the bf16 matrix product, a tile of rows at a time (here 128 + 128 + 64
    rows), not through PyTorch's int8 kernel; fewer rows take that kernel. Both agree with the dequantized
    reference."""
    monkeypatch.setattr(gemv, "linear_int8", lambda *args: None)
    monkeypatch.setattr(quantize, "_TILE_ELEMENTS", 128 * 512)
    q = _quantized("int8", 512, 320)
    x = torch.randn(2, quantize.DEQUANTIZED_MIN_ROWS, 512).to(torch.bfloat16)
    ref = F.linear(x.float(), q.dequantize(torch.bfloat16).float(), q.bias.float())
    few = x[:1, : quantize.DEQUANTIZED_MIN_ROWS - 1]
    _assert_close(q(few), ref[:1, : quantize.DEQUANTIZED_MIN_ROWS - 1])  # PyTorch's int8 kernel

    class NoInt8Kernel:
        def __getattr__(self, name):
            raise AssertionError(f"aten.{name} called")

    tiles, mul = [], torch.mul
    monkeypatch.setattr(quantize, "aten", NoInt8Kernel())
    monkeypatch.setattr(torch, "mul", lambda *args, **kw: tiles.append(mul(*args, **kw)) or tiles[-1])
    with torch.inference_mode():
        y = q(x)
    assert [len(tile) for tile in tiles] == [128, 128, 64] and y.shape == (2, quantize.DEQUANTIZED_MIN_ROWS, 320)
    assert torch.equal(torch.cat(tiles), q.dequantize(torch.bfloat16))  # the tiles: dequantize's bf16, exactly
    _assert_close(y, ref)


@needs_kernels
def test_int4_rows_not_a_multiple_of_64_take_pytorchs_kernel(monkeypatch):
    spy = Spy(monkeypatch, "linear_int4")
    q = Int4Linear.from_linear(_bf16_linear(256, 96), 32)  # 96 rows pad to 96, not a whole 64-row block
    x = _row(256)
    _assert_close(q(x), F.linear(x.float(), q.dequantize(), q.bias.float()))
    assert spy.calls == 0


@needs_kernels
def test_linear_routes_a_few_rows_to_the_kernel_and_more_rows_to_pytorch(monkeypatch):
    spy = Spy(monkeypatch, "linear_bf16")
    layer = _bf16_linear(128, 64)
    x = torch.randn(1, gemv.FEW_ROWS + 1, 128).to(torch.bfloat16)
    full = layer(x)
    assert spy.calls == 0
    one, few = layer(x[:, 1:2]), layer(x[:, 1:4])
    assert spy.calls == 2
    _assert_close(one, full[:, 1:2].float())
    _assert_close(few, full[:, 1:4].float())


@needs_kernels
def test_training_keeps_autograd(monkeypatch):
    spy = Spy(monkeypatch, "linear_bf16")
    layer = _bf16_linear(64, 32).requires_grad_(True)
    layer(_row(64)).sum().backward()
    assert spy.calls == 0 and layer.weight.grad is not None


@needs_kernels
def test_same_result_with_one_and_two_threads():
    layer = _bf16_linear(512, 1024)
    x = torch.randn(5, 512).to(torch.bfloat16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv.linear_bf16(x, layer.weight, layer.bias)
        torch.set_num_threads(2)
        two = gemv.linear_bf16(x, layer.weight, layer.bias)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)  # each row is summed by one thread, in the same order


class OneDnnAtCalls:
    """Stands in for a PyTorch function: records whether oneDNN was on at each call, and calls it."""

    def __init__(self, fn) -> None:
        self.fn, self.enabled = fn, []

    def __call__(self, *args, **kwargs):
        self.enabled.append(torch.backends.mkldnn.enabled)
        return self.fn(*args, **kwargs)


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_pytorchs_one_row_product_runs_without_onednn(kind, monkeypatch):
    """Where our kernels decline a row, PyTorch's product of one row runs with oneDNN off (ATen's GEMV streams the
    weights faster), of more rows with oneDNN on; the switch is back on afterwards."""
    layer = _bf16_linear(256, 64) if kind == "bf16" else _quantized(kind, 256, 64)
    for op in ("linear_bf16", "linear_int8", "linear_int4"):
        monkeypatch.setattr(gemv, op, lambda *args: None)
    if kind == "bf16":
        spy = OneDnnAtCalls(F.linear)
        monkeypatch.setattr(F, "linear", spy)
    else:
        name = "_weight_int8pack_mm" if kind == "int8" else "_weight_int4pack_mm_for_cpu"
        spy = OneDnnAtCalls(getattr(torch.ops.aten, name))
        monkeypatch.setattr(quantize, "aten", SimpleNamespace(**{name: spy}))
    x = torch.randn(1, 3, 256).to(torch.bfloat16)
    with torch.inference_mode():
        one, three = layer(x[:, :1]), layer(x)
    assert spy.enabled == [False, True] and torch.backends.mkldnn.enabled
    _assert_close(one, three[:, :1].float())


def _bf16(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).to(torch.bfloat16)


W, X, Q, K = _bf16(64, 32), _bf16(1, 32), _bf16(1, 2, 1, 16), _bf16(1, 2, 8, 16)
QKV, COS, POS = _bf16(1, 1, 96), torch.ones(1, 8), torch.tensor([3])  # 2 heads, 2 groups: 2 * 3 * 16
INT4, INT4_SCALES = torch.zeros(64, 16, dtype=torch.uint8), _bf16(1, 1, 64)  # scales block by block
# the weights of qkv, proj, fc and the MLP's proj of a block with 2 heads of 16 (n_embd 32), proj with a bias
BLOCK_WEIGHTS = [(_bf16(96, 32), None), (_bf16(32, 32), _bf16(32)), (_bf16(64, 32), None), (_bf16(32, 64), None)]
INT8_MLP_PROJ = (torch.ones(32, 64, dtype=torch.int8), _bf16(32), None)
NORM = (_bf16(32), _bf16(32), None)  # a parallel block's layer norm
RMS_NORMS = (_bf16(32), None, _bf16(32))  # a sequential block's two RMS norms
GATE_UP = (_bf16(128, 32), None)  # a sequential block's fc: gate and up, 64 each, for the MLP's proj (32, 64)


def _blocks(rows: int = 1, int8_mlp_proj: bool = False, n_head: int = 2, declined_layer: bool = False,
            norm: tuple = NORM, row: Optional[int] = None, fc: tuple = BLOCK_WEIGHTS[2], kinds: str = "same"):
    """decode_blocks through two blocks of BLOCK_WEIGHTS (parallel ones with NORM; sequential ones with RMS_NORMS and
    GATE_UP as fc; the MLP's proj in int8, or a layer that the kernels did not take; kinds="mixed": the second block
    of the other kind) for `rows` sequences at position 3 of a cache of 8 (2 rows; or its row `row`)."""
    matrices = [gemv.bf16_matrix(w, b) for w, b in BLOCK_WEIGHTS]
    matrices[2] = gemv.bf16_matrix(*fc)
    if int8_mlp_proj:
        matrices[3] = gemv.int8_matrix(*INT8_MLP_PROJ)
    if declined_layer:
        matrices[3] = None
    norms = [norm, norm if kinds == "same" else (NORM if norm is RMS_NORMS else RMS_NORMS)]
    layers = [gemv.DecodeLayer(*n, matrices, K.expand(2, 2, 8, 16).clone(), K.expand(2, 2, 8, 16).clone())
              for n in norms]
    x = X.view(1, 1, 32).expand(rows, 1, 32).contiguous()
    return gemv.decode_blocks(gemv.plan_blocks(layers, n_head), x, COS, COS, POS, 8, 0.25, 1e-5, row=row)

DECLINED = {  # calls the kernels cannot take, each one defect away from an `ok` call that they take
    "ok": lambda: gemv.linear_bf16(X, W, None),
    "float32 row": lambda: gemv.linear_bf16(X.float(), W, None),
    "float32 weight": lambda: gemv.linear_bf16(X, W.float(), None),
    "more rows than FEW_ROWS": lambda: gemv.linear_bf16(X.expand(gemv.FEW_ROWS + 1, 32).contiguous(), W, None),
    "row of another width": lambda: gemv.linear_bf16(X[:, :16], W, None),
    "bias of another size": lambda: gemv.linear_bf16(X, W, _bf16(8)),
    "float32 bias": lambda: gemv.linear_bf16(X, W, torch.zeros(64)),
    "non-contiguous weight": lambda: gemv.linear_bf16(X, W.t().contiguous().t(), None),
    "weight needing grad": lambda: gemv.linear_bf16(X, W.clone().requires_grad_(), None),
    "meta device": lambda: gemv.linear_bf16(X.to("meta"), W.to("meta"), None),
    "int8 ok": lambda: gemv.linear_int8(X, W.to(torch.int8), _bf16(64), None),
    "int8 float32 scales": lambda: gemv.linear_int8(X, W.to(torch.int8), torch.ones(64), None),
    "int8 bf16 weight": lambda: gemv.linear_int8(X, W, _bf16(64), None),
    "int4 ok": lambda: gemv.linear_int4(X, INT4, INT4_SCALES, None, 60, 32),
    "int4 rows not whole blocks of 64": lambda: gemv.linear_int4(X, INT4[:48], INT4_SCALES[:, :, :48], None, 40, 32),
    "int4 scales as PyTorch's pairs": lambda: gemv.linear_int4(X, INT4, _bf16(1, 64, 2), None, 60, 32),
    "int4 group size not dividing": lambda: gemv.linear_int4(X, INT4, INT4_SCALES, None, 60, 24),
    "int4 more outputs than rows": lambda: gemv.linear_int4(X, INT4, INT4_SCALES, None, 65, 32),
    "attend_one ok": lambda: gemv.attend_one(Q, K, K, POS, 0.25),
    "attend_one two queries": lambda: gemv.attend_one(Q.expand(1, 2, 2, 16).contiguous(), K, K, POS, 0.25),
    "attend_one head over MAX_HEAD_SIZE": lambda: gemv.attend_one(
        _bf16(1, 2, 1, gemv.MAX_HEAD_SIZE + 16), *[_bf16(1, 2, 8, gemv.MAX_HEAD_SIZE + 16)] * 2, POS, 0.25),
    "attend_one float32 cache": lambda: gemv.attend_one(Q, K.float(), K.float(), POS, 0.25),
    "attend_decode ok": lambda: gemv.attend_decode(QKV, COS, COS, K.clone(), K.clone(), POS, 2, 8, 0.25),
    "attend_decode float positions": lambda: gemv.attend_decode(QKV, COS, COS, K.clone(), K.clone(), POS.float(), 2, 8,
                                                                0.25),
    "attend_decode two positions for one sequence": lambda: gemv.attend_decode(QKV, COS, COS, K.clone(), K.clone(),
                                                                               POS.repeat(2), 2, 8, 0.25),
    "attend_decode two tokens": lambda: gemv.attend_decode(QKV.expand(1, 2, 96).contiguous(), COS, COS, K.clone(),
                                                           K.clone(), POS, 2, 8, 0.25),
    "gelu ok": lambda: gemv.gelu_tanh(X),
    "gelu float32": lambda: gemv.gelu_tanh(X.float()),
    "gelu more rows than FEW_ROWS": lambda: gemv.gelu_tanh(X.expand(gemv.FEW_ROWS + 1, 32).contiguous()),
    "gelu needing grad": lambda: gemv.gelu_tanh(X.clone().requires_grad_()),
    "gelu non-contiguous": lambda: gemv.gelu_tanh(X.expand(2, 32).t()),
    "silu_mul ok": lambda: gemv.silu_mul(X),
    "silu_mul an odd width": lambda: gemv.silu_mul(X[:, :31]),
    "silu_mul float32": lambda: gemv.silu_mul(X.float()),
    "silu_mul more rows than FEW_ROWS": lambda: gemv.silu_mul(X.expand(gemv.FEW_ROWS + 1, 32).contiguous()),
    "decode_blocks ok": lambda: _blocks(),
    "decode_blocks int8 ok": lambda: _blocks(int8_mlp_proj=True),
    "decode_blocks two rows ok": lambda: _blocks(rows=2),
    "decode_blocks cache row 1 ok": lambda: _blocks(row=1),
    "decode_blocks a layer the kernels cannot take": lambda: _blocks(declined_layer=True),
    "decode_blocks int8 two rows ok": lambda: _blocks(rows=2, int8_mlp_proj=True),
    "decode_blocks heads of another size": lambda: _blocks(n_head=4),
    "decode_blocks a float32 norm": lambda: _blocks(norm=(torch.ones(32), torch.zeros(32), None)),
    "decode_blocks a row past the cache's rows": lambda: _blocks(row=2),
    "decode_blocks sequential ok": lambda: _blocks(norm=RMS_NORMS, fc=GATE_UP),
    "decode_blocks sequential int8 ok": lambda: _blocks(norm=RMS_NORMS, fc=GATE_UP, int8_mlp_proj=True),
    "decode_blocks sequential two rows ok": lambda: _blocks(norm=RMS_NORMS, fc=GATE_UP, rows=2),
    "decode_blocks sequential with a parallel block's fc": lambda: _blocks(norm=RMS_NORMS),
    "decode_blocks parallel with a sequential block's fc": lambda: _blocks(fc=GATE_UP),
    "decode_blocks sequential with a norm bias": lambda: _blocks(norm=(RMS_NORMS[0], NORM[1], RMS_NORMS[2]),
                                                                 fc=GATE_UP),
    "decode_blocks sequential a float32 second norm": lambda: _blocks(norm=(RMS_NORMS[0], None, torch.ones(32)),
                                                                      fc=GATE_UP),
    "decode_blocks blocks of both kinds": lambda: _blocks(norm=RMS_NORMS, fc=GATE_UP, kinds="mixed"),
    "layer_norm ok": lambda: gemv.layer_norm(X, *NORM[:2], 1e-5),
    "layer_norm without a bias": lambda: gemv.layer_norm(X, NORM[0], None, 1e-5),
    "layer_norm float32": lambda: gemv.layer_norm(X.float(), *NORM[:2], 1e-5),
    "layer_norm weight of another size": lambda: gemv.layer_norm(X, _bf16(16), _bf16(16), 1e-5),
    "rms_norm ok": lambda: gemv.rms_norm(X, RMS_NORMS[0], 1e-5),
    "rms_norm float32 weight": lambda: gemv.rms_norm(X, torch.ones(32), 1e-5),
    "rms_norm weight of another size": lambda: gemv.rms_norm(X, _bf16(16), 1e-5),
    "rms_norm more rows than FEW_ROWS": lambda: gemv.rms_norm(X.expand(gemv.FEW_ROWS + 1, 32).contiguous(),
                                                              RMS_NORMS[0], 1e-5),
    "attend_decode qkv of another width": lambda: gemv.attend_decode(QKV[..., :80], COS, COS, K.clone(), K.clone(),
                                                                     POS, 2, 8, 0.25),
}


@needs_kernels
@pytest.mark.parametrize("case", DECLINED)
def test_operations_decline_what_the_kernels_cannot_take(case):
    """Each operation returns None (for PyTorch to compute) for inputs the kernels cannot take, and a result for
    the same call without the defect."""
    y = DECLINED[case]()
    assert (y is not None) == case.endswith("ok"), case


@pytest.mark.slow
def test_without_kernels_every_operation_declines(tmp_path):
    code = ("import torch; from lit_gpt import gemv; bf16 = torch.bfloat16; x = torch.ones(1, 64, dtype=bf16); "
            "print(gemv.linear_bf16(x, torch.ones(8, 64, dtype=bf16), None) is None, "
            "gemv.linear_int8(x, torch.ones(8, 64, dtype=torch.int8), torch.ones(8, dtype=bf16), None) is None, "
            "gemv.attend_one(torch.ones(1, 1, 1, 8, dtype=bf16), *[torch.ones(1, 1, 4, 8, dtype=bf16)] * 2, "
            "torch.tensor([1]), 1.0) is None, gemv.available())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), "LIT_GPT_GEMV": "0"})
    assert proc.stdout.split() == ["True", "True", "True", "False"], proc.stderr
    assert not list(tmp_path.rglob("*.so"))


@pytest.mark.slow
@needs_kernels
def test_the_first_call_loads_the_kernels(tmp_path):
    """No need to ask first: an operation's first call builds and loads the library."""
    code = ("import torch; from lit_gpt import gemv; w, x = torch.randn(8, 64), torch.randn(1, 64); "
            "y = gemv.linear_bf16(x.bfloat16(), w.bfloat16(), None); "
            "print(y is not None and bool(((y.float() - x.bfloat16().float() @ w.bfloat16().float().t()).abs() < 0.1).all()))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    assert proc.stdout.split() == ["True"], proc.stderr


@needs_kernels
@pytest.mark.parametrize(("kind", "op"), [("bf16", "linear_bf16"), ("int8", "linear_int8"), ("int4", "linear_int4"),
                                          ("layer norm", "layer_norm"), ("rms norm", "rms_norm"),
                                          ("swiglu", "silu_mul")])
def test_under_torch_compile_the_same_calls_are_custom_ops(kind, op):
    from lit_gpt.config import Config
    from lit_gpt.model import MLP, LayerNorm, RMSNorm

    if kind == "layer norm":
        layer = LayerNorm(256).to(torch.bfloat16).requires_grad_(False)
    elif kind == "rms norm":
        layer = RMSNorm(256, 1e-5).to(torch.bfloat16).requires_grad_(False)
    elif kind == "swiglu":
        config = Config.from_name("Phi-3-mini-4k-instruct", n_embd=256, intermediate_size=128, n_head=4)
        layer = MLP(config).to(torch.bfloat16).requires_grad_(False)
    else:
        layer = _bf16_linear(256, 64) if kind == "bf16" else _quantized(kind, 256, 64)
    x = _row(256)
    assert gemv.available()  # loaded before tracing, as compile_decode does
    traced = []

    def backend(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    with torch.inference_mode():
        y = torch.compile(layer, backend=backend, fullgraph=True, dynamic=False)(x)
        assert torch.equal(y, layer(x))
    assert any(f"lit_gpt.{op}" in t for t in traced), traced


PROBE = (
    "import torch; from lit_gpt import gemv; from lit_gpt.model import Linear; "
    "layer = Linear(64, 8).to(torch.bfloat16); x = torch.randn(1, 64).to(torch.bfloat16); "
    "y = layer(x); print(gemv.available(), bool(torch.isfinite(y).all()))"
)


def _probe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path), **env})


@pytest.mark.slow
def test_disabled_by_environment_falls_back_to_pytorch(tmp_path):
    proc = _probe(tmp_path, LIT_GPT_GEMV="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
    assert not list(tmp_path.rglob("*.so"))  # nothing was built


@pytest.mark.slow
@needs_kernels
def test_a_failing_compiler_gives_one_note_and_falls_back(tmp_path):
    proc = _probe(tmp_path, CC="false")  # `false` exists and fails, as a broken toolchain would
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
    notes = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("note: lit_gpt's AVX-512 decode kernels are not available")
    assert not list(tmp_path.rglob("*.so*"))  # no half-built library left in the cache


def _compiler(tmp_path: Path, name: str, version: str = "") -> str:
    """A C compiler that passes everything on to cc, but fails a build where $CC_REFUSE is set, and appends
    `version` to what `--version` says (a compiler of its own for the build cache)."""
    script = tmp_path / name
    script.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then cc --version; echo "{version}"; exit 0; fi\n'
                      '[ -z "$CC_REFUSE" ] || exit 1\nexec cc "$@"\n')
    script.chmod(0o755)
    return str(script)


@pytest.mark.slow
@needs_kernels
def test_built_once_then_loaded_from_the_cache(tmp_path):
    cc = _compiler(tmp_path, "cc-wrapper")
    first = _probe(tmp_path, CC=cc)
    assert first.returncode == 0 and first.stdout.split() == ["True", "True"], first.stderr
    built = list((tmp_path / "lit_gpt").glob("gemv-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    second = _probe(tmp_path, CC=cc, CC_REFUSE="1")  # a rebuild would fail: the cached library must be used
    assert second.stdout.split() == ["True", "True"], second.stderr
    assert built[0].stat().st_mtime_ns == stamp


@pytest.mark.slow
@needs_kernels
def test_another_compiler_builds_a_library_of_its_own(tmp_path):
    """The build cache is keyed by the compiler (its path and --version) besides the source and the flags."""
    for name, version in (("cc-wrapper", "1"), ("cc-wrapper", "2"), ("cc-other", "2")):
        proc = _probe(tmp_path, CC=_compiler(tmp_path, name, version))
        assert proc.stdout.split() == ["True", "True"], proc.stderr
    assert len(list((tmp_path / "lit_gpt").glob("gemv-*.so"))) == 3


@needs_kernels
@pytest.mark.parametrize("name", ["MAX_HEAD_SIZE", "FEW_ROWS"])
def test_the_source_takes_its_limits_from_the_build(tmp_path, name):
    """MAX_HEAD_SIZE and FEW_ROWS are set in one place, gemv.py's flags: gemv.c does not build without them."""
    flags = [f for f in gemv.CFLAGS if not f.startswith(f"-D{name}=")]
    assert len(flags) == len(gemv.CFLAGS) - 1
    proc = subprocess.run([os.environ.get("CC", "cc"), *flags, str(gemv.SOURCE), "-o", str(tmp_path / "gemv.so")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and name in proc.stderr


@needs_kernels
@pytest.mark.parametrize(("batch", "n_head", "n_groups", "head_size", "length"),
                         [(1, 32, 32, 80, 1), (1, 32, 32, 80, 100), (2, 4, 2, 20, 17), (3, 8, 1, 64, 40),
                          (1, 2, 2, 256, 5), (1, 4, 4, 33, 33)])
def test_attention_kernel_matches_float32(batch, n_head, n_groups, head_size, length):
    torch.manual_seed(length)
    cache = 48 if length <= 48 else 128
    q = torch.randn(batch, n_head, 1, head_size).to(torch.bfloat16)
    k, v = (torch.randn(batch, n_groups, cache, head_size).to(torch.bfloat16) for _ in range(2))
    scale = head_size ** -0.5
    y = gemv.attend_one(q, k, v, torch.tensor([length - 1]), scale)  # the query sits at position length - 1
    assert y.shape == q.shape and y.dtype == torch.bfloat16
    ref = F.scaled_dot_product_attention(q.float(), k[:, :, :length].float(), v[:, :, :length].float(), scale=scale,
                                         enable_gqa=n_head != n_groups)
    _assert_close(y, ref)


def _prefill_then_decode(model, idx: torch.Tensor, prefill: int = 5) -> torch.Tensor:
    """The last-position logits of a prefill of `prefill` tokens, then of each later token decoded one by one."""
    with torch.inference_mode():
        steps = [model(idx[:, :prefill], torch.arange(prefill))[:, -1]]
        steps += [model(idx[:, i : i + 1], torch.tensor([i]))[:, -1] for i in range(prefill, idx.size(1))]
    return torch.stack(steps, dim=1)


@pytest.mark.slow
@needs_kernels
def test_bf16_model_decode_through_the_kernels_matches_its_full_forward(monkeypatch):
    from lit_gpt.config import Config
    from lit_gpt.model import GPT

    spies = [Spy(monkeypatch, "linear_bf16"), Spy(monkeypatch, "decode_blocks"), Spy(monkeypatch, "gelu_tanh")]
    config = Config.from_name("phi-1_5", n_layer=2, n_embd=256, n_head=4, intermediate_size=1024, block_size=64,
                              vocab_size=512, padded_vocab_size=512, rotary_percentage=0.5)
    torch.manual_seed(0)
    model = GPT(config).to(torch.bfloat16).eval()
    idx = torch.randint(0, 512, (1, gemv.FEW_ROWS + 5))  # the full forward: too many rows for the kernels
    with torch.inference_mode():
        full = model(idx).float()
    model.set_kv_cache(1)
    decoded = _prefill_then_decode(model, idx).float()
    # the 5-token prefill took the products' and GELU's kernels, every one-row step the blocks' kernel (the whole
    # step through both blocks) and the LM head's product
    assert spies[0].calls == 2 * 4 + 1 + gemv.FEW_ROWS and spies[1].calls == gemv.FEW_ROWS
    assert spies[2].calls == 2
    err = (decoded - full[:, 4:]).abs().max().item()
    assert err <= 0.03 * full.abs().max().item(), err


@needs_kernels
@pytest.mark.parametrize(("batch", "n_head", "n_groups", "rotary_percentage"),
                         [(1, 4, 4, 0.5), (2, 8, 2, 0.4), (3, 4, 1, 1.0)])
@pytest.mark.slow
def test_fused_decode_attention_equals_the_pytorch_ops_bit_for_bit(monkeypatch, batch, n_head, n_groups,
                                                                    rotary_percentage):
    """attend_decode (rotary embedding, cache write and attention in one call) computes what the model's
    PyTorch ops around attend_one compute: the same logits and the same cache, to the bit."""
    from lit_gpt.config import Config
    from lit_gpt.model import GPT

    config = Config.from_name("phi-1_5", n_layer=2, n_embd=320, n_head=n_head, n_query_groups=n_groups,
                              intermediate_size=640, block_size=64, vocab_size=512, padded_vocab_size=512,
                              rotary_percentage=rotary_percentage)
    torch.manual_seed(0)
    model = GPT(config).to(torch.bfloat16).eval()
    idx = torch.randint(0, 512, (batch, 12))

    def decode():
        model.set_kv_cache(batch, 40)
        logits = _prefill_then_decode(model, idx)
        caches = [t.clone() for block in model.transformer.h for t in (block.attn.kv_cache.k, block.attn.kv_cache.v)]
        return logits, caches

    monkeypatch.setattr(gemv, "decode_blocks", lambda *args: None)  # the blocks' calls one by one
    fused = Spy(monkeypatch, "attend_decode")
    logits, caches = decode()
    assert fused.calls == 7 * 2
    monkeypatch.setattr(gemv, "attend_decode", lambda *args: None)  # declined: the PyTorch ops, then attend_one
    separate = Spy(monkeypatch, "attend_one")
    logits_ref, caches_ref = decode()
    assert separate.calls == 7 * 2
    assert torch.equal(logits, logits_ref)
    assert all(torch.equal(a, b) for a, b in zip(caches, caches_ref))


@needs_kernels
@pytest.mark.parametrize(("name", "sliding_window"), [("phi-1_5", None), ("Phi-3-mini-4k-instruct", 6)])
def test_fused_decode_takes_each_sequence_at_its_own_position(monkeypatch, name, sliding_window):
    """A batched decode step (continuous batching: the cache's first rows, each at its own position) through
    attend_decode writes the cache as the PyTorch ops do, to the bit (the first block's: later ones see the
    attention's rounding), and attends as PyTorch's masked attention."""
    from lit_gpt.config import Config
    from lit_gpt.model import GPT

    config = Config.from_name(name, n_layer=2, n_embd=320, n_head=8, n_query_groups=2, intermediate_size=640,
                              block_size=64, vocab_size=512, padded_vocab_size=512, sliding_window=sliding_window)
    torch.manual_seed(0)
    model = GPT(config).to(torch.bfloat16).eval()
    lengths = [3, 9, 14]
    idx = torch.randint(0, 512, (len(lengths), 20))

    def decode():
        model.set_kv_cache(len(lengths) + 1, 40)  # a row more than the steps use: an idle slot
        with torch.inference_mode():
            for row, n in enumerate(lengths):
                model(idx[row:row + 1, :n], torch.arange(n), row=row)
            pos = torch.tensor(lengths).view(-1, 1)
            logits = [model(idx[:, t:t + 1], pos + step) for step, t in enumerate((18, 19))]  # two steps
        caches = [t.clone() for block in model.transformer.h for t in (block.attn.kv_cache.k, block.attn.kv_cache.v)]
        return torch.cat(logits, dim=1).float(), caches

    monkeypatch.setattr(gemv, "decode_blocks", lambda *args: None)  # the blocks' calls one by one
    fused = Spy(monkeypatch, "attend_decode")
    logits, caches = decode()
    assert fused.calls == 2 * 2
    monkeypatch.setattr(gemv, "attend_decode", lambda *args: None)  # declined: PyTorch's ops and masked attention
    logits_ref, caches_ref = decode()
    assert torch.equal(caches[0], caches_ref[0]) and torch.equal(caches[1], caches_ref[1])
    assert not caches[0][len(lengths)].any()  # the idle row untouched
    assert (logits - logits_ref).abs().max().item() <= 0.02 * logits_ref.abs().max().item()


@needs_kernels
@pytest.mark.parametrize("mode", ["bf16", "int8", "int4"])
def test_the_blocks_in_one_call_equal_their_calls_one_by_one_bit_for_bit(monkeypatch, mode):
    """gemv.parallel_blocks (a decode step through all of phi-2's blocks, from C) computes what the blocks' calls one
    by one compute (layer norms, products, attend_decode, GELU, residual sums): the same logits and caches, to the
    bit; for one sequence, for a row of the cache (a server's one-token prompt), and for a batch at its own
    positions."""
    from lit_gpt.config import Config
    from lit_gpt.model import GPT

    # every matrix a multiple of 64 rows, as gemv.c's int4 layout needs
    config = Config.from_name("phi-1_5", n_layer=2, n_embd=256, n_head=4, n_query_groups=2, intermediate_size=512,
                              block_size=64, vocab_size=512, padded_vocab_size=512, rotary_percentage=0.5)
    torch.manual_seed(0)
    model = GPT(config).to(torch.bfloat16).eval()
    if mode != "bf16":
        quantize.quantize_model(model, mode)
    idx = torch.randint(0, 512, (3, 20))
    lengths = [9, 1, 14]  # row 1: a one-token prompt, one step through the blocks

    def decode():
        with torch.inference_mode():
            model.set_kv_cache(1, 40)
            one = _prefill_then_decode(model, idx[:1, :12])
            model.set_kv_cache(len(lengths) + 1, 40)  # a row more than the steps use: an idle slot
            for row, n in enumerate(lengths):
                model(idx[row:row + 1, :n], torch.arange(n), row=row)
            pos = torch.tensor(lengths).view(-1, 1)
            batch = torch.cat([model(idx[:, t:t + 1], pos + step) for step, t in enumerate((18, 19))], dim=1)
        caches = [t.clone() for block in model.transformer.h for t in (block.attn.kv_cache.k, block.attn.kv_cache.v)]
        return one, batch, caches

    fused = Spy(monkeypatch, "decode_blocks")
    one, batch, caches = decode()
    # 7 one-row steps, the one-token prompt of row 1, and the 2 batched steps
    assert fused.calls == 7 + 1 + 2
    monkeypatch.setattr(gemv, "decode_blocks", lambda *args: None)
    one_ref, batch_ref, caches_ref = decode()
    assert torch.equal(one, one_ref) and torch.equal(batch, batch_ref)
    assert all(torch.equal(a, b) for a, b in zip(caches, caches_ref))
    assert not caches[0][len(lengths)].any()  # the idle row untouched


@needs_kernels
def test_the_blocks_plan_is_kept_across_steps_and_made_again_when_the_blocks_change(monkeypatch):
    """The model keeps its blocks' plan (decode_blocks' arguments, gathered and checked once) from step to step, and
    makes it again when a cache, a layer, a weight or a weight's data is replaced: each step equals the blocks'
    calls one by one on the model as it is then, bit for bit (a stale plan would compute with what was replaced)."""
    from torch import nn

    from lit_gpt.config import Config
    from lit_gpt.model import GPT

    config = Config.from_name("phi-1_5", n_layer=2, n_embd=256, n_head=4, intermediate_size=512, block_size=64,
                              vocab_size=512, padded_vocab_size=512)
    torch.manual_seed(0)
    model = GPT(config).to(torch.bfloat16).eval()
    gathered = Spy(monkeypatch, "plan_blocks")
    real_blocks = gemv.decode_blocks
    position = iter(range(64))

    def step_equals_the_calls_one_by_one():
        token, pos = torch.randint(0, 512, (1, 1)), torch.tensor([next(position)])
        fused = model(token, pos)
        monkeypatch.setattr(gemv, "decode_blocks", lambda *args: None)
        one_by_one = model(token, pos)  # the same position again: the cache gets the same keys and values
        monkeypatch.setattr(gemv, "decode_blocks", real_blocks)
        assert torch.equal(fused, one_by_one)

    def replace_a_weight(m):
        fc = m.transformer.h[1].mlp.fc
        fc.weight = nn.Parameter(fc.weight * 2, requires_grad=False)

    def move_a_weights_data(m):
        m.transformer.h[0].attn.proj.weight.data = m.transformer.h[0].attn.proj.weight.data * 3

    changes = [lambda m: m.set_kv_cache(1, 64), replace_a_weight, move_a_weights_data,
               lambda m: quantize.quantize_model(m, "int4")]
    with torch.inference_mode():
        model.set_kv_cache(1, 64)
        for _ in range(3):
            step_equals_the_calls_one_by_one()
        assert gathered.calls == 1  # one plan for the three steps
        for n, change in enumerate(changes, start=2):
            change(model)
            if n == 2:  # a new cache: the positions start again
                position = iter(range(64))
            for _ in range(2):
                step_equals_the_calls_one_by_one()
            assert gathered.calls == n, n
        # a pickled or copied model makes its own plan (this one holds this model's addresses)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        copied = copy.deepcopy(model)
        token, pos = torch.tensor([[7]]), torch.tensor([next(position)])
        assert torch.equal(copied(token, pos), model(token, pos))
        assert copied._decode_plan[2].fields[0] != model._decode_plan[2].fields[0]


@needs_kernels
def test_a_decode_step_past_the_cache_raises_without_writing_out_of_bounds():
    """A position past the cache is not written out of bounds: attend_decode, or the PyTorch path, raises."""
    from lit_gpt.config import Config
    from lit_gpt.model import GPT

    config = Config.from_name("phi-1_5", n_layer=1, n_embd=64, n_head=2, intermediate_size=128, block_size=64,
                              vocab_size=128, padded_vocab_size=128)
    model = GPT(config).to(torch.bfloat16).eval()
    model.set_kv_cache(1, 8)
    with torch.inference_mode(), pytest.raises((IndexError, RuntimeError)):
        model(torch.tensor([[1]]), torch.tensor([8]))



OUT_OF_MEMORY_PROBE = """
import resource, torch
from lit_gpt import gemv
torch.set_num_threads(2)
assert gemv.available()
bf16, K, S = torch.bfloat16, 1 << 25, 1 << 25
# the kernels' thread pool started before the limits below (a tiled product allocates in its threads)
gemv.linear_int8(torch.ones(2, 64, dtype=bf16), torch.ones(1, 64, dtype=torch.int8), torch.ones(1, dtype=bf16), None)
# each call needs >= 64 MB of scratch: the 8-bit copy of a 32M-column row and its steps, or 32M attention scores per
# thread (zero-filled inputs are only reserved address space, not memory)
one, row = torch.ones(1, dtype=bf16), torch.ones(1, K, dtype=bf16)
int8, int4 = torch.zeros(1, K, dtype=torch.int8), torch.zeros(64, K // 2, dtype=torch.uint8)
int4_scales = torch.zeros(1, K // 32, 64, dtype=bf16)  # block by block
# several rows go tiled: 64 MB of unpacked weights per thread for a block of 64 rows 1M columns wide
K2, rows = 1 << 20, torch.ones(5, 1 << 20, dtype=bf16)
int8_2, int4_2 = torch.zeros(1, K2, dtype=torch.int8), torch.zeros(64, K2 // 2, dtype=torch.uint8)
int4_scales_2 = torch.zeros(1, K2 // 32, 64, dtype=bf16)
k, v, q, qkv = (torch.zeros(1, 1, S, 8, dtype=bf16), torch.zeros(1, 1, S, 8, dtype=bf16),
                torch.ones(1, 1, 1, 8, dtype=bf16), torch.ones(1, 1, 24, dtype=bf16))
cos, sin, pos = torch.ones(1, 8), torch.zeros(1, 8), torch.tensor([S - 1])
calls = {
    "int8": lambda: gemv.linear_int8(row, int8, one, None),
    "int4": lambda: gemv.linear_int4(row, int4, int4_scales, None, 1, 32),
    "int8 rows": lambda: gemv.linear_int8(rows, int8_2, one, None),
    "int4 rows": lambda: gemv.linear_int4(rows, int4_2, int4_scales_2, None, 1, 32),
    "attend_one": lambda: gemv.attend_one(q, k, v, pos, 1.0),
    "attend_decode": lambda: gemv.attend_decode(qkv, cos, sin, k, v, pos, 1, 8, 1.0),
}
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
for name, call in calls.items():
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + (32 << 20), hard))  # 32 MB more address space at most
    try:
        call()
        print(name, "no-error")
    except MemoryError as e:
        print(name, "MemoryError:", e)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
small = gemv.linear_int8(torch.ones(1, 64, dtype=bf16), torch.ones(1, 64, dtype=torch.int8), one, None)
print("after", small.item())
"""


@pytest.mark.slow
def _every_bf16(low: float, high: float) -> torch.Tensor:
    """Every finite bf16 value in [low, high] but those under 1e-37 in size (subnormal results, which the
    kernels' rounding to bf16, as vcvtneps2bf16 does, flushes to zero), as one row."""
    every = torch.arange(-(2 ** 15), 2 ** 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    normal = (every == 0) | (every.abs() >= 1e-37)
    return every[torch.isfinite(every) & normal & (every >= low) & (every <= high)].unsqueeze(0)


@needs_kernels
def test_gelu_kernel_equals_pytorchs_above_minus_2_9_and_is_closer_to_exact_below():
    x = _every_bf16(-2.9, 1e4)
    assert torch.equal(gemv.gelu_tanh(x), F.gelu(x, approximate="tanh"))
    x = _every_bf16(-6, -2.9)  # where PyTorch's 1 + tanh(u) cancels
    exact = F.gelu(x.double(), approximate="tanh")
    ours, pytorchs = (gemv.gelu_tanh(x).double() - exact).abs(), (F.gelu(x, approximate="tanh").double() - exact).abs()
    assert (ours <= pytorchs).all() and (ours < pytorchs).any()
    special = torch.tensor([[float("inf"), float("-inf"), float("nan"), -0.0, -1e30, 3e38]], dtype=torch.bfloat16)
    assert torch.equal(gemv.gelu_tanh(special).isnan(), F.gelu(special, approximate="tanh").isnan())
    assert torch.equal(gemv.gelu_tanh(special).nan_to_num(), F.gelu(special, approximate="tanh").nan_to_num())


@needs_kernels
@pytest.mark.parametrize("width", [7, 100, 2560, 3072])
def test_layer_norm_kernel_is_within_one_bf16_step_of_pytorchs(width):
    """gemv.layer_norm against F.layer_norm on rows with an offset and a spread (its moments in double, PyTorch's
    in fp32): equal but for a few values in a thousand, those within one bf16 step of the row's largest value, and
    no further from the exact result than PyTorch's."""
    torch.manual_seed(width)
    x = (torch.randn(gemv.FEW_ROWS, 1, width) * torch.linspace(0.01, 30, gemv.FEW_ROWS).view(-1, 1, 1) + 3)
    x, weight, bias = x.to(torch.bfloat16), _bf16(width) * 2, _bf16(width)
    y, ref = gemv.layer_norm(x, weight, bias, 1e-5).float(), F.layer_norm(x, (width,), weight, bias, 1e-5).float()
    assert (y == ref).float().mean().item() >= 0.99
    assert ((y - ref).abs() <= ref.abs().amax(dim=-1, keepdim=True) / 128).all()
    exact = F.layer_norm(x.double(), (width,), weight.double(), bias.double(), 1e-5)
    assert (y.double() - exact).abs().max() <= (ref.double() - exact).abs().max() * 1.01 + 1e-6


@needs_kernels
@pytest.mark.parametrize("width", [7, 100, 3072, 5120])
def test_rms_norm_kernel_is_within_one_bf16_step_of_pytorchs(width):
    """gemv.rms_norm against RMSNorm's PyTorch ops (its mean of squares in double, PyTorch's in fp32): equal but for a
    few values in a thousand, those within one bf16 step of the row's largest value."""
    torch.manual_seed(width)
    x = torch.randn(gemv.FEW_ROWS, 1, width) * torch.linspace(0.01, 30, gemv.FEW_ROWS).view(-1, 1, 1) + 0.5
    x, weight = x.to(torch.bfloat16), _bf16(width) * 2
    y = gemv.rms_norm(x, weight, 1e-5).float()
    x32 = x.float()  # RMSNorm.forward's PyTorch ops
    ref = (weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)).float()
    assert (y == ref).float().mean().item() >= 0.99
    assert ((y - ref).abs() <= ref.abs().amax(dim=-1, keepdim=True) / 128).all()


@needs_kernels
def test_silu_mul_kernel_is_within_one_bf16_step_of_pytorchs():
    """gemv.silu_mul against F.silu(gate) * up in bf16 over every bf16 gate in [-100, 100] (another exponential than
    PyTorch's): equal on nearly all, the others one bf16 step apart; infinities and NaN as PyTorch's."""
    gate = _every_bf16(-100, 100)
    torch.manual_seed(0)
    up = torch.randn(gate.shape).to(torch.bfloat16)
    y = gemv.silu_mul(torch.cat((gate, up), dim=-1)).float()
    ref = (F.silu(gate) * up).float()
    assert (y == ref).float().mean().item() >= 0.99
    assert ((y - ref).abs() <= ref.abs() / 128 + 1e-30).all()
    special = torch.tensor([[float("inf"), float("-inf"), float("nan"), -0.0, -1e30, 3e38]], dtype=torch.bfloat16)
    both = torch.cat((special, torch.ones_like(special)), dim=-1)
    pytorchs = F.silu(special) * torch.ones_like(special)
    assert torch.equal(gemv.silu_mul(both).isnan(), pytorchs.isnan())
    assert torch.equal(gemv.silu_mul(both).nan_to_num(), pytorchs.nan_to_num())
    rows = torch.randn(gemv.FEW_ROWS, 1, 2 * 33).to(torch.bfloat16)  # a few rows, of an odd half width
    assert torch.equal(gemv.silu_mul(rows), torch.stack([gemv.silu_mul(r) for r in rows]))


@needs_kernels
def test_gelu_kernel_takes_a_few_rows_of_any_width():
    torch.manual_seed(0)
    for shape in [(1, 1, 1), (1, 1, 17), (1, 1, 10240), (gemv.FEW_ROWS, 1, 33)]:
        x = torch.randn(shape).clamp(min=-2.9).to(torch.bfloat16)
        assert torch.equal(gemv.gelu_tanh(x), F.gelu(x, approximate="tanh"))


@needs_kernels
def test_kernels_raise_memory_error_when_their_scratch_cannot_be_allocated():
    """The int8/int4 products and the attention allocate scratch memory per call: where that fails they raise
    MemoryError (not a crash, not a NaN answer), and the process goes on."""
    proc = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY_PROBE], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    names = ("int8", "int4", "int8 rows", "int4 rows", "attend_one", "attend_decode")
    assert [line.split(":")[0] for line in lines[:6]] == [f"{name} MemoryError" for name in names], lines
    assert "scratch" in lines[0]
    assert lines[6] == "after 64.0"
