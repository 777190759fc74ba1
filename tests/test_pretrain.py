"""Pretraining on Fabric: a micro run learns, resuming and DDP give the same losses, the export loads in
transformers, and bad input ends in one clear line with nothing lost."""

import csv
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from lit_gpt import data

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "pretrain" / "base.py"
# a handful of modules of the interpreter's own standard library: real code, on every machine
STDLIB_FILES = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "textwrap.py",
                "string.py", "shlex.py", "fractions.py", "heapq.py", "bisect.py", "colorsys.py", "copy.py"]
TINY = ["--vocab_size", "384", "--n_layer", "2", "--n_head", "4", "--n_embd", "64", "--block_size", "64",
        "--global_batch_size", "8", "--micro_batch_size", "4", "--warmup_steps", "5", "--precision", "32-true",
        "--val_fraction", "0.2", "--learning_rate", "3e-3", "--log_interval", "10"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = tmp_path_factory.mktemp("corpus")
    for name in STDLIB_FILES:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(stdlib / name, out / name)
    (out / "notes.txt").write_text("not selected: another extension\n")
    return out


def pretrain(*args, timeout: int = 300, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, **popen)


def metrics(out_dir: Path) -> list[tuple]:
    """(step, loss, val_loss) of every logged row, over all runs (version_0, version_1, ...) in order; where a
    later run logged a step again (it resumed from an earlier checkpoint), its row replaces the earlier one."""
    rows = []
    versions = sorted((out_dir / "logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        for r in csv.DictReader(open(version / "metrics.csv")):
            row = (int(r["step"]), _float(r.get("loss")), _float(r.get("val_loss")))
            key = (row[0], row[1] is None)
            rows = [old for old in rows if (old[0], old[1] is None) != key] + [row]
    return sorted(rows, key=lambda row: (row[0], row[1] is None))


def _float(text):
    return float(text) if text else None


def val_losses(rows) -> list[float]:
    return [v for _, _, v in rows if v is not None]


@pytest.fixture(scope="module")
def micro_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("micro")
    proc = pretrain("--data_dir", corpus, "--out_dir", out, *TINY, "--max_steps", 60, "--eval_interval", 30)
    assert proc.returncode == 0, proc.stderr
    (out / "stdout.txt").write_text(proc.stdout)
    return out


@pytest.mark.slow
def test_micro_run_lowers_validation_loss(micro_run):
    rows = metrics(micro_run)
    val = val_losses(rows)
    assert len(val) == 3  # before training, at step 30 and at step 60
    assert val[-1] < val[0] - 1.0, val  # from ~ln(384) = 5.95 to clearly below
    assert [s for s, loss, _ in rows if loss is not None] == list(range(1, 61))
    record = json.loads((micro_run / "final" / "training.json").read_text())
    assert record["steps"] == 60 and record["tokens_seen"] == 60 * 8 * 64
    train_files, val_files = data.split_files(sorted(STDLIB_FILES), 0.2)  # notes.txt is not a .py file
    assert record["data"]["files"] == {"train": len(train_files), "val": len(val_files)}
    assert record["data"]["val_files"] == val_files
    assert record["final_val_loss"] == pytest.approx(val[-1])


@pytest.mark.slow
def test_progress_line_and_checkpoint(micro_run):
    progress = [line for line in (micro_run / "stdout.txt").read_text().splitlines() if line.startswith("step ")]
    assert re.fullmatch(r"step 10/60 \| loss \d+\.\d{4} \| lr \S+ \| [\d,]+ tok/s \| 0\.0M tokens \| ETA \d:\d\d:\d\d",
                        progress[1]), progress
    assert progress[-1].startswith("step 60 | val loss ")
    assert [p.name for p in (micro_run / "checkpoints").iterdir()] == ["step-0000060.pth"]
    saved = torch.load(micro_run / "checkpoints" / "step-0000060.pth", weights_only=True)
    assert saved["step"] == 60 and set(saved) >= {"model", "optimizer", "config", "tokenizer_sha256"}


@pytest.mark.slow
def test_export_loads_in_transformers_with_equal_logits(micro_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lit_gpt.load import load_model
    from lit_gpt.tokenizer import Tokenizer

    final = micro_run / "final"
    assert json.loads((final / "config.json").read_text())["model_type"] == "phi"
    text = "def add(a, b):\n    return a + b\n<|endoftext|>"
    hf_tokenizer = AutoTokenizer.from_pretrained(final)
    ours_tokenizer = Tokenizer(final)
    ids = ours_tokenizer.encode(text)
    assert hf_tokenizer(text)["input_ids"] == ids.tolist()
    assert ours_tokenizer.eos_id == hf_tokenizer.eos_token_id == ids[-1]
    hf = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).eval()
    ours = load_model(final, dtype=torch.float32)
    with torch.no_grad():
        expected = hf(ids[None]).logits
        got = ours(ids[None])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def interrupt_at(args: list, line_prefix: str, signum: int = signal.SIGINT) -> subprocess.CompletedProcess:
    """Run pretrain/base.py and send `signum` once it prints a line starting with `line_prefix`."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    for line in proc.stdout:
        if line.startswith(line_prefix):
            proc.send_signal(signum)
            break
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.slow
def test_resume_after_ctrl_c_gives_the_same_losses(corpus, micro_run, tmp_path):
    out = tmp_path / "run"
    args = ["--data_dir", corpus, "--out_dir", out, *TINY, "--max_steps", 60, "--eval_interval", 30,
            "--log_interval", 1]
    proc = interrupt_at(args, "step 20/")
    assert proc.returncode == 130, proc.stderr
    assert "Continue with the same command and --resume True" in proc.stderr and "Traceback" not in proc.stderr
    [checkpoint] = (out / "checkpoints").glob("step-*.pth")
    stopped = torch.load(checkpoint, weights_only=True)["step"]
    assert 20 <= stopped < 60
    assert not (out / "final").exists()

    # the disk fills while the next checkpoint is written: one error line, the interrupted run's checkpoint intact
    before = checkpoint.read_bytes()
    proc = pretrain(*args, "--resume", "True", preexec_fn=_file_size_limit(len(before) // 2))
    assert "cannot write the checkpoint" in one_error_line(proc) and f"{checkpoint} is intact" in proc.stderr
    assert checkpoint.read_bytes() == before
    assert [p.name for p in (out / "checkpoints").iterdir()] == [checkpoint.name]  # no half-written file

    proc = pretrain(*args, "--resume", "True")
    assert proc.returncode == 0, proc.stderr
    assert f"Resuming from {checkpoint} at step {stopped}" in proc.stdout
    assert metrics(out) == metrics(micro_run)  # every step's loss and every validation loss


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    args = ["--data_dir", corpus, "--out_dir", out, *TINY, "--max_steps", 100000, "--eval_interval", 0,
            "--log_interval", 1, "--save_interval", 100000]
    proc = interrupt_at(args, "step 5/", signal.SIGTERM)
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr
    assert len(list((out / "checkpoints").glob("step-*.pth"))) == 1
    assert not list((out / "checkpoints").glob(".*tmp*"))


@pytest.mark.slow
def test_ddp_two_processes_give_the_losses_of_one(corpus, micro_run, tmp_path):
    out = tmp_path / "ddp"
    proc = pretrain("--data_dir", corpus, "--out_dir", out, *TINY, "--max_steps", 60, "--eval_interval", 30,
                    "--devices", 2, "--strategy", "ddp")
    assert proc.returncode == 0, proc.stderr
    ddp, single = metrics(out), metrics(micro_run)
    assert [s for s, *_ in ddp] == [s for s, *_ in single]
    for (_, loss_a, val_a), (_, loss_b, val_b) in zip(ddp, single):
        assert (loss_a is None) == (loss_b is None) and (val_a is None) == (val_b is None)
        if loss_a is not None:
            assert abs(loss_a - loss_b) < 1e-4
        if val_a is not None:
            assert abs(val_a - val_b) < 1e-4


# --- data ---

def test_split_is_by_file_and_stable():
    files = [f"pkg/mod{i}.py" for i in range(200)]
    train, val = data.split_files(files, 0.1)
    assert sorted(train + val) == sorted(files) and not set(train) & set(val)
    assert 5 <= len(val) <= 40
    # a file lands in the same split whatever else is in the folder, and in whatever order it is listed
    train2, val2 = data.split_files(list(reversed(files[:100])), 0.1)
    assert set(val2) == set(val) & set(files[:100]) and val2


@pytest.mark.slow
def test_binary_and_undecodable_files_are_skipped_and_counted(corpus, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(corpus, folder)
    (folder / "blob.py").write_bytes(b"\x00\x01\x02binary")
    (folder / "latin1.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    out = tmp_path / "out"
    proc = pretrain("--data_dir", folder, "--out_dir", out, *TINY, "--max_steps", 2, "--eval_interval", 0)
    assert proc.returncode == 0, proc.stderr
    assert "(2 skipped as binary or not UTF-8)" in proc.stdout
    skipped = json.loads((out / "final" / "training.json").read_text())["data"]["skipped"]
    assert skipped["train"] + skipped["val"] == 2


@pytest.mark.slow
def test_token_files_are_made_once(corpus, tmp_path):
    out = tmp_path / "out"
    assert pretrain("--data_dir", corpus, "--out_dir", out, *TINY, "--max_steps", 2, "--eval_interval", 0).returncode == 0
    stamp = (out / "data" / "train.bin").stat().st_mtime_ns
    proc = pretrain("--data_dir", corpus, "--out_dir", out, *TINY, "--max_steps", 4, "--eval_interval", 0,
                    "--resume", "True")
    assert proc.returncode == 0, proc.stderr
    assert (out / "data" / "train.bin").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_an_existing_tokenizer_is_used(corpus, micro_run, tmp_path):
    out = tmp_path / "out"
    proc = pretrain("--data_dir", corpus, "--out_dir", out, *TINY, "--max_steps", 2, "--eval_interval", 0,
                    "--tokenizer_dir", micro_run / "final")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "tokenizer").exists()
    assert (out / "final" / "tokenizer.json").read_bytes() == (micro_run / "final" / "tokenizer.json").read_bytes()


# --- bad input: one line, non-zero exit, nothing lost ---

def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.slow
def test_no_matching_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    line = one_error_line(pretrain("--data_dir", tmp_path, "--out_dir", tmp_path / "o", *TINY, "--max_steps", 2))
    assert "no files with extension .py" in line


@pytest.mark.slow
def test_missing_data_dir_and_a_file_as_data_dir(tmp_path):
    line = one_error_line(pretrain("--data_dir", tmp_path / "nope", "--out_dir", tmp_path / "o", *TINY,
                                   "--max_steps", 2))
    assert "does not exist" in line
    (tmp_path / "f.py").write_text("x = 1\n")
    line = one_error_line(pretrain("--data_dir", tmp_path / "f.py", "--out_dir", tmp_path / "o", *TINY,
                                   "--max_steps", 2))
    assert "is not a directory" in line


@pytest.mark.slow
def test_corpus_smaller_than_one_window(tmp_path):
    for i in range(3):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n")
    line = one_error_line(pretrain("--data_dir", tmp_path, "--out_dir", tmp_path / "o", *TINY, "--max_steps", 2))
    assert "fewer than one window" in line


@pytest.mark.parametrize("flags, message", [
    (["--max_steps", "0"], "less than one step"),
    (["--max_steps", "2", "--max_tokens", "100"], "exactly one of --max_tokens and --max_steps"),
    (["--max_steps", "2", "--micro_batch_size", "3"], "must be a multiple of micro_batch_size"),
    (["--max_steps", "2", "--learning_rate", "-1"], "--learning_rate > 0"),
    (["--max_steps", "2", "--n_layer", "0"], "--n_layer must be > 0"),
    (["--max_steps", "2", "--val_fraction", "1.5"], "--val_fraction must be between 0 and 1"),
    (["--max_steps", "2", "--vocab_size", "100"], "--vocab_size must be > 256"),
])
@pytest.mark.slow
def test_bad_numbers(corpus, tmp_path, flags, message):
    line = one_error_line(pretrain("--data_dir", corpus, "--out_dir", tmp_path / "o", *TINY, *flags))
    assert message in line
    assert not (tmp_path / "o" / "checkpoints").exists()


@pytest.mark.slow
def test_bad_choice_is_refused_by_the_parser(corpus, tmp_path):
    proc = pretrain("--data_dir", corpus, "--out_dir", tmp_path / "o", *TINY, "--max_steps", 2, "--strategy", "deepspeed")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "deepspeed" in proc.stderr


@pytest.mark.slow
def test_resume_with_another_config_or_tokenizer(corpus, micro_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(micro_run, out)
    line = one_error_line(pretrain("--data_dir", corpus, "--out_dir", out, *TINY, "--max_steps", 60,
                                   "--n_embd", 32, "--resume", "True"))
    assert "was trained with n_embd=64, not 32" in line
    tokens = (out / "data" / "train.bin").read_bytes()
    other = data.train_tokenizer(corpus, STDLIB_FILES[:3], 384, tmp_path / "other-tokenizer")  # same size
    line = one_error_line(pretrain("--data_dir", corpus, "--out_dir", out, *TINY, "--max_steps", 60,
                                   "--tokenizer_dir", other, "--resume", "True"))
    assert "another tokenizer" in line
    assert (out / "data" / "train.bin").read_bytes() == tokens  # refused before anything was rewritten
    line = one_error_line(pretrain("--data_dir", corpus, "--out_dir", out, *TINY, "--max_steps", 60))
    assert "--resume True" in line
    line = one_error_line(pretrain("--data_dir", corpus, "--out_dir", tmp_path / "empty", *TINY, "--max_steps", 60,
                                   "--resume", "True"))
    assert "no checkpoint" in line
    assert torch.load(out / "checkpoints" / "step-0000060.pth", weights_only=True)["step"] == 60


def _file_size_limit(limit_bytes: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hf", "lit"])
def test_the_model_comes_from_a_json_config_and_flags_override_it(corpus, micro_run, tmp_path, kind):
    """A Hugging Face config.json or our lit_config.json gives the model; --n_layer overrides it."""
    source = micro_run / "final" / ("config.json" if kind == "hf" else "lit_config.json")
    out = tmp_path / "out"
    proc = pretrain("--data_dir", corpus, "--out_dir", out, "--vocab_size", 384, "--val_fraction", 0.2,
                    "--global_batch_size", 8, "--micro_batch_size", 4, "--precision", "32-true",
                    "--model_config", source, "--n_layer", 1, "--max_steps", 2, "--eval_interval", 0)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "final" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["max_position_embeddings"]) == (1, 64, 64)
