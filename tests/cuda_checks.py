"""Checks of the CUDA paths, for a machine with a GPU: `.ci/gpu` runs them (`python -m pytest tests/cuda_checks.py`).

CI has no GPU and never collects this file (not test_*.py). LIT_GPT_CHECK_DEVICE=cpu runs the same checks on the
CPU, to check the checks themselves where no GPU is at hand.

On the device: our logits against transformers' (fp32; the later family's blocks too), the int8/int4 layers and
whole quantized models against their dequantized weights, the bitsandbytes modes (where bitsandbytes is installed),
compiled decode steps (CUDA graphs) against eager ones, and generate/base.py as a user runs it.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_checkpoints import lively_checkpoint, make_hf_checkpoint, tiny_hf_config, tiny_phi3_config
from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.generate import compile_decode, generate_tokens
from lit_gpt.load import load_model
from lit_gpt.quantize import Int4Linear, Int8Linear

DEVICE = torch.device(os.environ.get("LIT_GPT_CHECK_DEVICE", "cuda"))
ROOT = Path(__file__).resolve().parent.parent
BLOCK = 64

if DEVICE.type == "cuda" and not torch.cuda.is_available():
    pytest.exit("tests/cuda_checks.py: no CUDA device here; LIT_GPT_CHECK_DEVICE=cpu runs the checks on the CPU",
                returncode=2)


@pytest.fixture(scope="module")
def lively(tmp_path_factory) -> Path:
    """A converted random checkpoint whose greedy continuation varies with the context (tests/hf_checkpoints.py)."""
    d = tmp_path_factory.mktemp("lively")
    lively_checkpoint(d, BLOCK)
    return d


@pytest.mark.parametrize("family", ["phi-2", "phi-3"])
def test_logits_match_transformers(tmp_path, family):
    config = tiny_hf_config(n_layer=2) if family == "phi-2" else tiny_phi3_config(n_kv_heads=2)
    hf = make_hf_checkpoint(tmp_path, config, tokenizer=False).to(DEVICE)
    convert_hf_checkpoint(tmp_path, show_progress=False)
    ours = load_model(tmp_path, device=DEVICE, dtype=torch.float32)
    assert ours.lm_head.weight.device.type == DEVICE.type
    idx = torch.randint(0, config.vocab_size, (2, 20), device=DEVICE)
    ours.set_kv_cache(batch_size=2, max_seq_length=32)
    with torch.no_grad():
        expected = hf(idx).logits
        full = ours(idx)
        steps = [ours(idx[:, :5], torch.arange(5, device=DEVICE))]
        steps += [ours(idx[:, t:t + 1], torch.tensor([t], device=DEVICE)) for t in range(5, 20)]
    torch.testing.assert_close(full, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("mode", "group_size"), [("int8", 32), ("int4", 32), ("int4", 128)])
@pytest.mark.parametrize("batch", [(1, 1), (4,), (2, 3)])
def test_quantized_layer_matches_its_dequantized_weight(mode, group_size, batch):
    torch.manual_seed(0)
    layer = nn.Linear(256, 96).to(DEVICE, torch.bfloat16)
    q = Int8Linear.from_linear(layer) if mode == "int8" else Int4Linear.from_linear(layer, group_size)
    assert q.weight.device.type == DEVICE.type
    x = torch.randn(*batch, 256, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)
        ref = F.linear(x.float(), q.dequantize(), layer.bias.float())
    assert y.shape == (*batch, 96) and y.dtype == torch.bfloat16
    # fp32 sums rounded once to bf16 (tinygemm's int4 rounds its partial sums to bf16: a little more)
    assert (y.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_matches_its_dequantized_weights(lively, mode):
    """The whole quantized model on the device against the bf16 model whose linear layers hold the dequantized
    weights: the same products, so the logits agree to bf16 rounding."""
    quantized = load_model(lively, device=DEVICE, dtype=torch.bfloat16, quantize=mode, use_saved=False)
    reference = load_model(lively, device=DEVICE, dtype=torch.bfloat16)
    layers = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, nn.Linear):
                assert isinstance(layers[name], (Int8Linear, Int4Linear)), name
                module.weight.copy_(layers[name].dequantize(torch.bfloat16))
        idx = torch.randint(0, 51200, (1, 12), device=DEVICE)
        ours, ref = quantized(idx).float(), reference(idx).float()
    assert (ours - ref).abs().max() <= 3e-2 * ref.abs().max()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize(("mode", "bound"), [("bnb.nf4", 0.4), ("bnb.nf4-dq", 0.4), ("bnb.fp4", 0.5),
                                             ("bnb.int8", 0.1)])
def test_bitsandbytes_modes_load_and_stay_near_bf16(lively, mode, bound):
    """The tutorial's bitsandbytes modes (CUDA only; bitsandbytes carried as a wheel): every linear layer is
    bitsandbytes', and the logits stay near the bf16 model's (our int4 with groups of 64 is within 0.2 here)."""
    if DEVICE.type != "cuda":
        pytest.skip("bitsandbytes' kernels need CUDA")
    bnb = pytest.importorskip("bitsandbytes")
    quantized = load_model(lively, device=DEVICE, dtype=torch.bfloat16, quantize=mode)
    kinds = {type(m) for m in quantized.modules() if isinstance(m, nn.Linear)}
    assert kinds and all(issubclass(k, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for k in kinds), kinds
    reference = load_model(lively, device=DEVICE, dtype=torch.bfloat16)
    idx = torch.randint(0, 51200, (1, 12), device=DEVICE)
    with torch.no_grad():
        ours, ref = quantized(idx).float(), reference(idx).float()
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max() <= bound * ref.abs().max()


@pytest.mark.parametrize(("dtype", "mode"), [(torch.float32, None), (torch.bfloat16, None),
                                             (torch.bfloat16, "int8"), (torch.bfloat16, "int4")])
def test_compiled_decode_matches_eager(lively, dtype, mode):
    """generate's compiled steps (on CUDA: CUDA graphs) give eager's logits for the same tokens."""
    torch._dynamo.reset()
    eager = load_model(lively, device=DEVICE, dtype=dtype, quantize=mode, use_saved=False)
    compiled_model = load_model(lively, device=DEVICE, dtype=dtype, quantize=mode, use_saved=False)
    prompt = torch.tensor([50256, 464, 3290, 318], device=DEVICE)
    total = len(prompt) + 16
    with torch.no_grad():
        tokens = torch.stack(list(generate_tokens(eager, prompt, total, temperature=0.0)))[:, 0]
        assert len(set(tokens.tolist())) > 1  # a varied continuation: the comparison below says something
        forward = compile_decode(compiled_model)
        compiled_model.set_kv_cache(1, max_seq_length=total)
        eager.set_kv_cache(1, max_seq_length=total)
        pos = torch.arange(len(prompt), device=DEVICE)
        compiled_model(prompt[None], pos)
        eager(prompt[None], pos)
        for t, token in enumerate(tokens[:-1].tolist(), start=len(prompt)):
            idx, input_pos = torch.tensor([[token]], device=DEVICE), torch.tensor([t], device=DEVICE)
            expected, actual = eager(idx, input_pos).float(), forward(idx, input_pos).float()
            tolerance = 1e-4 if dtype == torch.float32 else 2e-2
            assert (actual - expected).abs().max() <= tolerance * expected.abs().max(), t


def test_generate_script_runs_on_the_device(lively):
    """generate/base.py as a user runs it: the device's default precision, int4, compiled steps."""
    proc = subprocess.run([sys.executable, str(ROOT / "generate" / "base.py"), "--checkpoint_dir", str(lively),
                           "--prompt", "Hello", "--max_new_tokens", "8", "--quantize", "int4", "--compile", "True"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Hello") and len(proc.stdout) > len("Hello")
    if DEVICE.type == "cuda":
        assert "CUDA max allocated" in proc.stderr
