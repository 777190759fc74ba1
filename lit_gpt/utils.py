"""Small helpers shared by the library and the command-line scripts."""

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


class UserError(Exception):
    """A problem the user can fix (bad path, bad option, corrupt file). Scripts print it as one line."""


def first_line(e: Exception, limit: int = 160) -> str:
    """The gist of a library's error message, to fit in our one-line errors."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."


def run_cli(fn: Callable) -> None:
    """Run `fn` as a jsonargparse command line; user errors become one line on stderr and exit code 1.

    Ctrl-C exits with 130 and a short notice instead of a traceback; running out of memory (host or GPU)
    is one line too.
    """
    from jsonargparse import CLI

    try:
        CLI(fn, as_positional=False)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130)
    except Exception as e:
        torch = sys.modules.get("torch")  # (download does not import it)
        if isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError)):
            print(f"error: out of memory: {first_line(e)}", file=sys.stderr)
            raise SystemExit(1)
        raise


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    An interrupted or failed write never leaves a half-written `path` behind.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
