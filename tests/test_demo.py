"""The demo model that ships in demo/phi-stdlib: transformers loads it and agrees with us, its greedy
continuation is pinned, quantization keeps its quality on held-out text, and the README's quick start
prints what the README shows, offline."""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "demo" / "phi-stdlib"
PROMPT = "def fibonacci(n):"
# our float32 greedy continuation of PROMPT (and transformers'), 40 new tokens
PINNED = ('\n    """\n    """\n    return _get_value(n)\n\ndef _get_value(n):\n    """\n    Return a string of a string.\n'
          '    """\n    return _get_')


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A copy of the shipped files, as a fresh clone has them (no lit_model.pth yet)."""
    d = tmp_path_factory.mktemp("demo") / "phi-stdlib"
    shutil.copytree(DEMO, d, ignore=shutil.ignore_patterns("lit_model.pth", "lit_config.json", "lit_model.*"))
    return d


@pytest.fixture(scope="module")
def converted(demo) -> Path:
    """The copy, converted as the quick start's first run does (float32: the reference comparisons below)."""
    from lit_gpt.convert import convert_hf_checkpoint

    convert_hf_checkpoint(demo, dtype="float32", show_progress=False)
    return demo


def test_the_shipped_files(demo):
    names = {p.name for p in demo.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "training.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file() and not p.name.startswith("lit_")) <= 30e6
    config = json.loads((demo / "config.json").read_text())
    assert config["model_type"] == "phi" and config["max_position_embeddings"] >= 512
    record = json.loads((demo / "training.json").read_text())
    assert record["python"].startswith("3.") and len(record["data"]["file_list_sha256"]) == 64
    assert 2e6 <= record["parameters"] <= 16e6


def test_transformers_loads_it_with_our_logits(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_gpt.load import load_model
    from lit_gpt.tokenizer import Tokenizer

    demo = converted
    text = (ROOT / "lit_gpt" / "utils.py").read_text()[:1500]
    ids = Tokenizer(demo).encode(text)
    assert AutoTokenizer.from_pretrained(demo)(text)["input_ids"] == ids.tolist()
    hf = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    ours = load_model(demo, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids[None]), hf(ids[None]).logits, atol=1e-5, rtol=0)


def test_greedy_continuation_is_pinned_and_equals_transformers(converted):
    from transformers import AutoModelForCausalLM

    from lit_gpt.generate import generate
    from lit_gpt.load import load_model
    from lit_gpt.tokenizer import Tokenizer

    demo = converted
    tokenizer = Tokenizer(demo)
    ids = tokenizer.encode(PROMPT)
    model = load_model(demo, dtype=torch.float32)
    [ours] = generate(model, tokenizer, ids, len(ids) + 40, temperature=0.0)
    hf = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    expected = hf.generate(ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False, max_new_tokens=40,
                           min_new_tokens=40, pad_token_id=tokenizer.eos_id)[0, len(ids):]
    n = len(ours.ids)
    assert ours.ids == expected[:n].tolist()
    assert ours.text == PINNED


def test_quantized_quality_on_held_out_files(converted):
    """Held-out files of the standard library (those of the demo's validation split that this interpreter has)."""
    from lit_gpt.evaluate import evaluate, file_tokens

    demo = converted
    record = json.loads((demo / "training.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in record["data"]["val_files"] if (stdlib / name).is_file()][:12]
    assert len(files) >= 5
    tokens, _ = file_tokens(demo, files)
    rows = {r["mode"]: r for r in evaluate(demo, ["bf16", "int8", "int4"], tokens[:40_000], group_sizes=(32, 128))}
    bf16 = rows["bf16"]
    assert bf16["ppl"] < 30 and bf16["top1"] > 0.35  # it learned Python (untrained: ~8192 and ~0)
    assert rows["int8"]["ppl"] / bf16["ppl"] - 1 < 0.005 and rows["int8"]["agreement"] > 0.95
    for mode in ("int4 g32", "int4 g128"):
        assert rows[mode]["ppl"] / bf16["ppl"] - 1 < 0.05 and rows[mode]["agreement"] > 0.85


@pytest.mark.slow
def test_quantized_decode_quality_on_held_out_files(demo_checkpoint):
    """Token by token through the KV cache, as generation computes: the int8/int4 decode kernels round the
    activations to 8 bits per block of 32 as well (on CPUs where they build; elsewhere PyTorch's kernels)."""
    from lit_gpt.evaluate import evaluate, file_tokens

    record = json.loads((demo_checkpoint / "training.json").read_text())
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = [stdlib / name for name in record["data"]["val_files"] if (stdlib / name).is_file()][:12]
    tokens, _ = file_tokens(demo_checkpoint, files)
    rows = {r["mode"]: r for r in evaluate(demo_checkpoint, ["bf16", "int8", "int4"], tokens[:6_000], decode=True)}
    bf16 = rows["bf16"]
    assert bf16["tokens"] >= 5_000 and bf16["ppl"] < 30 and bf16["top1"] > 0.35
    assert rows["int8"]["ppl"] / bf16["ppl"] - 1 < 0.005 and rows["int8"]["agreement"] > 0.95
    assert rows["int4 g32"]["ppl"] / bf16["ppl"] - 1 < 0.05 and rows["int4 g32"]["agreement"] > 0.85


@pytest.mark.slow
def test_readme_quick_start_prints_the_readme_sample(tmp_path):
    """The quick start's run command, in a copy of the project with no converted files and no network."""
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"&& (python generate/base\.py --checkpoint_dir demo/phi-stdlib [^\n]*)", readme).group(1)
    sample = re.search(r"with the demo\nmodel, offline.*?```\n(.*?)```", readme, re.S).group(1)
    for part in ("generate", "lit_gpt", "demo"):
        shutil.copytree(ROOT / part, tmp_path / part,
                        ignore=shutil.ignore_patterns("lit_model.pth", "lit_config.json", "__pycache__"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    args = ["bash", "-c", command.replace("python ", f"{sys.executable} ", 1)]
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        args = ["unshare", "-rn", *args]  # no network at all
    proc = subprocess.run(args, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "converting it first" in proc.stderr
    assert proc.stdout == sample
