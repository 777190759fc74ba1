"""The benchmark runs end to end on a tiny checkpoint and prints a row per configuration."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hf_checkpoints import make_hf_checkpoint, tiny_hf_config
import torch

from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.load import load_model
from lit_gpt.config import Config
from lit_gpt.random_checkpoint import write_random_hf_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _table(stdout: str, names) -> dict[str, dict[str, str]]:
    """The printed table's rows by name (each a dict by column), checked to hold these rows, each with positive
    numbers (and a signed peak rise)."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ") and line.count("|") == 16]
    head = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = {line.split("|")[1].strip(): dict(zip(head, (c.strip() for c in line.split("|")[1:-1])))
            for line in lines[1:]}
    assert set(rows) >= set(names), stdout
    for name in names:
        assert "error" not in rows[name]["load s"], rows[name]
        numbers = {key: float(cell.rstrip("%x")) for key, cell in rows[name].items()
                   if key not in ("run", "peak rise vs model") and cell != "-"}
        assert all(n > 0 for n in numbers.values()), rows[name]
        assert re.fullmatch(r"[+-]\d+\.\d%", rows[name]["peak rise vs model"]), rows[name]
    return rows


@pytest.mark.slow
def test_benchmark_prints_every_row(tmp_path):
    make_hf_checkpoint(tmp_path, tiny_hf_config(n_embd=128, n_head=4))
    convert_hf_checkpoint(tmp_path, show_progress=False)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/benchmark.py"), "--checkpoint_dir", str(tmp_path),
         "--modes", "[bf16, int8, int4]", "--max_new_tokens", "8"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert len(re.findall(r"read bandwidth [\d.]+ GB/s; running", proc.stderr)) == 4
    rows = _table(proc.stdout, ("ours bf16", "ours int8", "ours int4", "transformers bf16"))
    assert rows["ours bf16"]["vs our bf16"] == "1.00x" and rows["transformers bf16"]["vs our bf16"] == "-"
    # bytes per step and in memory: int8 stores about half of bf16, int4 about a quarter (plus scales)
    for column in ("GB/step", "model GB"):
        gb = {name: float(rows[name][column]) for name in ("ours bf16", "ours int8", "ours int4")}
        assert gb["ours int4"] < gb["ours int8"] < gb["ours bf16"], column


@pytest.mark.slow
def test_rounds_rerun_every_configuration_and_report_medians(tmp_path):
    make_hf_checkpoint(tmp_path, tiny_hf_config(n_embd=128, n_head=4))
    convert_hf_checkpoint(tmp_path, show_progress=False)
    args = [sys.executable, str(ROOT / "scripts/benchmark.py"), "--checkpoint_dir", str(tmp_path),
            "--modes", "[bf16, int8]", "--max_new_tokens", "4", "--transformers", "False"]
    proc = subprocess.run([*args, "--rounds", "3"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    started = re.findall(r"round (\d)/3: read bandwidth [\d.]+ GB/s; running (ours \w+)", proc.stderr)
    # every configuration three times, the order rotated after the first round
    assert started == [("1", "ours bf16"), ("1", "ours int8"), ("2", "ours int8"), ("2", "ours bf16"),
                       ("3", "ours bf16"), ("3", "ours int8")], proc.stderr
    assert "medians of 3 rounds" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ours") and line.count("|") == 16]
    assert [r.split("|")[1].strip() for r in rows] == ["ours bf16", "ours int8"], proc.stdout

    bad = subprocess.run([*args, "--rounds", "0"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == ["error: --rounds must be at least 1, got 0"]


@pytest.mark.slow
def test_llama_cpp_rows_on_gguf_exports_beside_the_checkpoint_with_a_long_prompt(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'lit-phi[bench]')")
    make_hf_checkpoint(tmp_path, tiny_hf_config(n_embd=128, n_head=4))
    convert_hf_checkpoint(tmp_path, show_progress=False)
    args = [sys.executable, str(ROOT / "scripts/benchmark.py"), "--checkpoint_dir", str(tmp_path), "--modes", "[bf16]",
            "--max_new_tokens", "8", "--transformers", "False", "--llama_cpp", "True"]
    proc = subprocess.run([*args, "--prompt_tokens", "100"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    names = ("ours bf16", "llama.cpp bf16", "llama.cpp q8_0", "llama.cpp q4_0")
    assert re.findall(r"round 1/1: read bandwidth [\d.]+ GB/s; running (.+) \.\.\.", proc.stderr) == list(names)
    assert "greedy, a 100-token prompt, 8 new tokens" in proc.stdout
    rows = _table(proc.stdout, names)
    assert all(rows[name]["vs our bf16"].endswith("x") for name in names)
    # ours against llama.cpp's row of the same size, round by round; llama.cpp's own rows have none
    by_round = "decode vs llama.cpp, by round"
    assert rows["ours bf16"][by_round].endswith("x") and all(rows[name][by_round] == "-" for name in names[1:])
    ratio = float(rows["ours bf16"]["decode tok/s"]) / float(rows["llama.cpp bf16"]["decode tok/s"])  # one round
    assert float(rows["ours bf16"][by_round].rstrip("x")) == pytest.approx(ratio, rel=0.02)
    # the exports stay in the checkpoint's gguf/ folder for the next run, 16, 8.5 and 4.5 bits a weight
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == [
        f"{tmp_path.name}-{t}.gguf" for t in ("bf16", "q4_0", "q8_0")]
    for column in ("GB/step", "model GB"):
        gb = [float(rows[name][column]) for name in names[1:]]
        assert gb[2] < gb[1] < gb[0], column

    bad = subprocess.run([*args, "--prompt_tokens", "125"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 1 and bad.stderr.splitlines() == [
        "error: --prompt_tokens must be 1 to 120 (the context of 128 less 8 new tokens), got 125"]


def test_a_long_prompt_is_code_of_exactly_that_many_tokens():
    from lit_gpt.benchmark import PROMPT, prompt_ids
    from lit_gpt.tokenizer import Tokenizer

    tokenizer = Tokenizer(ROOT / "demo" / "phi-stdlib")
    encode = lambda text: tokenizer.encode(text).tolist()  # noqa: E731
    assert prompt_ids(encode) == encode(PROMPT)
    for n in (1, 30, 480):
        ids = prompt_ids(encode, n)
        assert len(ids) == n and PROMPT.startswith(tokenizer.decode(ids[:5]))
    assert tokenizer.decode(prompt_ids(encode, 480)).startswith(PROMPT + "    primes = []\n")


def test_llama_cpp_rows_without_llama_cpp_python_are_one_line(tmp_path, monkeypatch):
    import importlib.util

    from lit_gpt.benchmark import benchmark
    from lit_gpt.utils import InvalidArgument

    (tmp_path / "lit_model.pth").touch()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    with pytest.raises(InvalidArgument, match=r"^llama_cpp needs llama-cpp-python: pip install 'lit-phi\[bench\]'"):
        benchmark(tmp_path, llama_cpp=True)


@pytest.mark.slow
def test_random_checkpoint_has_the_real_layout_and_converts(tmp_path):
    from transformers import AutoModelForCausalLM

    config = Config.from_name("phi-1_5", n_layer=2)  # phi-1_5's shape with fewer layers, to stay fast
    write_random_hf_checkpoint(tmp_path, config=config, shards=3)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    for name in ("model.safetensors.index.json", "config.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / name).is_file()
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert (hf.config.hidden_size, hf.config.num_hidden_layers, hf.config.intermediate_size) == (2048, 2, 8192)

    convert_hf_checkpoint(tmp_path, show_progress=False)
    ours = load_model(tmp_path, dtype=torch.float32)
    idx = torch.tensor([[15496, 995, 11, 703]])
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf.eval()(idx).logits, atol=1e-4, rtol=0)
