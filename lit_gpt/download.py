"""Download Phi checkpoints from the Hugging Face Hub: only the files we need, resumable across runs, verified.

The Hub is spoken to through huggingface_hub's own client (`HfApi`, its HTTP session, headers and URLs), so
HF_TOKEN or a `hf auth login` token, HF_ENDPOINT mirrors, HF_HUB_OFFLINE and HF_HUB_DISABLE_PROGRESS_BARS all
apply. The file transfer itself is done here rather than by `snapshot_download`, because huggingface_hub 2.4
writes each download to a per-process temporary name (`<etag>.<random>.incomplete`) and deletes it on failure,
so an interrupted run starts every unfinished file again from byte 0 (it only resumes with Range within one
process, after a dropped connection). Here:

- each file streams into `<checkpoint_dir>/.cache/lit_gpt/partial/<name>.<hash>.incomplete`, which survives
  Ctrl-C, a killed process or a dropped connection; the next run (or an automatic retry within the run) asks for
  the rest with an HTTP Range request. The partial name carries the expected hash, so bytes of another revision
  are never resumed.
- the sha256 the Hub publishes for LFS files (the git blob sha1 for small files) is computed while the bytes
  arrive; a file only takes its final name once its size and hash match, so a checkpoint directory never holds a
  truncated or corrupt file under a real name. A mismatch deletes the bad bytes and asks for a re-run.
- a verified file is recorded with its size, inode, mtime and ctime (`.cache/lit_gpt/download.json`). A re-run
  trusts an unchanged record instead of hashing gigabytes again. Any write, chmod or `touch` moves the ctime,
  which no user-level call can set back, and a replaced file has another inode: such a file is hashed again.
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
from typing import Any, Iterator, Optional

from lit_gpt.config import PHI_MODEL_TYPES
from lit_gpt.utils import UserError, atomic_path, first_line

SUPPORTED_REPO_IDS = ("microsoft/phi-1", "microsoft/phi-1_5", "microsoft/phi-2")
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json")
WEIGHT_KINDS = {  # kind -> (file suffix, index file)
    "safetensors": (".safetensors", "model.safetensors.index.json"),
    "bin": (".bin", "pytorch_model.bin.index.json"),
}
NOT_WEIGHTS = ("training_args.bin",)
STATE_DIR = Path(".cache") / "lit_gpt"
SHOW_HASHING_ABOVE = 16 << 20  # a progress bar for hashing files bigger than this
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
RETRIES = 3  # consecutive failed attempts at a file, without progress, before giving up (a re-run resumes)
API_TIMEOUT = 30.0


@dataclass(frozen=True)
class RemoteFile:
    """A file of the repo at the pinned commit, with what the Hub says its content must be."""

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
        h.update(b"blob %d\0" % self.size)
        return h

    def to_json(self) -> dict:
        return {"size": self.size, self.algo: self.digest}


def download(
    repo_id: Optional[str] = None,
    checkpoint_dir: Path = Path("checkpoints"),
    from_safetensors: Optional[bool] = None,
    tokenizer_only: bool = False,
    access_token: Optional[str] = None,
    revision: Optional[str] = None,
    convert: bool = False,
) -> Optional[Path]:
    """Download a Phi checkpoint from the Hub into checkpoint_dir/<org>/<name>; a re-run resumes, files are verified.

    Fetches config.json, generation_config.json, the tokenizer files and the weights, and nothing else.
    Re-running after an interruption resumes where it stopped; every file is checked against the size
    and hash the Hub publishes before it is kept. HF_TOKEN, HF_ENDPOINT (a mirror), HF_HUB_OFFLINE (use a
    finished download without the network) and HF_HUB_DISABLE_PROGRESS_BARS are honored.

    Args:
        repo_id: The repository on the Hub, e.g. microsoft/phi-2 (also microsoft/phi-1, microsoft/phi-1_5, or any
            fine-tune or mirror in one of their formats). Leave it out to list the supported repo ids.
        checkpoint_dir: Where checkpoints live; the files go into checkpoint_dir/<org>/<name>.
        from_safetensors: Which weights to fetch: True for *.safetensors, False for *.bin. By default the
            safetensors when the repo has them, else the .bin files. Only one kind is ever downloaded; when the
            asked-for kind is missing the other is taken, with a note.
        tokenizer_only: Fetch only the tokenizer files (and config.json, generation_config.json), no weights.
        access_token: A Hugging Face token, for gated or private repos. By default the HF_TOKEN environment
            variable or the token saved by `hf auth login` is used.
        revision: A branch, tag or commit hash to download (default: the repo's main branch).
        convert: Convert the checkpoint into lit_model.pth + lit_config.json right after the download.

    Returns:
        The directory that holds the checkpoint, or None when only the supported repo ids were listed.
    """
    if repo_id is None:
        print("Supported repo ids (fine-tunes and mirrors of them work too):")
        for name in SUPPORTED_REPO_IDS:
            print(f"  {name}")
        print("Download one with: python scripts/download.py --repo_id microsoft/phi-2")
        return None
    if tokenizer_only and from_safetensors is not None:
        raise UserError("--tokenizer_only fetches no weights, so it cannot be combined with --from_safetensors")
    if tokenizer_only and convert:
        raise UserError("--convert needs the weights, so it cannot be combined with --tokenizer_only")

    from huggingface_hub import constants
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise UserError(f"invalid --repo_id {repo_id!r}: {first_line(e)}")
    if "/" not in repo_id:
        raise UserError(f"--repo_id {repo_id!r} needs the form <org>/<name>, e.g. microsoft/phi-2")

    local_dir = Path(checkpoint_dir) / repo_id
    if constants.is_offline_mode():
        _use_offline_copy(local_dir, repo_id, revision, tokenizer_only)
    else:
        with _hub_errors(repo_id, revision, access_token):
            _download(repo_id, local_dir, from_safetensors, tokenizer_only, access_token, revision, convert)
    if convert:
        from lit_gpt.checkpoint import convert_hf_checkpoint

        try:
            out = convert_hf_checkpoint(local_dir)
        except OSError as e:
            if e.errno in DISK_FULL:
                raise UserError(f"cannot write the converted checkpoint in {local_dir}: {e.strerror}; free some "
                                "space and run `python scripts/convert_hf_checkpoint.py` on it")
            raise
        print(f"converted: wrote {out} and {out.with_name('lit_config.json')}", file=sys.stderr)
    return local_dir


# ------------------------------------------------------------------------------------------- the download


def _download(repo_id: str, local_dir: Path, from_safetensors: Optional[bool], tokenizer_only: bool,
              access_token: Optional[str], revision: Optional[str], convert: bool) -> None:
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    api = HfApi(token=access_token)
    info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=API_TIMEOUT)
    commit = info.sha or revision or "main"  # every file comes from this one commit, even if a branch moves
    at = f"{repo_id}@{revision}" if revision else repo_id
    remote = {}
    for s in info.siblings or []:
        if "/" in s.rfilename or s.size is None:
            continue
        remote[s.rfilename] = RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id)

    small = [remote[n] for n in CONFIG_FILES + TOKENIZER_FILES if n in remote]
    if tokenizer_only:
        if not any(n in remote for n in ("tokenizer.json", "vocab.json")):
            raise UserError(f"{at} has no tokenizer files (tokenizer.json or vocab.json)")
        kind, first = None, []
    else:
        if "config.json" not in remote:
            raise UserError(f"{at} has no config.json, so it does not hold a Phi checkpoint")
        kind = _weight_kind(remote, from_safetensors, at)
        index = WEIGHT_KINDS[kind][1]
        first = [remote["config.json"]] + ([remote[index]] if index in remote else [])
    rest = [f for f in small if f not in first]

    # Ask for the first file before writing anything, so that gated repos fail here with the Hub's answer.
    get_hf_file_metadata(hf_hub_url(repo_id, (first or rest)[0].path, revision=commit), token=access_token,
                         timeout=API_TIMEOUT)

    headers = _headers(access_token)
    created = _mkdir(local_dir)
    try:
        with _lock(local_dir), _download_counter():
            state = _State.load(local_dir)
            state.start(repo_id, revision, commit, tokenizer_only)
            fetched = 0
            bad: list[str] = []

            def fetch_all(files: list[RemoteFile]) -> None:
                nonlocal fetched
                for f in files:
                    got = _fetch(f, hf_hub_url(repo_id, f.path, revision=commit), local_dir, headers, state)
                    if got is None:
                        bad.append(f.path)
                    else:
                        fetched += got

            weights: list[RemoteFile] = []
            fetch_all(first)  # config.json and the index: what decides the rest
            if kind is not None and not bad:
                _check_model_type(local_dir / "config.json", at)
                weights = _weight_files(remote, kind, local_dir, at)
            if not bad:
                _check_free_space(local_dir, rest + weights, convert)
                if kind is not None:
                    keep = {f.path for f in first + weights}
                    state.forget_weights_except(keep, local_dir)
                fetch_all(rest + weights)
            if bad:
                state.save()
                them = "them" if len(bad) > 1 else "it"
                raise UserError(f"{', '.join(bad)} did not match the size or hash the Hub publishes (corrupted in "
                                f"transit?); deleted {them}: run the same command again to fetch {them} anew")
            state.finish([f.path for f in first + rest + weights])
            state.save()
    except _NotPhi:
        if created:
            shutil.rmtree(created[0], ignore_errors=True)
        raise
    except BaseException:
        _remove_if_empty(created)
        raise
    done = first + rest + weights
    print(f"{at} (commit {commit[:10]}): {len(done)} files, {_fmt(sum(f.size for f in done))} in {local_dir}"
          f" ({_fmt(fetched)} downloaded now)", file=sys.stderr)
    if weights and (local_dir / "lit_model.pth").is_file() and not convert and fetched:
        print(f"note: {local_dir / 'lit_model.pth'} was converted from earlier weights; convert again with "
              f"`python scripts/convert_hf_checkpoint.py --checkpoint_dir {local_dir}`", file=sys.stderr)


class _NotPhi(UserError):
    pass


def _weight_kind(remote: dict, from_safetensors: Optional[bool], at: str) -> str:
    have = {kind: any(_is_weight(n, kind) for n in remote) for kind in WEIGHT_KINDS}
    wanted = "bin" if from_safetensors is False else "safetensors"
    other = "bin" if wanted == "safetensors" else "safetensors"
    if have[wanted]:
        return wanted
    if have[other]:
        if from_safetensors is not None:
            print(f"note: {at} has no {wanted} weights, downloading the {other} weights instead", file=sys.stderr)
        return other
    raise UserError(f"{at} holds no model weights (*.safetensors or *.bin), so it is not a Phi checkpoint")


def _is_weight(name: str, kind: str) -> bool:
    return name.endswith(WEIGHT_KINDS[kind][0]) and name not in NOT_WEIGHTS


def _weight_files(remote: dict, kind: str, local_dir: Path, at: str) -> list[RemoteFile]:
    """The weight files: the shards the index names when there is one, else every file of the kind."""
    index = WEIGHT_KINDS[kind][1]
    if index not in remote:
        return [f for n, f in sorted(remote.items()) if _is_weight(n, kind)]
    try:
        shards = sorted(set(json.loads((local_dir / index).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index} of {at} is malformed ({first_line(e)})")
    missing = [s for s in shards if s not in remote]
    if missing:
        raise UserError(f"{index} of {at} names {missing[0]}, which the repo does not have")
    return [remote[s] for s in shards]


def _check_model_type(config_path: Path, at: str) -> None:
    """Refuse non-Phi models before their weights are downloaded."""
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"config.json of {at} cannot be read ({first_line(e)})")
    if model_type is not None and model_type not in PHI_MODEL_TYPES:
        raise _NotPhi(f"{at} holds a {model_type!r} model, not Phi (its config.json has model_type "
                      f"{model_type!r}, not one of {', '.join(PHI_MODEL_TYPES)}); its weights were not downloaded")


def _check_free_space(local_dir: Path, weights: list[RemoteFile], convert: bool) -> None:
    need = 0
    for f in weights:
        final = local_dir / f.path
        if final.is_file() and final.stat().st_size == f.size:
            continue  # either verified below or replaced: a replacement only needs the difference briefly
        partial = _partial_path(local_dir, f)
        need += f.size - (partial.stat().st_size if partial.is_file() else 0)
    if convert:
        need += sum(f.size for f in weights)  # lit_model.pth: the same tensors again
    free = shutil.disk_usage(local_dir).free
    if need > free:
        what = "the download and conversion need" if convert else "the download needs"
        raise UserError(f"not enough disk space in {local_dir}: {what} {_fmt(need)} more but only {_fmt(free)} "
                        "is free; free some space (or choose another --checkpoint_dir) and run again")


def _fetch(f: RemoteFile, url: str, local_dir: Path, headers: dict, state: "_State") -> Optional[int]:
    """Make local_dir/f.path hold exactly the Hub's file. Returns the bytes downloaded, None on a hash mismatch."""
    final = local_dir / f.path
    if final.is_file() and state.is_verified(final, f):
        return 0

    partial = _partial_path(local_dir, f)
    partial.parent.mkdir(parents=True, exist_ok=True)
    have = partial.stat().st_size if partial.is_file() else 0
    if have > f.size:
        partial.unlink()
        have = 0
    hasher = f.hasher()
    if have:
        _hash_into(hasher, partial, f"checking partial {f.path}", limit=have)

    try:
        return _stream(f, url, partial, have, hasher, headers, local_dir, state)
    except OSError as e:
        if e.errno in DISK_FULL and not e.filename:
            e.filename = str(partial)
        raise


def _stream(f: RemoteFile, url: str, partial: Path, have: int, hasher, headers: dict, local_dir: Path,
            state: "_State") -> Optional[int]:
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.utils import hf_raise_for_status, http_stream_backoff
    from huggingface_hub.utils import tqdm as hf_tqdm

    final = local_dir / f.path
    fetched = failures = 0
    with open(partial, "ab") as out, hf_tqdm(total=f.size, initial=have, desc=f.path, unit="B", unit_scale=True,
                                             unit_divisor=1024, file=sys.stderr, leave=False,
                                             name="huggingface_hub.http_get") as bar:
        while have < f.size:
            request_headers = dict(headers, **({"Range": f"bytes={have}-"} if have else {}))
            before = have
            try:
                with http_stream_backoff("GET", url, headers=request_headers,
                                         timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT, retry_on_exceptions=(),
                                         retry_on_status_codes=(408, 429, 500, 502, 503, 504), max_retries=3) as r:
                    hf_raise_for_status(r)
                    if have and r.status_code != 206:  # the server ignored the Range: start over
                        out.seek(0)
                        out.truncate()
                        bar.update(-have)
                        have = before = 0
                        hasher = f.hasher()
                    for chunk in r.iter_bytes():
                        if have + len(chunk) > f.size:
                            raise _TooLong()
                        out.write(chunk)
                        out.flush()  # what was received is on disk if the process is killed now
                        hasher.update(chunk)
                        have += len(chunk)
                        fetched += len(chunk)
                        bar.update(len(chunk))
                if have < f.size:
                    raise httpx2.RemoteProtocolError("the server closed the response early")
            except _TooLong:
                out.flush()
                have = -1
                break
            except httpx2.TransportError as e:
                out.flush()
                failures = 0 if have > before else failures + 1
                if failures > RETRIES:
                    raise UserError(f"the connection to the Hub failed while downloading {f.path} ({first_line(e)}); "
                                    f"{_fmt(have)} of {_fmt(f.size)} are kept: run the same command again to resume")
                time.sleep(0.5 * 2 ** max(failures - 1, 0))

    if have != f.size or hasher.hexdigest() != f.digest:
        partial.unlink(missing_ok=True)
        return None
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(partial, final)
    state.record(final, f)
    state.save()
    return fetched


class _TooLong(Exception):
    pass


def _partial_path(local_dir: Path, f: RemoteFile) -> Path:
    return local_dir / STATE_DIR / "partial" / f"{f.path}.{f.digest[:16]}.incomplete"


def _hash_into(hasher, path: Path, desc: str, limit: Optional[int] = None) -> None:
    """Feed the first `limit` bytes of `path` (all of it by default) to `hasher`, with a progress bar."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    total = path.stat().st_size if limit is None else limit
    with open(path, "rb") as src, hf_tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                                          file=sys.stderr, leave=False, disable=total <= SHOW_HASHING_ABOVE,
                                          name="huggingface_hub.http_get") as bar:
        left = total
        while left > 0:
            block = src.read(min(8 << 20, left))
            if not block:
                break
            hasher.update(block)
            left -= len(block)
            bar.update(len(block))


# ----------------------------------------------------------------------------------- local bookkeeping


class _State:
    """`.cache/lit_gpt/download.json`: what was downloaded from where, and which files were verified when."""

    def __init__(self, local_dir: Path, data: dict) -> None:
        self.local_dir, self.data = local_dir, data
        data.setdefault("files", {})
        data.setdefault("verified", {})

    @classmethod
    def load(cls, local_dir: Path) -> "_State":
        path = local_dir / STATE_DIR / "download.json"
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("version") != 1:
                data = {}
        except (OSError, ValueError):
            data = {}  # no record: files on disk get hashed once, nothing is lost
        return cls(local_dir, data)

    def save(self) -> None:
        path = self.local_dir / STATE_DIR / "download.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(dict(self.data, version=1), indent=1))

    def start(self, repo_id: str, revision: Optional[str], commit: str, tokenizer_only: bool) -> None:
        if self.data.get("repo_id") not in (None, repo_id):
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
        _hash_into(hasher, final, f"verifying {f.path}")
        if hasher.hexdigest() != f.digest:
            if not quiet:
                print(f"note: {final} differs from the Hub's {f.path}; downloading it again", file=sys.stderr)
            return False
        self.record(final, f)
        return True

    def record(self, final: Path, f: RemoteFile) -> None:
        self.data["verified"][f.path] = self._signature(final.stat(), f)
        self.data["files"][f.path] = f.to_json()

    @staticmethod
    def _signature(st: os.stat_result, f: RemoteFile) -> dict:
        return {"digest": f.digest, "size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns}

    def forget_weights_except(self, keep: set[str], local_dir: Path) -> None:
        """Delete weight files an earlier download put here (another revision or kind) that are not wanted now,
        so the converter cannot mix them in. Files this downloader did not write are never touched."""
        for name in list(self.data["files"]):
            is_weight = any(_is_weight(name, k) or name == WEIGHT_KINDS[k][1] for k in WEIGHT_KINDS)
            if is_weight and name not in keep:
                (local_dir / name).unlink(missing_ok=True)
                del self.data["files"][name]
                self.data["verified"].pop(name, None)
                print(f"note: removed {name}, left by an earlier download of another revision or weight kind",
                      file=sys.stderr)


def _use_offline_copy(local_dir: Path, repo_id: str, revision: Optional[str], tokenizer_only: bool) -> None:
    """HF_HUB_OFFLINE: accept a finished download of the same repo (and revision) without the network."""
    state = _State.load(local_dir)
    data = state.data
    same = (data.get("repo_id") == repo_id and data.get("complete")
            and (revision is None or revision in (data.get("revision"), data.get("commit")))
            and (tokenizer_only or not data.get("tokenizer_only")))
    if same:
        for name in data.get("last_run", []):
            rec = data["files"].get(name, {})
            f = RemoteFile(name, rec.get("size", -1), rec.get("sha256"), rec.get("git-sha1"))
            final = local_dir / name
            if not final.is_file() or not state.is_verified(final, f, quiet=True):
                same = False
                break
    if not same:
        at = f"{repo_id}@{revision}" if revision else repo_id
        raise UserError(f"HF_HUB_OFFLINE is set and {local_dir} holds no complete download of {at}; "
                        "unset HF_HUB_OFFLINE to download it")
    state.save()
    print(f"HF_HUB_OFFLINE is set: using the download of {repo_id} (commit {str(data.get('commit'))[:10]}) "
          f"in {local_dir}", file=sys.stderr)


def _mkdir(path: Path) -> list[Path]:
    """mkdir -p that returns the directories it created, outermost first."""
    created = []
    p = path.absolute()
    while not p.exists():
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return created[::-1]


def _remove_if_empty(created: list[Path]) -> None:
    """After a failed first download, remove the directories it created if no data (finished or partial) is in them."""
    if not created:
        return
    top = created[0]
    if any(p.is_file() and p.stat().st_size > 0 and p.name not in ("lock", "download.json")
           for p in top.rglob("*")):
        return
    shutil.rmtree(top, ignore_errors=True)


@contextmanager
def _lock(local_dir: Path) -> Iterator[None]:
    from filelock import FileLock, Timeout

    path = local_dir / STATE_DIR / "lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"another download into {local_dir} is running; wait for it to finish")
    try:
        yield
    finally:
        lock.release()


@contextmanager
def _download_counter() -> Iterator[None]:
    """Mark requests as downloads (X-HF-Download-Counter), as huggingface_hub's own downloads do."""
    try:
        from huggingface_hub.utils._http import _IS_DOWNLOAD_CALL
    except ImportError:
        yield
        return
    token = _IS_DOWNLOAD_CALL.set(True)
    try:
        yield
    finally:
        _IS_DOWNLOAD_CALL.reset(token)


def _headers(access_token: Optional[str]) -> dict:
    from huggingface_hub.utils import build_hf_headers

    headers = build_hf_headers(token=access_token, library_name="lit-phi")
    headers["Accept-Encoding"] = "identity"  # hashes and Range offsets refer to the raw bytes
    return headers


# ------------------------------------------------------------------------------------------------- errors


@contextmanager
def _hub_errors(repo_id: str, revision: Optional[str], access_token: Optional[str]) -> Iterator[None]:
    """Turn what huggingface_hub and the OS raise into one-line UserErrors that say what to do."""
    import httpx2
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    endpoint = constants.ENDPOINT
    token_hint = "pass a token with --access_token or set HF_TOKEN (or log in with `hf auth login`)"
    try:
        yield
    except GatedRepoError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 403 or (access_token or get_token()):
            raise UserError(f"{repo_id} is gated and the token has no access to it ({status}): accept its terms at "
                            f"{endpoint}/{repo_id} with the account the token belongs to")
        raise UserError(f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id}, then {token_hint}")
    except RevisionNotFoundError:
        raise UserError(f"revision {revision!r} not found in {repo_id}; pass an existing branch, tag or commit hash")
    except RepositoryNotFoundError:
        raise UserError(f"repository {repo_id} not found on {endpoint}; check the repo id (supported: "
                        f"{', '.join(SUPPORTED_REPO_IDS)}); if it is private, {token_hint}")
    except RemoteEntryNotFoundError as e:
        raise UserError(f"a file of {repo_id} disappeared from the Hub during the download ({first_line(e)}); "
                        "run the same command again")
    except OfflineModeIsEnabled:
        raise UserError("HF_HUB_OFFLINE is set; unset it to download")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise UserError(f"the Hub rejected the access token (401: {_server_message(e)}); check --access_token, "
                            "HF_TOKEN or `hf auth login`")
        raise UserError(f"the Hub answered {status} for {repo_id}: {_server_message(e)}; try again later "
                        "(a re-run resumes where this one stopped)")
    except (httpx2.ConnectError, httpx2.TimeoutException, httpx2.ProxyError, httpx2.NetworkError) as e:
        raise UserError(f"cannot reach the Hub at {endpoint} ({first_line(e)}); check the network connection, set "
                        "HF_ENDPOINT to use a mirror, or HF_HUB_OFFLINE=1 to use a checkpoint already downloaded")
    except OSError as e:
        if e.errno in DISK_FULL:
            raise UserError(f"cannot write {e.filename or 'the download'}: {e.strerror}; free some space and run the "
                            "same command again, it resumes where it stopped")
        raise


def _server_message(e: Any) -> str:
    msg = e.response.headers.get("X-Error-Message") if getattr(e, "response", None) is not None else None
    return msg or first_line(e)


def _fmt(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
