"""Resumable, verified file transfer into a checkpoint directory: knows files, bytes and hashes, not the Hub.

lit_gpt/download.py decides which files of which commit to fetch; this module makes each one arrive intact.
huggingface_hub 2.4's own downloads write to a per-process temporary name and delete it on failure, so an
interrupted run would start every unfinished file again from byte 0. Here:

- each file streams into `<dir>/.cache/lit_gpt/partial/<name>.<hash>.incomplete`, which survives Ctrl-C, a
  killed process or a dropped connection; the next run (or an automatic retry within the run) asks for the rest
  with an HTTP Range request. The partial name carries the expected hash, so bytes of another revision are never
  resumed.
- the sha256 the Hub publishes for LFS files (the git blob sha1 for small files) is computed while the bytes
  arrive; a file only takes its final name once its size and hash match, so a checkpoint directory never holds a
  truncated or corrupt file under a real name. A mismatch deletes the bad bytes.
- a verified file is recorded with its size, inode, mtime and ctime (`.cache/lit_gpt/download.json`). A re-run
  trusts an unchanged record instead of hashing gigabytes again. Any write, chmod or `touch` moves the ctime,
  which no user-level call can set back, and a replaced file has another inode: such a file is hashed again.

The HTTP requests go through huggingface_hub's session (its retries on 429/5xx, proxies, headers), so what the
caller configured for the Hub applies to the file bytes too.
"""

import errno
import hashlib
import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from lit_gpt.utils import UserError, atomic_path, first_line

STATE_DIR = Path(".cache") / "lit_gpt"  # inside the checkpoint directory: partial files, the state, the lock
STATE_FILE, LOCK_FILE = "download.json", "lock"
SHOW_HASHING_ABOVE = 16 << 20  # a progress bar for hashing files bigger than this
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
RETRIES = 3  # consecutive failed attempts at a file, without progress, before giving up (a re-run resumes)


@dataclass(frozen=True)
class RemoteFile:
    """A file at a pinned commit, with what its publisher says its content must be."""

    path: str
    size: int
    sha256: Optional[str]  # LFS files
    git_sha1: Optional[str]  # everything else: the git blob id

    @property
    def digest(self) -> str:
        return self.sha256 or self.git_sha1 or ""

    @property
    def algo(self) -> str:
        return "sha256" if self.sha256 else "git-sha1"

    def hasher(self):
        if self.sha256:
            return hashlib.sha256()
        h = hashlib.sha1()
        h.update(b"blob %d\0" % self.size)  # git hashes a header, then the content
        return h

    def to_json(self) -> dict:
        return {"size": self.size, self.algo: self.digest}

    @classmethod
    def from_json(cls, path: str, record: dict) -> "RemoteFile":
        """The inverse of to_json; a missing record gives a file nothing on disk can match."""
        return cls(path, record.get("size", -1), record.get("sha256"), record.get("git-sha1"))


def partial_path(local_dir: Path, f: RemoteFile) -> Path:
    return local_dir / STATE_DIR / "partial" / f"{f.path}.{f.digest[:16]}.incomplete"


# ------------------------------------------------------------------------------------------ one file


def fetch(f: RemoteFile, url: str, local_dir: Path, headers: dict, state: "State") -> Optional[int]:
    """Make local_dir/f.path hold exactly f. Returns the bytes downloaded, None on a size or hash mismatch (the
    bad bytes are deleted, so that the next try starts clean)."""
    final = local_dir / f.path
    if final.is_file() and state.is_verified(final, f):
        return 0
    partial = partial_path(local_dir, f)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        received = _complete(f, url, partial, headers)
    except OSError as e:
        if e.errno is not None and not e.filename:  # a failed write names no file: say where it failed
            e.filename = str(partial)
        raise
    if received is None:
        return None
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    state.record(final, f)
    state.save()  # a run killed after this file still trusts it
    return received


def _complete(f: RemoteFile, url: str, partial: Path, headers: dict) -> Optional[int]:
    """Bring `partial` up to f's bytes, resuming what it holds; a dropped connection is retried as long as the
    tries make progress. Returns the bytes received, or None (partial deleted) when they do not match f."""
    import httpx2

    have = partial.stat().st_size if partial.is_file() else 0
    if have > f.size:
        partial.unlink()
        have = 0
    hasher = f.hasher()
    if have:
        hash_into(hasher, partial, f"checking partial {f.path}", limit=have)
    with open(partial, "ab") as out, progress_bar(f.path, f.size, initial=have) as bar:
        sink = _Sink(f, out, hasher, have, bar)
        failures = 0
        while sink.have < f.size and not sink.overflowed:
            received_before = sink.received
            try:
                _get_rest(url, headers, sink)
            except httpx2.TransportError as e:
                failures = 0 if sink.received > received_before else failures + 1
                if failures > RETRIES:
                    raise UserError(f"the connection to the Hub failed while downloading {f.path} ({first_line(e)}); "
                                    f"{fmt_bytes(sink.have)} of {fmt_bytes(f.size)} are kept: run the same command "
                                    "again to resume")
                time.sleep(0.5 * 2 ** max(failures - 1, 0))
    if sink.overflowed or sink.have != f.size or sink.hasher.hexdigest() != f.digest:
        partial.unlink(missing_ok=True)
        return None
    return sink.received


def _get_rest(url: str, headers: dict, sink: "_Sink") -> None:
    """One GET of the bytes `sink` lacks (a Range request when it holds some), written into it as they arrive."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff

    request_headers = dict(headers, **({"Range": f"bytes={sink.have}-"} if sink.have else {}))
    # retry_on_exceptions=(): a dropped connection is retried by _complete, with a Range from where it stopped
    with http_stream_backoff("GET", url, headers=request_headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT,
                             retry_on_exceptions=(), retry_on_status_codes=(408, 429, 500, 502, 503, 504),
                             max_retries=3) as r:
        hf_raise_for_status(r)
        if sink.have and r.status_code != 206:  # the server ignored the Range: this is the whole file again
            sink.restart()
        for chunk in r.iter_bytes():
            if not sink.write(chunk):
                return
    if sink.have < sink.f.size:
        raise httpx2.RemoteProtocolError("the server closed the response early")


class _Sink:
    """Where a file's bytes go as they arrive: the partial file, its running hash and the progress bar."""

    def __init__(self, f: RemoteFile, out, hasher, have: int, bar) -> None:
        self.f, self.out, self.hasher, self.have, self.bar = f, out, hasher, have, bar
        self.received = 0  # bytes that came over the network in this run, kept or not
        self.overflowed = False  # the server sent more than f.size: the file cannot be f

    def write(self, chunk: bytes) -> bool:
        """Append a chunk; False when it would make the file longer than f (then nothing is written)."""
        if self.have + len(chunk) > self.f.size:
            self.overflowed = True
            return False
        self.out.write(chunk)
        self.out.flush()  # what was received is on disk if the process is killed now
        self.hasher.update(chunk)
        self.have += len(chunk)
        self.received += len(chunk)
        self.bar.update(len(chunk))
        return True

    def restart(self) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.bar.update(-self.have)
        self.have = 0
        self.hasher = self.f.hasher()


def hash_into(hasher, path: Path, desc: str, limit: Optional[int] = None) -> None:
    """Feed the first `limit` bytes of `path` (all of it by default) to `hasher`, with a progress bar."""
    total = path.stat().st_size if limit is None else limit
    with open(path, "rb") as src, progress_bar(desc, total, disable=total <= SHOW_HASHING_ABOVE) as bar:
        left = total
        while left > 0:
            block = src.read(min(8 << 20, left))
            if not block:
                break
            hasher.update(block)
            left -= len(block)
            bar.update(len(block))


def progress_bar(desc: str, total: int, initial: int = 0, disable: bool = False):
    """A bytes bar on stderr that HF_HUB_DISABLE_PROGRESS_BARS turns off, like huggingface_hub's own."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    return hf_tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                   file=sys.stderr, leave=False, disable=disable, name="huggingface_hub.http_get")


# ----------------------------------------------------------------------------------- local bookkeeping


class State:
    """`.cache/lit_gpt/download.json`: what was downloaded from where, and which files were verified when."""

    def __init__(self, local_dir: Path, data: dict) -> None:
        self.local_dir, self.data = local_dir, data
        data.setdefault("files", {})
        data.setdefault("verified", {})

    @classmethod
    def load(cls, local_dir: Path) -> "State":
        path = local_dir / STATE_DIR / STATE_FILE
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("version") != 1:
                data = {}
        except (OSError, ValueError):
            data = {}  # no record: files on disk get hashed once, nothing is lost
        return cls(local_dir, data)

    def save(self) -> None:
        path = self.local_dir / STATE_DIR / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(dict(self.data, version=1), indent=1))

    def start(self, repo_id: str, revision: Optional[str], commit: str, tokenizer_only: bool) -> None:
        if self.data.get("repo_id") not in (None, repo_id):  # another repo's records vouch for nothing here
            self.data["files"], self.data["verified"] = {}, {}
        self.data.update(repo_id=repo_id, revision=revision, commit=commit, tokenizer_only=tokenizer_only,
                         complete=False)
        self.save()

    def finish(self, paths: list[str]) -> None:
        self.data.update(complete=True, last_run=paths)

    def is_verified(self, final: Path, f: RemoteFile, quiet: bool = False) -> bool:
        """Whether `final` holds f's content: from an unchanged record, or by hashing it."""
        st = final.stat()
        if st.st_size != f.size:
            return False
        if self.data["verified"].get(f.path) == self._signature(st, f):
            return True
        hasher = f.hasher()
        hash_into(hasher, final, f"verifying {f.path}")
        if hasher.hexdigest() != f.digest:
            if not quiet:
                print(f"note: {final} differs from the Hub's {f.path}; downloading it again", file=sys.stderr)
            return False
        self.record(final, f)
        return True

    def record(self, final: Path, f: RemoteFile) -> None:
        self.data["verified"][f.path] = self._signature(final.stat(), f)
        self.data["files"][f.path] = f.to_json()

    def recorded(self) -> list[str]:
        """The files this downloader wrote here (whatever else the directory holds is not ours)."""
        return list(self.data["files"])

    def remove(self, name: str) -> None:
        """Delete a file this downloader wrote, and its records."""
        (self.local_dir / name).unlink(missing_ok=True)
        self.data["files"].pop(name, None)
        self.data["verified"].pop(name, None)

    @staticmethod
    def _signature(st: os.stat_result, f: RemoteFile) -> dict:
        return {"digest": f.digest, "size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns}


@contextmanager
def lock(local_dir: Path) -> Iterator[None]:
    """One download at a time into a directory: two would write the same partial files."""
    from filelock import FileLock, Timeout

    path = local_dir / STATE_DIR / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    file_lock = FileLock(str(path), timeout=0)
    try:
        file_lock.acquire()
    except Timeout:
        raise UserError(f"another download into {local_dir} is running; wait for it to finish")
    try:
        yield
    finally:
        file_lock.release()


def holds_data(directory: Path) -> bool:
    """Whether any downloaded bytes (a finished or a partial file) are under `directory`, beyond our
    bookkeeping: a directory without them can be removed after a failed first run at no cost."""
    return any(p.is_file() and p.stat().st_size > 0 and p.name not in (LOCK_FILE, STATE_FILE)
               for p in directory.rglob("*"))


# ------------------------------------------------------------------------------------------ disk space


def bytes_missing(local_dir: Path, files: list[RemoteFile]) -> int:
    """How many bytes must still arrive for `files` (what their partial files hold is not fetched again)."""
    need = 0
    for f in files:
        final = local_dir / f.path
        if final.is_file() and final.stat().st_size == f.size:
            continue  # either verified later or replaced: a replacement only needs the difference briefly
        partial = partial_path(local_dir, f)
        need += f.size - (partial.stat().st_size if partial.is_file() else 0)
    return need


def check_free_space(local_dir: Path, need: int, what: str = "the download needs") -> None:
    """Fail before the transfer rather than on a full disk halfway through it."""
    free = shutil.disk_usage(local_dir).free
    if need > free:
        raise UserError(f"not enough disk space in {local_dir}: {what} {fmt_bytes(need)} more but only "
                        f"{fmt_bytes(free)} is free; free some space (or download into another directory) and "
                        "run again")


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
