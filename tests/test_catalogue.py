"""A catalogue of bad inputs and faults, script by script, as a hostile user would try them.

Every case runs the real script in its own process and checks the same things: the exit code, one line on
stderr that says what is wrong (no traceback), no half-written or orphaned file anywhere under the case's
directory, and, where the case damaged nothing the user must fix, that the next normal run works.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_checkpoints import make_hf_checkpoint, tiny_hf_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

NORMAL = {  # the run that must work after a case (the checkpoint is in {ckpt})
    "scripts/convert_hf_checkpoint.py": ["--checkpoint_dir", "{ckpt}"],
    "scripts/convert_lit_checkpoint.py": ["--checkpoint_dir", "{ckpt}", "--output_dir", "{tmp}/export"],
    "scripts/quantize.py": ["--checkpoint_dir", "{ckpt}", "--quantize", "int8"],
    "generate/base.py": ["--checkpoint_dir", "{ckpt}", "--prompt", "Hello", "--max_new_tokens", "3"],
    "scripts/evaluate.py": ["--checkpoint_dir", "{ckpt}", "--files", "[{ckpt}/config.json]", "--modes", "[bf16]"],
}


@dataclass
class Case:
    id: str
    script: str
    args: list
    expect: Optional[str]  # in the one error line; None: the run succeeds
    setup: Optional[Callable[[Path, Path], None]] = None  # (ckpt, tmp) -> None
    code: int = 1
    stdin: Optional[bytes] = None
    limit_file_size: Optional[int] = None  # bytes: writes past it fail as on a full disk
    signal_after: Optional[tuple[str, int]] = None  # (text on stderr/stdout, signal) to send once it appears
    next_run: bool = True
    check: Optional[Callable[[Path, Path, subprocess.CompletedProcess], None]] = None
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------- setups


def write_json(name: str, value) -> Callable:
    def setup(ckpt: Path, tmp: Path) -> None:
        (ckpt / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return setup


def edit_json(name: str, **changes) -> Callable:
    def setup(ckpt: Path, tmp: Path) -> None:
        config = json.loads((ckpt / name).read_text())
        config.update(changes)
        (ckpt / name).write_text(json.dumps(config))
    return setup


def edit_config(**changes) -> Callable:
    return edit_json("config.json", **changes)


def edit_lit_config(**changes) -> Callable:
    return edit_json("lit_config.json", **changes)


def remove(*names: str) -> Callable:
    def setup(ckpt: Path, tmp: Path) -> None:
        for name in names:
            (ckpt / name).unlink()
    return setup


def truncate(name: str, keep: int = 1000) -> Callable:
    def setup(ckpt: Path, tmp: Path) -> None:
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[:keep])
    return setup


def integer_weight(ckpt: Path, tmp: Path) -> None:
    weights = load_file(ckpt / "model.safetensors")
    weights["model.layers.0.mlp.fc1.weight"] = weights["model.layers.0.mlp.fc1.weight"].to(torch.int32)
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


def file_named(name: str) -> Callable:
    def setup(ckpt: Path, tmp: Path) -> None:
        (tmp / name).write_text("a file, not a directory\n")
    return setup


def stale_temporary(name: str) -> Callable:
    def setup(ckpt: Path, tmp: Path) -> None:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()  # a pid that is gone, as after kill -9
        (ckpt / f".{name}.tmp{dead.pid}").write_bytes(b"half of a file")
    return setup


def bigger_checkpoint(ckpt: Path, tmp: Path) -> None:
    """~200 MB of weights: converting takes long enough to be stopped in the middle."""
    for p in ckpt.iterdir():
        p.unlink()
    make_hf_checkpoint(ckpt, tiny_hf_config(n_embd=512, n_head=8, n_layer=8, block_size=128))


def text_files(ckpt: Path, tmp: Path) -> None:
    (tmp / "notes.txt").write_text("Some plain text to score.\n" * 40)
    (tmp / "blob.bin").write_bytes(b"\x00\x01\x02" * 100)


# ------------------------------------------------------------------------------------------------- checks


def config_unchanged(ckpt: Path, tmp: Path, proc) -> None:
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "phi"


def stale_removed(ckpt: Path, tmp: Path, proc) -> None:
    assert not list(ckpt.glob(".*.tmp*"))


def replied_twice(ckpt: Path, tmp: Path, proc) -> None:
    assert proc.stdout.decode().count(">> Reply: ") == 2, proc.stdout


G, C = "generate/base.py", "chat/base.py"
HF, LIT, Q = "scripts/convert_hf_checkpoint.py", "scripts/convert_lit_checkpoint.py", "scripts/quantize.py"
EV, BE = "scripts/evaluate.py", "scripts/benchmark.py"
GEN = ["--checkpoint_dir", "{ckpt}", "--prompt", "Hello"]

CASES = [
    # generate: numbers and choices
    Case("gen-num-samples-0", G, GEN + ["--num_samples", "0"], "--num_samples must be >= 1"),
    Case("gen-num-samples-huge", G, GEN + ["--num_samples", "100000000"], "--num_samples is too large"),
    Case("gen-max-new-0", G, GEN + ["--max_new_tokens", "0"], "--max_new_tokens must be >= 1"),
    Case("gen-max-new-past-context", G, GEN + ["--max_new_tokens", "100000"], "use --max_new_tokens"),
    Case("gen-max-new-not-int", G, GEN + ["--max_new_tokens", "abc"], "--max_new_tokens: invalid value 'abc'"),
    Case("gen-temperature-negative", G, GEN + ["--temperature", "-1"], "--temperature must be >= 0"),
    Case("gen-temperature-nan", G, GEN + ["--temperature", "nan"], "--temperature: invalid value 'nan'"),
    Case("gen-top-k-0", G, GEN + ["--top_k", "0"], "--top_k must be >= 1"),
    Case("gen-top-p-0", G, GEN + ["--top_p", "0"], "--top_p must be in (0, 1]"),
    Case("gen-top-p-above-1", G, GEN + ["--top_p", "1.5"], "--top_p must be in (0, 1]"),
    Case("gen-precision", G, GEN + ["--precision", "fp8"], "--precision: unknown value 'fp8'"),
    Case("gen-quantize", G, GEN + ["--quantize", "int3"], "--quantize: unknown value 'int3'"),
    Case("gen-group-size", G, GEN + ["--quantize", "int4", "--group_size", "48"], "group size must be one of"),
    Case("gen-bnb-on-cpu", G, GEN + ["--quantize", "bnb.nf4"], "--quantize bnb.nf4 needs a CUDA GPU"),
    Case("gen-prompt-style", G, GEN + ["--prompt_style", "llama"], "--prompt_style: unknown value 'llama'"),
    Case("gen-unknown-flag", G, GEN + ["--temperatur", "0"], "unrecognized arguments"),
    Case("gen-empty-prompt", G, ["--checkpoint_dir", "{ckpt}", "--prompt", ""], "the prompt is empty"),
    Case("gen-prompt-past-context", G, ["--checkpoint_dir", "{ckpt}", "--prompt", "word " * 300],
         "longer than the model's context"),
    Case("gen-undecodable-prompt", G, ["--checkpoint_dir", "{ckpt}", "--prompt", "caf\udce9", "--max_new_tokens",
                                       "2"], None, code=0),
    # generate: the checkpoint directory
    Case("gen-missing-dir", G, ["--checkpoint_dir", "{tmp}/nothing", "--prompt", "x"], "does not exist",
         next_run=False),
    Case("gen-dir-is-a-file", G, ["--checkpoint_dir", "{tmp}/afile", "--prompt", "x"], "is a file, not a",
         setup=file_named("afile"), next_run=False),
    Case("gen-no-tokenizer", G, GEN, "no tokenizer.json", setup=remove("tokenizer.json"), next_run=False),
    Case("gen-corrupt-lit-model", G, GEN, "truncated or corrupt", setup=truncate("lit_model.pth"), next_run=False),
    Case("gen-lit-config-not-json", G, GEN, "lit_config.json", setup=write_json("lit_config.json", "{not json"),
         next_run=False),
    Case("gen-lit-config-wrong-type", G, GEN, "n_embd", setup=edit_lit_config(n_embd="wide"), next_run=False),
    Case("gen-lit-config-negative", G, GEN, "n_layer", setup=edit_lit_config(n_layer=-2), next_run=False),
    Case("gen-converts-hf-weights-first", G, GEN + ["--max_new_tokens", "2"], None, code=0,
         setup=remove("lit_model.pth", "lit_config.json")),
    # chat
    Case("chat-closed-stdin", C, ["--checkpoint_dir", "{ckpt}"], "stdin, which is closed", stdin=None,
         extra={"close_stdin": True}, next_run=False),
    Case("chat-undecodable-input", C, ["--checkpoint_dir", "{ckpt}", "--max_new_tokens", "3"], None, code=0,
         stdin=b"caf\xe9 \xff\xfe\nHello\n\n", check=replied_twice, next_run=False),
    Case("chat-max-new-0", C, ["--checkpoint_dir", "{ckpt}", "--max_new_tokens", "0"], "--max_new_tokens must be",
         stdin=b"hi\n", next_run=False),
    Case("chat-bad-seed", C, ["--checkpoint_dir", "{ckpt}", "--seed", "x"], "--seed: invalid value 'x'",
         stdin=b"hi\n", next_run=False),
    Case("chat-sigterm", C, ["--checkpoint_dir", "{ckpt}", "--max_new_tokens", "3"], None, code=143,
         signal_after=("Empty prompt", signal.SIGTERM), next_run=False),
    # convert_hf_checkpoint
    Case("hf-missing-dir", HF, ["--checkpoint_dir", "{tmp}/nothing"], "does not exist", next_run=False),
    Case("hf-dir-is-a-file", HF, ["--checkpoint_dir", "{tmp}/afile"], "is a file, not a", setup=file_named("afile"),
         next_run=False),
    Case("hf-no-weights", HF, ["--checkpoint_dir", "{ckpt}"], "no weights", setup=remove("model.safetensors"),
         next_run=False),
    Case("hf-config-not-json", HF, ["--checkpoint_dir", "{ckpt}"], "config.json",
         setup=write_json("config.json", "{truncated"), next_run=False),
    Case("hf-config-a-list", HF, ["--checkpoint_dir", "{ckpt}"], "config.json", setup=write_json("config.json", [1, 2]),
         next_run=False),
    Case("hf-config-wrong-type", HF, ["--checkpoint_dir", "{ckpt}"], "hidden_size",
         setup=edit_config(hidden_size="64"), next_run=False),
    Case("hf-config-negative", HF, ["--checkpoint_dir", "{ckpt}"], "num_hidden_layers",
         setup=edit_config(num_hidden_layers=-1), next_run=False),
    Case("hf-config-absurd-layers", HF, ["--checkpoint_dir", "{ckpt}"], "layer",
         setup=edit_config(num_hidden_layers=10**9), next_run=False, extra={"timeout": 60}),
    Case("hf-config-bool-size", HF, ["--checkpoint_dir", "{ckpt}"], "hidden_size",
         setup=edit_config(hidden_size=True), next_run=False),
    Case("hf-integer-weight", HF, ["--checkpoint_dir", "{ckpt}"], "int32", setup=integer_weight, next_run=False),
    Case("hf-named-config-of-another-size", HF, ["--checkpoint_dir", "{ckpt}", "--model_name", "phi-2"], "phi-2",
         next_run=True),
    Case("hf-unknown-model-name", HF, ["--checkpoint_dir", "{ckpt}", "--model_name", "phi-9"], "phi-9"),
    Case("hf-dtype", HF, ["--checkpoint_dir", "{ckpt}", "--dtype", "float8"], "--dtype: unknown value 'float8'"),
    Case("hf-truncated-weights", HF, ["--checkpoint_dir", "{ckpt}"], "truncated or corrupt",
         setup=truncate("model.safetensors"), next_run=False),
    Case("hf-disk-full", HF, ["--checkpoint_dir", "{ckpt}"], "free some space", limit_file_size=100_000),
    Case("hf-sigterm", HF, ["--checkpoint_dir", "{ckpt}"], None, code=143, signal_after=("converting", signal.SIGTERM),
         setup=bigger_checkpoint),
    Case("hf-stale-temporary", HF, ["--checkpoint_dir", "{ckpt}"], None, code=0,
         setup=stale_temporary("lit_model.pth"), check=stale_removed),
    # convert_lit_checkpoint
    Case("lit-over-its-source", LIT, ["--checkpoint_dir", "{ckpt}", "--output_dir", "{ckpt}"],
         "--output_dir is the checkpoint directory",
         check=config_unchanged),
    Case("lit-not-converted", LIT, ["--checkpoint_dir", "{ckpt}", "--output_dir", "{tmp}/out"], "convert",
         setup=remove("lit_model.pth", "lit_config.json"), next_run=False),
    Case("lit-output-is-a-file", LIT, ["--checkpoint_dir", "{ckpt}", "--output_dir", "{tmp}/afile"], "afile",
         setup=file_named("afile")),
    Case("lit-output-below-a-file", LIT, ["--checkpoint_dir", "{ckpt}", "--output_dir", "{tmp}/afile/out"], "afile",
         setup=file_named("afile")),
    Case("lit-disk-full", LIT, ["--checkpoint_dir", "{ckpt}", "--output_dir", "{tmp}/out"], "free some space",
         limit_file_size=100_000),
    # quantize
    Case("q-mode", Q, ["--checkpoint_dir", "{ckpt}", "--quantize", "int3"], "--quantize: unknown value 'int3'"),
    Case("q-group-size", Q, ["--checkpoint_dir", "{ckpt}", "--quantize", "int4", "--group_size", "40"],
         "group size must be one of"),
    Case("q-not-converted", Q, ["--checkpoint_dir", "{tmp}/nothing"], "convert_hf_checkpoint.py", next_run=False),
    Case("q-corrupt-source", Q, ["--checkpoint_dir", "{ckpt}", "--quantize", "int8"], "truncated or corrupt",
         setup=truncate("lit_model.pth"), next_run=False),
    Case("q-disk-full", Q, ["--checkpoint_dir", "{ckpt}", "--quantize", "int8"], "free some space",
         limit_file_size=20_000),
    Case("q-stale-temporary", Q, ["--checkpoint_dir", "{ckpt}", "--quantize", "int8"], None, code=0,
         setup=stale_temporary("lit_model.int8.pth"), check=stale_removed),
    # evaluate
    Case("ev-modes-not-a-list", EV, ["--checkpoint_dir", "{ckpt}", "--modes", "int4"], "expects a list"),
    Case("ev-mode", EV, ["--checkpoint_dir", "{ckpt}", "--modes", "[int3]"], "--modes: unknown value 'int3'"),
    Case("ev-group-size", EV, ["--checkpoint_dir", "{ckpt}", "--group_sizes", "[48]"], "group size must be one of"),
    Case("ev-batch-size", EV, ["--checkpoint_dir", "{ckpt}", "--batch_size", "0"], "--batch_size must be >= 1"),
    Case("ev-no-training-record", EV, ["--checkpoint_dir", "{ckpt}"], "training.json"),
    Case("ev-binary-file", EV, ["--checkpoint_dir", "{ckpt}", "--files", "[{tmp}/blob.bin]"], "not UTF-8",
         setup=text_files),
    Case("ev-missing-file", EV, ["--checkpoint_dir", "{ckpt}", "--files", "[{tmp}/none.txt]"], "none.txt"),
    Case("ev-text-file", EV, ["--checkpoint_dir", "{ckpt}", "--files", "[{tmp}/notes.txt]", "--modes",
                              "[bf16, int8]"], None, code=0, setup=text_files),
    # benchmark
    Case("be-max-new-negative", BE, ["--checkpoint_dir", "{ckpt}", "--max_new_tokens", "-5"], "--max_new_tokens must"),
    Case("be-rounds-0", BE, ["--checkpoint_dir", "{ckpt}", "--rounds", "0"], "--rounds must be at least 1"),
    Case("be-mode", BE, ["--checkpoint_dir", "{ckpt}", "--modes", "[fp8]"], "--modes: unknown value 'fp8'"),
    Case("be-not-converted", BE, ["--checkpoint_dir", "{tmp}/nothing"], "convert", next_run=False),
    Case("be-make-random", BE, ["--checkpoint_dir", "{tmp}/x", "--make_random", "phi-3"], "--make_random"),
]


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base") / "phi-tiny"
    make_hf_checkpoint(d, tiny_hf_config(block_size=128))
    proc = subprocess.run([sys.executable, str(ROOT / HF), "--checkpoint_dir", str(d)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return d


def fill(args: list, ckpt: Path, tmp: Path) -> list[str]:
    return [a.replace("{ckpt}", str(ckpt)).replace("{tmp}", str(tmp)) for a in args]


def _limits(case: Case):
    def preexec() -> None:
        if case.limit_file_size is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.limit_file_size, case.limit_file_size))
    return preexec


def run_case(case: Case, ckpt: Path, tmp: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / case.script), *fill(case.args, ckpt, tmp)]
    timeout = case.extra.get("timeout", 300)
    if case.signal_after is None:
        stdin = subprocess.DEVNULL if case.stdin is None else None
        if case.extra.get("close_stdin"):
            cmd = ["bash", "-c", 'exec "$@" <&-', "_", *cmd]
        return subprocess.run(cmd, input=case.stdin, stdin=stdin, capture_output=True, timeout=timeout, cwd=tmp,
                              preexec_fn=_limits(case))
    text, signum = case.signal_after
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp)
    seen = b""
    os.set_blocking(proc.stderr.fileno(), False)
    deadline = time.monotonic() + timeout
    while text.encode() not in seen and proc.poll() is None and time.monotonic() < deadline:
        seen += proc.stderr.read() or b""
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, seen + (err or b""))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_catalogue(case: Case, base_checkpoint: Path, tmp_path: Path):
    ckpt = tmp_path / "phi-tiny"
    shutil.copytree(base_checkpoint, ckpt)
    if case.setup:
        case.setup(ckpt, tmp_path)
    proc = run_case(case, ckpt, tmp_path)
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    assert proc.returncode == case.code, err
    lines = [line for line in err.splitlines() if line.strip()]
    if case.expect is not None:
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0] == lines[-1], err
        assert case.expect in errors[0], errors[0]
    if case.code in (130, 143):
        assert lines[-1] in ("interrupted", "terminated"), err
    left = [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    assert not left, left  # nothing half-written, nothing orphaned
    if case.check:
        case.check(ckpt, tmp_path, proc)
    if case.next_run and case.script in NORMAL:
        again = subprocess.run([sys.executable, str(ROOT / case.script), *fill(NORMAL[case.script], ckpt, tmp_path)],
                               capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert again.returncode == 0, again.stderr


def test_the_catalogue_is_large():
    assert len(CASES) >= 60
