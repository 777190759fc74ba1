"""Small helpers shared by the library and the command-line scripts."""

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal


class UserError(Exception):
    """A problem the user can fix (bad path, bad value, corrupt file). Scripts print it as one line.

    The library says what is wrong and what would fix it; the scripts (lit_gpt/cli.py) add the flag or the
    command that does it, for the subclasses below.
    """


class InvalidArgument(UserError):
    """A bad value of a parameter. The command line names it by its flag: `--{name} {problem}`; a "{name}" in
    the problem is the parameter again ("use {name} 28 or less")."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem.replace('{name}', name)}")
        self.name, self.problem = name, problem


class NeedsStep(UserError):
    """A checkpoint directory that needs a step first: its message ends with what to do ("...; convert the
    checkpoint first"), and the command line adds the command (" with `python scripts/...`")."""

    def __init__(self, message: str, step: Literal["download", "download_tokenizer", "convert", "quantize"],
                 checkpoint_dir: Path) -> None:
        super().__init__(message)
        self.step, self.checkpoint_dir = step, Path(checkpoint_dir)


def first_line(e: Exception, limit: int = 160) -> str:
    """The gist of a library's error message, to fit in our one-line errors."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (`.<name>.tmp<pid>`); rename it onto `path` only if the block
    succeeds. An interrupted or failed write never leaves a half-written `path` behind, and temporaries of the
    same file left by a process that died (kill -9, a crash) are removed first. An OSError names `path`."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (None, str(tmp)):
            e.filename = str(path)
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(path: Path) -> None:
    """Delete `.<name>.tmp<pid>` files beside `path` whose process is gone."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for old in path.parent.glob(f".{path.name}.tmp*"):
        pid = old.name[len(path.name) + 5:]
        if pid.isdigit() and not process_alive(int(pid)):
            old.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def progress(items, total: int, desc: str, enabled: bool = True, unit: str = "tensor"):
    """`items`, with a progress bar on stderr when `enabled` (long conversions and quantizations)."""
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr)
