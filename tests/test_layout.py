"""The library's shape: every module imports on its own, the imports form no cycle, functions stay short, and
an installed wheel (not the source tree) converts and generates."""

import ast
import os
import random
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lit_gpt"
MODULES = sorted(f"lit_gpt.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def imports_of(path: Path) -> set[str]:
    """The lit_gpt modules a file imports anywhere in it (at the top or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lit_gpt.")}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "lit_gpt":  # from lit_gpt import gemv
                found |= {f"lit_gpt.{a.name}" for a in node.names if f"lit_gpt.{a.name}" in MODULES}
            elif node.module.startswith("lit_gpt."):
                found.add(node.module)
    return found


def test_the_imports_form_no_cycle():
    graph = {m: imports_of(PACKAGE / f"{m.split('.')[1]}.py") for m in MODULES}
    assert all(target in MODULES for targets in graph.values() for target in targets), graph
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        path.append(module)
        for target in sorted(graph[module]):
            visit(target)
        path.pop()
        done.add(module)

    for module in MODULES:
        visit(module)


def test_leaf_modules_import_nothing_heavy():
    # the download script, the file names and the choices must not pull torch in
    code = "import sys, lit_gpt.files, lit_gpt.choices, lit_gpt.download, lit_gpt.cli; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_every_module_imports_alone_and_in_any_order(seed):
    order = MODULES[:]
    random.Random(seed).shuffle(order)
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    if seed == 0:  # and each one alone, in a fresh interpreter
        procs = [subprocess.Popen([sys.executable, "-c", f"import {m}"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
                 for m in MODULES]
        failed = {m: p.communicate()[1] for m, p in zip(MODULES, procs) if p.wait() != 0}
        assert not failed, failed


def test_no_function_in_the_library_is_over_60_lines():
    long = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    assert not long, long


WHEEL_CHECK = """
import sys
from pathlib import Path
import torch
import lit_gpt
from lit_gpt.config import Config
from lit_gpt.convert import convert_hf_checkpoint
from lit_gpt.generate import generate
from lit_gpt.load import load_model
from lit_gpt.random_checkpoint import write_random_hf_checkpoint
from lit_gpt.tokenizer import Tokenizer

print(Path(lit_gpt.__file__).resolve())
ckpt = Path(sys.argv[1])
write_random_hf_checkpoint(ckpt, config=Config.from_name("phi-2", n_layer=2, n_embd=64, n_head=2,
                                                        intermediate_size=128), shards=1)
convert_hf_checkpoint(ckpt, show_progress=False)
model, tokenizer = load_model(ckpt, dtype=torch.float32), Tokenizer(ckpt)
[completion] = generate(model, tokenizer, tokenizer.encode("def hello():"), 12, temperature=0.0)
print(len(completion.ids))
"""


@pytest.mark.slow
def test_an_installed_wheel_converts_and_generates(tmp_path):
    """`pip wheel .` and a fresh virtual environment (torch and the other dependencies from this one's): the
    package runs from site-packages, with its data files (gemv.c, GPT-2's BPE files)."""
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path / "dist"), "-q"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    [wheel] = (tmp_path / "dist").glob("lit_phi-*.whl")
    venv.create(tmp_path / "venv", with_pip=False)
    python = tmp_path / "venv" / "bin" / "python"
    # the dependencies from this environment: its site-packages as a path (a .pth line is not searched for
    # further .pth files, so this environment's editable install of the source tree does not come along)
    here = sysconfig.get_paths()["purelib"]
    there = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                           capture_output=True, text=True, check=True).stdout.strip()
    (Path(there) / "dependencies.pth").write_text(here + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                              str(wheel)], capture_output=True, text=True, timeout=600, env=env)
    assert install.returncode == 0, install.stderr
    run = subprocess.run([str(python), "-c", WHEEL_CHECK, str(tmp_path / "ckpt")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    location, tokens = run.stdout.split()
    assert Path(location).is_relative_to(tmp_path / "venv"), location  # the wheel's copy, not this source tree
    assert int(tokens) >= 1
