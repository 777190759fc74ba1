"""Saved quantized checkpoints: scripts/quantize.py writes them, load_model reads them instead of quantizing."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_checkpoints import lively_checkpoint
from memory_maps import mapping_of
from lit_gpt.cli import error_line
from lit_gpt.load import load_model
from lit_gpt.quantized_checkpoint import save_quantized, saved_quantized_path
from lit_gpt.quantize import Int4Linear, Int8Linear
from lit_gpt.utils import UserError

ROOT = Path(__file__).resolve().parent.parent
CASES = [("int8", 32), ("int4", 32), ("int4", 64)]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("quantized") / "phi-2"
    lively_checkpoint(d, 64)
    return d


@pytest.fixture
def ckpt(converted, tmp_path) -> Path:
    """A fresh copy of the converted checkpoint per test (tests change and delete files in it)."""
    d = tmp_path / "phi-2"
    shutil.copytree(converted, d, copy_function=shutil.copy2)  # copy2 keeps mtimes, as a real checkout would
    return d


def _quantized_weights(model) -> list:
    return [m.weight for m in model.modules() if isinstance(m, (Int8Linear, Int4Linear))]


def quantize_and_save(ckpt: Path, mode: str, group_size: int = 32) -> Path:
    """What scripts/quantize.py does: quantize lit_model.pth at load (bf16), then save the model beside it."""
    model = load_model(ckpt, "cpu", torch.bfloat16, quantize=mode, group_size=group_size, use_saved=False)
    return save_quantized(model, ckpt, show_progress=False)


def _logits(model, idx: torch.Tensor) -> list:
    with torch.inference_mode():
        model.set_kv_cache(1, 32)
        prefill = model(idx, torch.arange(idx.size(1)))
        step = model(idx[:, :1], torch.tensor([idx.size(1)]))
    return [prefill, step]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize(("mode", "group_size"), CASES)
def test_a_saved_checkpoint_loads_memory_mapped_and_equal_to_quantizing_at_load(ckpt, mode, group_size):
    out = quantize_and_save(ckpt, mode, group_size)
    assert out == saved_quantized_path(ckpt, mode, group_size)
    about = json.loads(out.with_suffix(".json").read_text())
    assert about["mode"] == mode and about["dtype"] == "bfloat16"

    fresh = load_model(ckpt, dtype=torch.bfloat16, quantize=mode, group_size=group_size, use_saved=False)
    saved = load_model(ckpt, dtype=torch.bfloat16, quantize=mode, group_size=group_size, huge_pages=False)
    # the saved file was used: its tensors are the model's, memory-mapped, with no repacking
    assert {mapping_of(w.data_ptr())["path"] for w in _quantized_weights(saved)} == {str(out)}
    assert str(out) not in {mapping_of(w.data_ptr())["path"] for w in _quantized_weights(fresh)}
    copied = load_model(ckpt, dtype=torch.bfloat16, quantize=mode, group_size=group_size)  # onto huge pages
    a, b, c = fresh.state_dict(), saved.state_dict(), copied.state_dict()
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    idx = torch.tensor([[5, 17, 300, 4242, 9]])
    for x, y, z in zip(_logits(fresh, idx), _logits(saved, idx), _logits(copied, idx)):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_a_changed_lit_model_is_quantized_at_load_with_a_note(ckpt, capfd):
    out = quantize_and_save(ckpt, "int8")
    source = ckpt / "lit_model.pth"
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # converted again, say
    model = load_model(ckpt, dtype=torch.bfloat16, quantize="int8")
    assert "was made from an older lit_model.pth" in capfd.readouterr().err
    assert str(out) not in {mapping_of(w.data_ptr())["path"] for w in _quantized_weights(model)}


def test_another_dtype_or_int4_layout_is_quantized_at_load_with_a_note(ckpt, capfd):
    out = quantize_and_save(ckpt, "int4", 32)
    model = load_model(ckpt, dtype=torch.float32, quantize="int4")
    assert "holds bfloat16 scales, not float32" in capfd.readouterr().err
    assert model.lm_head.pytorch_scales().dtype == torch.float32

    about = json.loads(out.with_suffix(".json").read_text())
    out.with_suffix(".json").write_text(json.dumps({**about, "int4_layout": "0123456789abcdef"}))
    load_model(ckpt, dtype=torch.bfloat16, quantize="int4")
    assert "packed for another torch, CPU build or lit_gpt version" in capfd.readouterr().err


def test_a_corrupt_saved_checkpoint_is_a_user_error(ckpt):
    out = quantize_and_save(ckpt, "int4", 32)
    data = out.read_bytes()
    stat = out.stat()
    out.write_bytes(data[: len(data) // 2])
    os.utime(out, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(UserError) as e:
        load_model(ckpt, dtype=torch.bfloat16, quantize="int4")
    assert re.search("truncated or corrupt.*scripts/quantize.py", error_line(e.value))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_quantize_script_then_generate_uses_the_saved_checkpoint(ckpt):
    proc = _run("scripts/quantize.py", "--checkpoint_dir", str(ckpt), "--quantize", "int4", "--group_size", "64",
                "--precision", "bf16-true")
    assert proc.returncode == 0, proc.stderr
    out = ckpt / "lit_model.int4-g64.pth"
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert f"wrote {out}" in proc.stderr

    common = ("generate/base.py", "--checkpoint_dir", str(ckpt), "--quantize", "int4", "--group_size", "64",
              "--precision", "bf16-true", "--prompt", "Hello", "--max_new_tokens", "5", "--temperature", "0")
    with_saved = _run(*common)
    assert with_saved.returncode == 0, with_saved.stderr
    out.unlink()  # the same, quantized at load
    without = _run(*common)
    assert without.returncode == 0, without.stderr
    assert with_saved.stdout == without.stdout and len(with_saved.stdout) > len("Hello")


@pytest.mark.parametrize(("args", "message"), [
    (("--quantize", "int3"), "--quantize: unknown value 'int3'"),
    (("--quantize", "int4", "--group_size", "48"), "int4 group size must be one of"),
    (("--precision", "fp8"), "--precision: unknown value 'fp8'"),
])
@pytest.mark.slow
def test_quantize_script_bad_options_are_one_error_line(ckpt, args, message):
    proc = _run("scripts/quantize.py", "--checkpoint_dir", str(ckpt), *args)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not list(ckpt.glob("lit_model.int*")) and not list(ckpt.glob(".lit_model*"))


@pytest.mark.slow
def test_quantize_script_on_a_corrupt_checkpoint_writes_nothing(ckpt):
    source = ckpt / "lit_model.pth"
    source.write_bytes(source.read_bytes()[:1000])
    proc = _run("scripts/quantize.py", "--checkpoint_dir", str(ckpt), "--quantize", "int8")
    assert proc.returncode == 1 and "truncated or corrupt" in proc.stderr
    assert not list(ckpt.glob("lit_model.int*")) and not list(ckpt.glob(".lit_model*"))


@pytest.mark.slow
def test_quantize_script_without_a_converted_checkpoint_names_the_convert_command(tmp_path):
    proc = _run("scripts/quantize.py", "--checkpoint_dir", str(tmp_path / "nothing"))
    assert proc.returncode == 1 and "convert_hf_checkpoint.py" in proc.stderr
