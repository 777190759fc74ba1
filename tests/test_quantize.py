"""Weight-only int8 / int4 quantization (lit_gpt/quantize.py), on the real kernels of this device."""

import io
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lit_gpt.quantize as quantize
from lit_gpt.quantize import Int4Linear, Int8Linear, quantize_model
from lit_gpt.utils import UserError

CASES = [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)]


def _linear(in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16, bias: bool = True) -> nn.Linear:
    torch.manual_seed(in_features * 7 + out_features)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.normal_(0, 0.02)
        if bias:
            layer.bias.normal_(0, 0.1)
    return layer.to(dtype)


def _quantized(mode: str, group_size: int, layer: nn.Linear) -> nn.Module:
    return Int8Linear.from_linear(layer) if mode == "int8" else Int4Linear.from_linear(layer, group_size)


def _assert_close_to_reference(y: torch.Tensor, ref: torch.Tensor, rtol: float) -> None:
    # bf16 output: compare with a float32 reference, relative to the output's scale
    err = (y.float() - ref).abs().max().item()
    assert err <= rtol * ref.abs().max().item(), (err, ref.abs().max().item())


@pytest.mark.parametrize(("mode", "group_size"), CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [(1, 1), (4,), (2, 3)])
def test_output_matches_dequantized_weight(mode, group_size, dtype, batch):
    layer = _linear(256, 96, dtype)
    q = _quantized(mode, group_size, layer)
    x = torch.randn(*batch, 256, dtype=dtype)
    y = q(x)
    assert y.shape == (*batch, 96) and y.dtype == dtype
    ref = F.linear(x.float(), q.dequantize(), layer.bias.float())
    # the kernels accumulate in float32 and round the output once to the activation dtype
    _assert_close_to_reference(y, ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize(("mode", "group_size", "bound"), [("int8", 32, 0.01), ("int4", 32, 0.1), ("int4", 64, 0.12), ("int4", 128, 0.15)])
def test_dequantized_weight_is_close_to_original(mode, group_size, bound):
    layer = _linear(512, 64, torch.float32)
    q = _quantized(mode, group_size, layer)
    w, w_hat = layer.weight.detach(), q.dequantize()
    assert w_hat.shape == w.shape
    rel = ((w_hat - w).norm() / w.norm()).item()
    assert rel < bound, rel
    # each weight is within half a quantization step of its original; symmetric int4 (as q4_0) maps the group's
    # value of largest magnitude to -8 steps exactly, and values of the other sign past +7 steps clamp there
    if mode == "int8":
        step = q.scales.float()[:, None]
        assert ((w_hat - w).abs() <= step * 0.5 + 1e-6).all()
    else:
        scale = q.pytorch_scales()[:, :64, 0].float().t().repeat_interleave(group_size, dim=1)  # signed
        clamped = w / scale > 7.5
        assert ((w_hat - w).abs() <= scale.abs() * torch.where(clamped, 1.0, 0.5) + 1e-6).all()
        assert clamped.float().mean() < 0.01


def test_int4_unpack_inverts_the_kernel_layout():
    # int_weight() reads the packed layout back; q values must round-trip exactly, for row counts
    # that are and are not multiples of the kernels' 64-row blocks, and across several chunks
    old = quantize._CHUNK_ELEMENTS, quantize._UNPACK_CHUNK_ELEMENTS
    # force chunking, with different chunks for packing (128 rows) and unpacking (64 rows)
    quantize._CHUNK_ELEMENTS, quantize._UNPACK_CHUNK_ELEMENTS = 128 * 128, 64 * 128
    try:
        for out_features in (16, 48, 80, 208, 200, 272):
            layer = _linear(128, out_features, torch.float32)
            q = Int4Linear.from_linear(layer, 32)
            # packing chunk by chunk must give the same bytes as packing the whole matrix
            if out_features % 16 == 0:  # (200 gets padded rows, which int_weight() leaves out)
                whole = quantize._pack_int4(q.int_weight().int(), "cpu")
                assert torch.equal(whole, q.weight)
            # and the unpacked values reproduce the layer's output
            x = torch.randn(3, 128)
            ref = F.linear(x, q.dequantize(), layer.bias)
            _assert_close_to_reference(q(x), ref, rtol=1e-5)
    finally:
        quantize._CHUNK_ELEMENTS, quantize._UNPACK_CHUNK_ELEMENTS = old


def test_int8_values_and_scales():
    layer = _linear(64, 32, torch.float32)
    q = Int8Linear.from_linear(layer)
    assert q.weight.dtype == torch.int8 and q.scales.dtype == torch.float32
    assert q.weight.abs().amax(dim=1).eq(127).all()  # each row uses the full symmetric range


@pytest.mark.parametrize(("mode", "group_size"), CASES)
def test_quantize_model_replaces_every_linear(mode, group_size):
    model = nn.Sequential(
        _linear(128, 256),
        nn.GELU(),
        nn.ModuleDict({"a": _linear(256, 128), "b": _linear(256, 64, bias=False)}),
    )
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    quantize_model(model, mode, group_size)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    cls = Int8Linear if mode == "int8" else Int4Linear
    assert [type(m) for m in (model[0], model[2]["a"], model[2]["b"])] == [cls] * 3
    assert model[2]["b"].bias is None and model[0].bias.dtype == torch.bfloat16
    h = F.gelu(model[0](x))
    assert model[2]["a"](h).shape == (2, 128) and model[2]["b"](h).shape == (2, 64)


def test_quantize_model_exclude_and_fp32_weights():
    model = nn.ModuleDict({"body": _linear(64, 64, torch.float32), "lm_head": _linear(64, 32, torch.float32)})
    quantize_model(model, "int4", 32, exclude=["lm_head"])
    assert isinstance(model["body"], Int4Linear) and type(model["lm_head"]) is nn.Linear
    assert model["body"].pytorch_scales().dtype == torch.float32


def test_quantize_model_frees_float_weights():
    model = nn.Sequential(_linear(64, 64), _linear(64, 64))
    weights = [weakref.ref(m.weight) for m in model]
    quantize_model(model, "int8")
    assert all(w() is None for w in weights)


@pytest.mark.parametrize(("mode", "group_size"), CASES)
def test_state_dict_round_trip(mode, group_size):
    # two independent layers (never run in sequence); 40 rows pads to 48 for the int4 kernel
    model = nn.Sequential(_linear(128, 96), _linear(128, 40))
    quantize_model(model, mode, group_size)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    if mode == "int4":  # a portable form: plain nibbles and unpadded scales
        assert state["1.weight"].shape == (40, 64) and state["1.weight"].dtype == torch.uint8
        assert state["1.scales_and_zeros"].shape == (128 // group_size, 40, 2)

    fresh = nn.Sequential(_linear(128, 96), _linear(128, 40))
    with torch.no_grad():  # different float weights, so only the loaded state can make them agree
        for p in fresh.parameters():
            p.mul_(3)
    quantize_model(fresh, mode, group_size)
    fresh.load_state_dict(state)
    for a, b in zip(model, fresh):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb and torch.equal(va, vb)
        assert torch.equal(a.dequantize(), b.dequantize())
        x = torch.randn(3, a.in_features, dtype=torch.bfloat16)
        assert torch.equal(a(x), b(x))


def test_state_dict_wrong_group_size_is_a_user_error():
    model = nn.Sequential(_linear(128, 32))
    quantize_model(model, "int4", 32)
    state = model.state_dict()
    other = nn.Sequential(_linear(128, 32))
    quantize_model(other, "int4", 64)
    with pytest.raises(UserError, match="group size"):
        other.load_state_dict(state)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "group_size"), CASES)
def test_torch_compile_matches_eager(mode, group_size):
    torch._dynamo.reset()
    model = nn.Sequential(_linear(128, 256), nn.GELU(approximate="tanh"), _linear(256, 128))
    quantize_model(model, mode, group_size)
    compiled = torch.compile(model)
    for shape in [(1, 1, 128), (1, 4, 128)]:
        x = torch.randn(*shape, dtype=torch.bfloat16)
        with torch.no_grad():
            eager, comp = model(x), compiled(x)
        # inductor may fuse the bias add and the GELU, rounding differently than eager bf16
        torch.testing.assert_close(comp, eager, atol=2e-2, rtol=2e-2)


def test_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="unknown quantization mode 'int3'"):
        quantize_model(nn.Sequential(_linear(64, 64)), "int3")


@pytest.mark.parametrize("group_size", [16, 48, 512])
def test_unsupported_group_size_is_a_user_error(group_size):
    with pytest.raises(UserError, match="group size"):
        quantize_model(nn.Sequential(_linear(1024, 64)), "int4", group_size)


def test_group_size_not_dividing_in_features_is_a_user_error():
    model = nn.Sequential(_linear(64, 64), _linear(96, 64))
    with pytest.raises(UserError, match="does not divide 1's 96 input features"):
        quantize_model(model, "int4", 64)
    # nothing was changed: all layers are checked before any is replaced
    assert all(type(m) is nn.Linear for m in model)


def test_bare_linear_is_a_user_error():
    with pytest.raises(UserError, match="wrap"):
        quantize_model(_linear(64, 64), "int8")


@pytest.mark.parametrize(("mode", "group_size"), CASES)
def test_quantizing_memory_mapped_fp32_weights_leaves_the_file_alone(tmp_path, mode, group_size):
    # fp32 weights skip the dtype conversion, so in-place quantization math would write into them
    model = nn.Sequential(_linear(128, 64, torch.float32))
    torch.save(model.state_dict(), tmp_path / "model.pth")
    expected = nn.Sequential(_linear(128, 64, torch.float32))
    quantize_model(expected, mode, group_size)

    state = torch.load(tmp_path / "model.pth", mmap=True, weights_only=True)
    mapped = nn.Sequential(nn.Linear(128, 64, device="meta"))
    mapped.load_state_dict(state, assign=True)
    quantize_model(mapped, mode, group_size)
    assert torch.equal(state["0.weight"], model[0].weight)  # the mapped weight was only read
    x = torch.randn(2, 128)
    assert torch.equal(mapped(x), expected(x))
