"""Download Phi checkpoints from the Hugging Face Hub: only the files we need, from one commit, verified.

This module knows the Hub: it lists a repo (`HfApi.model_info`), chooses the weight kind and the files, runs
the transfer (lit_gpt/transfer.py: resumable, hashed, recorded) and turns what huggingface_hub, httpx2 and the
OS raise into one-line UserErrors. Where the listing gives no size or hash for a file (as some mirrors'
listings do), a HEAD of the file gives them, from the headers huggingface_hub's get_hf_file_metadata reads.
It speaks through huggingface_hub's own client (its HTTP session, headers and URLs), so HF_TOKEN or a
`hf auth login` token, HF_ENDPOINT mirrors, HF_HUB_OFFLINE and HF_HUB_DISABLE_PROGRESS_BARS all apply.
Converting the download is scripts/download.py's business: nothing here imports torch or the converter.
"""

import errno
import json
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import unquote, urlsplit

from lit_gpt.config import PHI_MODEL_TYPES, configs
from lit_gpt.files import CONFIG_FILES, HF_CONFIG, TOKENIZER_FILES, WEIGHT_KINDS, is_weight_file
from lit_gpt.transfer import (DISK_FULL, RemoteFile, State, bytes_missing, check_free_space, fetch, fmt_bytes,
                              holds_data, lock)
from lit_gpt.utils import InvalidArgument, UserError, first_line

# the named configs' repos (fine-tunes and mirrors download too: their config.json decides)
SUPPORTED_REPO_IDS = tuple(f"{c['hf_config']['org']}/{c['hf_config']['name']}" for c in configs)
API_TIMEOUT = 30.0  # seconds; HF_HUB_ETAG_TIMEOUT overrides it, as it does huggingface_hub's metadata timeout
TOKEN_SOURCES = " or set HF_TOKEN (or log in with `hf auth login`)"


@dataclass(frozen=True)
class Downloaded:
    """What a download left behind."""

    local_dir: Path  # checkpoint_dir/<org>/<name>
    commit: str
    files: list[str]  # everything this download holds, weights included
    weights: list[str]  # the weight files (none with tokenizer_only)
    fetched: int  # bytes received in this run; 0 when everything was there already


def download(
    repo_id: str,
    checkpoint_dir: Path = Path("checkpoints"),
    from_safetensors: Optional[bool] = None,
    tokenizer_only: bool = False,
    access_token: Optional[str] = None,
    revision: Optional[str] = None,
    space_for_conversion: bool = False,
) -> Downloaded:
    """Make checkpoint_dir/<org>/<name> hold config.json, generation_config.json, the tokenizer files and one
    kind of weights of `repo_id` at `revision`, all from one commit and checked against the Hub's hashes.

    from_safetensors chooses the weights (True: *.safetensors, False: *.bin, None: safetensors when there are
    any); when the asked-for kind is missing the other is taken, with a note. tokenizer_only fetches no weights.
    access_token defaults to HF_TOKEN or the `hf auth login` token. space_for_conversion: check before the
    transfer that the disk also has room for converting the weights (lit_model.pth holds them again).
    Under HF_HUB_OFFLINE a finished download is verified and used without the network.
    """
    if tokenizer_only and from_safetensors is not None:
        raise InvalidArgument("from_safetensors", "chooses weights, which tokenizer_only does not fetch")
    _check_repo_id(repo_id)
    from huggingface_hub import constants

    local_dir = Path(checkpoint_dir) / repo_id
    with _hub_errors(repo_id, revision, access_token):
        if constants.is_offline_mode():
            return _use_offline_copy(local_dir, repo_id, revision, tokenizer_only)
        job = _plan(repo_id, revision, access_token, from_safetensors, tokenizer_only)
        done = _run_in_new_dirs(job, local_dir, space_for_conversion)
    print(f"{job.at} (commit {job.commit[:10]}): {len(done.files)} files, {fmt_bytes(_size(job, done))} in "
          f"{local_dir} ({fmt_bytes(done.fetched)} downloaded now)", file=sys.stderr)
    return done


def _check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except ValueError as e:
        raise InvalidArgument("repo_id", f"{repo_id!r} is not a valid repo id: {first_line(e)}")
    if "/" not in repo_id:
        raise InvalidArgument("repo_id", f"{repo_id!r} needs the form <org>/<name>, e.g. microsoft/phi-2")


# ------------------------------------------------------------------------------------- what to fetch


@dataclass
class _Job:
    """The files to fetch from one commit of a repo. `first` decides the rest: config.json (is it Phi?) and
    the weight index (which shards?), so they arrive before anything big."""

    repo_id: str
    revision: Optional[str]
    commit: str  # every file comes from this one commit, even if a branch moves meanwhile
    remote: dict[str, Optional[RemoteFile]]  # the repo's top-level files at `commit`; None: size, hash not known yet
    kind: Optional[str]  # of WEIGHT_KINDS; None with tokenizer_only
    first: list[RemoteFile]
    rest: list[RemoteFile]  # the other config and tokenizer files; the weights are known after `first`
    access_token: Optional[str]

    @property
    def at(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    def url(self, name: str) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, name, revision=self.commit)

    def file(self, name: str) -> RemoteFile:
        """The file with its size and hash: from the repo's listing, or else from a HEAD of the file."""
        f = self.remote[name]
        if f is None:
            f = self.remote[name] = _described(self, name, _head(self, name))
        return f


def _plan(repo_id: str, revision: Optional[str], access_token: Optional[str], from_safetensors: Optional[bool],
          tokenizer_only: bool) -> _Job:
    at = f"{repo_id}@{revision}" if revision else repo_id
    info = _model_info(repo_id, revision, access_token, at)
    remote = _listing(info, at)
    job = _Job(repo_id, revision, info.sha or revision or "main", remote, None, [], [], access_token)
    small = [n for n in CONFIG_FILES + TOKENIZER_FILES if n in remote]
    first: list[str] = []
    if tokenizer_only:
        if not any(n in remote for n in ("tokenizer.json", "vocab.json")):
            raise UserError(f"{job.at} has no tokenizer files (tokenizer.json or vocab.json)")
    else:
        if HF_CONFIG not in remote:
            raise UserError(f"{job.at} has no config.json, so it does not hold a Phi checkpoint")
        job.kind = _weight_kind(remote, from_safetensors, job.at)
        index = WEIGHT_KINDS[job.kind][1]
        first = [HF_CONFIG] + ([index] if index in remote else [])
    # Ask for the first file before writing anything, so that gated repos fail here with the Hub's answer.
    lead = (first or small)[0]
    meta = _head(job, lead)
    if remote[lead] is None:
        remote[lead] = _described(job, lead, meta)
    job.first = [job.file(n) for n in first]
    job.rest = [job.file(n) for n in small if n not in first]
    return job


def _model_info(repo_id: str, revision: Optional[str], access_token: Optional[str], at: str) -> Any:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return HfApi(token=access_token).model_info(repo_id, revision=revision, files_metadata=True,
                                                    timeout=_api_timeout())
    except HfHubHTTPError:
        raise  # (BadRequestError is a ValueError too)
    except ValueError as e:  # a truncated answer, a web page (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        raise _malformed(at, f" ({first_line(e)})")
    except (TypeError, KeyError, AttributeError) as e:  # JSON of another shape: ModelInfo cannot take it
        raise _malformed(at, f" of a model's info ({'no ' if isinstance(e, KeyError) else ''}{first_line(e)})")


def _listing(info: Any, at: str) -> dict[str, Optional[RemoteFile]]:
    """The repo's top-level files, with the size and hash the answer gives for them (None where it gives none).

    An answer without any LFS info (some mirrors') cannot tell an LFS file's blobId, the hash of its pointer,
    from the hash of its content: then every file is described by a HEAD of it instead."""
    siblings = info.siblings
    if not isinstance(siblings, list) or not isinstance(info.sha, (str, type(None))):
        raise _malformed(at, " of a model's info (no list of files, or a commit that is not a string)")
    any_lfs = any(s.lfs for s in siblings)
    remote: dict[str, Optional[RemoteFile]] = {}
    for s in siblings:
        sha256 = s.lfs.sha256 if s.lfs else None
        if not (isinstance(s.rfilename, str) and _is(s.size, int) and _is(s.blob_id, str) and _is(sha256, str)):
            raise _malformed(at, f" of a model's info (an entry of its file list is {_short(s)})")
        if "/" not in s.rfilename:
            known = any_lfs and s.size is not None and (sha256 or s.blob_id)
            remote[s.rfilename] = RemoteFile(s.rfilename, s.size, sha256, s.blob_id) if known else None
    return remote


def _is(value: Any, kind: type) -> bool:
    """Whether an optional field of the Hub's JSON holds None or a `kind` (a bool is no int here)."""
    return value is None or (isinstance(value, kind) and not isinstance(value, bool))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:80] + "..."


def _malformed(at: str, problem: str) -> UserError:
    from huggingface_hub import constants

    return UserError(f"the Hub's answer for {at} is not valid JSON{problem}; is {constants.ENDPOINT} the Hub or a "
                     "mirror of it? If so, try again later")


def _head(job: _Job, name: str) -> Any:
    """The Hub's metadata of a file at the job's commit (huggingface_hub's HfFileMetadata)."""
    from huggingface_hub import get_hf_file_metadata

    return get_hf_file_metadata(job.url(name), token=job.access_token, timeout=_api_timeout())


def _described(job: _Job, name: str, meta: Any) -> RemoteFile:
    """A file as a HEAD describes it: its size (X-Linked-Size, or the Content-Length) and hash (X-Linked-Etag,
    the sha256 of an LFS file's content; or the ETag, the git blob id of a small file)."""
    from huggingface_hub import constants

    digest = (meta.etag or "").lower()
    if meta.size is None or not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", digest):
        raise UserError(f"{constants.ENDPOINT} gives no size or no hash for {name} of {job.at} (neither in the "
                        f"repo's file list nor as headers of the file: size {meta.size}, ETag {meta.etag!r}), so "
                        "its download could not be verified")
    sha256 = digest if len(digest) == 64 else None
    return RemoteFile(name, meta.size, sha256, None if sha256 else digest)


def _api_timeout() -> float:
    from huggingface_hub import constants

    return float(constants.HF_HUB_ETAG_TIMEOUT) if os.environ.get("HF_HUB_ETAG_TIMEOUT") else API_TIMEOUT


def _weight_kind(remote: dict, from_safetensors: Optional[bool], at: str) -> str:
    have = {kind: any(is_weight_file(n, kind) for n in remote) for kind in WEIGHT_KINDS}
    wanted = "bin" if from_safetensors is False else "safetensors"
    other = "bin" if wanted == "safetensors" else "safetensors"
    if have[wanted]:
        return wanted
    if have[other]:
        if from_safetensors is not None:
            print(f"note: {at} has no {wanted} weights, downloading the {other} weights instead", file=sys.stderr)
        return other
    raise UserError(f"{at} holds no model weights (*.safetensors or *.bin), so it is not a Phi checkpoint")


def _weight_files(job: _Job, local_dir: Path) -> list[RemoteFile]:
    """The weight files: the shards the (downloaded) index names when there is one, else every file of the kind."""
    index = WEIGHT_KINDS[job.kind][1]
    if index not in job.remote:
        return [job.file(n) for n in sorted(job.remote) if is_weight_file(n, job.kind)]
    try:
        shards = sorted(set(json.loads((local_dir / index).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index} of {job.at} is malformed ({first_line(e)})")
    missing = [s for s in shards if s not in job.remote]
    if missing:
        raise UserError(f"{index} of {job.at} names {missing[0]}, which the repo does not have")
    return [job.file(s) for s in shards]


def _check_model_type(config_path: Path, at: str) -> None:
    """Refuse non-Phi models before their weights are downloaded."""
    try:
        model_type = json.loads(config_path.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"config.json of {at} cannot be read ({first_line(e)})")
    if model_type is not None and model_type not in PHI_MODEL_TYPES:
        raise _NotPhi(f"{at} holds a {model_type!r} model, not Phi (its config.json has model_type "
                      f"{model_type!r}, not one of {', '.join(PHI_MODEL_TYPES)}); its weights were not downloaded")


class _NotPhi(UserError):
    """Nothing of such a repo is worth keeping: the directories the run created go, config.json included."""


def _is_weight_or_index(name: str) -> bool:
    return any(is_weight_file(name, kind) or name == index for kind, (_, index) in WEIGHT_KINDS.items())


def _size(job: _Job, done: Downloaded) -> int:
    return sum(job.file(name).size for name in done.files)


# ------------------------------------------------------------------------------------------- the run


def _run_in_new_dirs(job: _Job, local_dir: Path, space_for_conversion: bool) -> Downloaded:
    """Run the job; if it fails, remove the directories it created unless they hold downloaded bytes worth
    resuming (or the repo is not Phi at all)."""
    created = _mkdir(local_dir)
    try:
        return _run(job, local_dir, space_for_conversion)
    except _NotPhi:
        if created:
            shutil.rmtree(created[0], ignore_errors=True)
        raise
    except BaseException:
        if created and not holds_data(created[0]):
            shutil.rmtree(created[0], ignore_errors=True)
        raise


def _run(job: _Job, local_dir: Path, space_for_conversion: bool) -> Downloaded:
    with lock(local_dir), _download_counter():
        state = State.load(local_dir)
        state.start(job.repo_id, job.revision, job.commit, tokenizer_only=job.kind is None)
        fetcher = _Fetcher(job, local_dir, state)
        fetcher.fetch(job.first)
        weights: list[RemoteFile] = []
        if job.kind is not None and not fetcher.bad:
            _check_model_type(local_dir / HF_CONFIG, job.at)
            weights = _weight_files(job, local_dir)
        if not fetcher.bad:
            need = bytes_missing(local_dir, job.rest + weights)
            if space_for_conversion:
                need += sum(f.size for f in job.rest + weights)  # lit_model.pth: the same tensors again
            check_free_space(local_dir, need,
                             "the download and conversion need" if space_for_conversion else "the download needs")
            if job.kind is not None:
                _remove_other_weights(state, {f.path for f in job.first + weights})
            fetcher.fetch(job.rest + weights)
        if fetcher.bad:
            state.save()
            them = "them" if len(fetcher.bad) > 1 else "it"
            raise UserError(f"{', '.join(fetcher.bad)} did not match the size or hash the Hub publishes (corrupted "
                            f"in transit?); deleted {them}: run the same command again to fetch {them} anew")
        files = [f.path for f in job.first + job.rest + weights]
        state.finish(files)
        state.save()
    return Downloaded(local_dir, job.commit, files, [f.path for f in weights], fetcher.fetched)


class _Fetcher:
    """Fetches files of the job's commit, counting the bytes received and the files that failed verification:
    those are deleted, and the run goes on with the others so that one re-run fetches all of them anew."""

    def __init__(self, job: _Job, local_dir: Path, state: State) -> None:
        self.job, self.local_dir, self.state = job, local_dir, state
        self.headers = _headers(job.access_token)
        self.fetched = 0
        self.bad: list[str] = []

    def fetch(self, files: list[RemoteFile]) -> None:
        for f in files:
            got = fetch(f, self.job.url(f.path), self.local_dir, self.headers, self.state)
            if got is None:
                self.bad.append(f.path)
            else:
                self.fetched += got


def _remove_other_weights(state: State, keep: set[str]) -> None:
    """Delete weight files an earlier download put here (another revision or kind) that are not wanted now, so
    the converter cannot mix them in. Files this downloader did not write are never touched."""
    for name in state.recorded():
        if _is_weight_or_index(name) and name not in keep:
            state.remove(name)
            print(f"note: removed {name}, left by an earlier download of another revision or weight kind",
                  file=sys.stderr)


def _use_offline_copy(local_dir: Path, repo_id: str, revision: Optional[str], tokenizer_only: bool) -> Downloaded:
    """HF_HUB_OFFLINE: accept a finished download of the same repo (and revision) without the network."""
    state = State.load(local_dir)
    data = state.data
    same = (data.get("repo_id") == repo_id and data.get("complete")
            and (revision is None or revision in (data.get("revision"), data.get("commit")))
            and (tokenizer_only or not data.get("tokenizer_only")))
    files = data.get("last_run", []) if same else []
    for name in files:
        final = local_dir / name
        f = RemoteFile.from_json(name, data["files"].get(name, {}))
        if not final.is_file() or not state.is_verified(final, f, quiet=True):
            same = False
            break
    if not same:
        at = f"{repo_id}@{revision}" if revision else repo_id
        raise UserError(f"HF_HUB_OFFLINE is set and {local_dir} holds no complete download of {at}; "
                        "unset HF_HUB_OFFLINE to download it")
    state.save()
    commit = str(data.get("commit"))
    print(f"HF_HUB_OFFLINE is set: using the download of {repo_id} (commit {commit[:10]}) in {local_dir}",
          file=sys.stderr)
    weights = [n for n in files if any(is_weight_file(n, kind) for kind in WEIGHT_KINDS)]
    return Downloaded(local_dir, commit, files, weights, 0)


def _mkdir(path: Path) -> list[Path]:
    """mkdir -p that returns the directories it created, outermost first."""
    created = []
    p = path.absolute()
    while not os.path.lexists(p):
        created.append(p)
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        for d in created:  # innermost first: what mkdir made before it failed
            try:
                d.rmdir()
            except OSError:
                pass  # never made
        raise
    return created[::-1]


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


class TokenNeeded(UserError):
    """The Hub wants a token, or another one. The message says how to pass one; `naming(option)` says it with
    the caller's name for it (scripts/download.py: --access_token; here: the access_token argument)."""

    def __init__(self, before: str, after: str = TOKEN_SOURCES) -> None:
        self.before, self.after = before, after
        super().__init__(self.naming("the access_token argument"))

    def naming(self, option: str) -> str:
        return f"{self.before}{option}{self.after}"


@contextmanager
def _hub_errors(repo_id: str, revision: Optional[str], access_token: Optional[str]) -> Iterator[None]:
    """Turn what huggingface_hub and the OS raise into one-line UserErrors that say what to do."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        error = _translate(e, repo_id, revision, access_token)
        if error is None:
            raise
        raise error from e


def _translate(e: Exception, repo_id: str, revision: Optional[str], access_token: Optional[str]
               ) -> Optional[UserError]:
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(e, OfflineModeIsEnabled):
        return UserError("HF_HUB_OFFLINE is set; unset it to download")
    if isinstance(e, HfHubHTTPError):  # (an OSError too: test it first)
        return _http_error(e, repo_id, revision, access_token)
    if isinstance(e, httpx2.RequestError):
        return _network_error(e)
    if isinstance(e, OSError):
        return _os_error(e)
    return None


def _http_error(e: Any, repo_id: str, revision: Optional[str], access_token: Optional[str]) -> UserError:
    """What the Hub's answer means: no access (401, 403), not found (404), or a failure that passes (5xx, 429)."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    endpoint, (status, code) = constants.ENDPOINT, _status(e)
    name = _file_asked_for(e, repo_id)
    what = f"{name} of {repo_id}" if name else f"{repo_id}@{revision}" if revision else repo_id
    has_token = bool(access_token or get_token())
    if isinstance(e, GatedRepoError):  # (a RepositoryNotFoundError too: test it first)
        if status == 403 or has_token:
            return UserError(f"{repo_id} is gated and the token has no access to it ({status}): accept its terms at "
                             f"{endpoint}/{repo_id} with the account the token belongs to")
        return TokenNeeded(f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id}, then pass a token with ")
    if isinstance(e, RevisionNotFoundError):
        return InvalidArgument("revision", f"{revision!r} not found in {repo_id}; pass an existing branch, tag or "
                                           "commit hash")
    if isinstance(e, RepositoryNotFoundError) and (code or status != 401):  # (not only huggingface_hub's guess)
        return _repo_not_found(repo_id, "")
    if isinstance(e, RemoteEntryNotFoundError):
        return UserError(f"{what} disappeared from the Hub during the download ({first_line(e)}); run the same "
                         "command again")
    detail = _answer(e)
    if status == 401 and has_token:
        return TokenNeeded(f"the Hub rejected the access token ({detail}); check ", ", HF_TOKEN or `hf auth login`")
    if status in (401, 403):
        how = "with this token" if has_token else "without a token"
        return TokenNeeded(f"{endpoint} denied access to {what} {how} ({detail}); pass a token that has access "
                           "with ")
    if status == 404:
        if name:
            return UserError(f"{what} not found on {endpoint} ({detail}), although the repo lists it; run the same "
                             "command again later")
        if revision:
            return UserError(f"{what} not found on {endpoint} ({detail}); check the repo id and the revision")
        return _repo_not_found(repo_id, f" ({detail})")
    if status in (408, 429) or (status or 0) >= 500:
        return UserError(f"the Hub answered {detail} for {what}; try again later (a re-run resumes where this one "
                         "stopped)")
    return UserError(f"the Hub at {endpoint} refused the request for {what} ({detail})")


def _repo_not_found(repo_id: str, detail: str) -> UserError:
    from huggingface_hub import constants

    return TokenNeeded(f"repository {repo_id} not found on {constants.ENDPOINT}{detail}; check the repo id "
                       f"(supported: {', '.join(SUPPORTED_REPO_IDS)}); if it is private, pass a token with ")


def _status(e: Any) -> tuple[Optional[int], Optional[str]]:
    """The HTTP status of a failed request and the Hub's X-Error-Code (None from a plain server or proxy)."""
    response = getattr(e, "response", None)
    if response is None:
        return None, None
    return response.status_code, response.headers.get("X-Error-Code")


def _file_asked_for(e: Any, repo_id: str) -> Optional[str]:
    """The file a failed request was for, from its /resolve/ URL (also when the CDN it was redirected to
    answered); None for the repo's API."""
    response = getattr(e, "response", None)
    marker = f"/{repo_id}/resolve/"
    for r in [*getattr(response, "history", []), response] if response is not None else []:
        path = urlsplit(str(r.request.url)).path
        if marker in path:
            rest = path.split(marker, 1)[1].split("/", 1)  # <revision>/<file>, each quoted
            return unquote(rest[1]) if len(rest) == 2 else None
    return None


def _network_error(e: Exception) -> UserError:
    import httpx2
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if isinstance(e, (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.ProxyError)):
        return UserError(f"cannot reach the Hub at {endpoint} ({first_line(e)}); check the network connection, set "
                         "HF_ENDPOINT to use a mirror, or HF_HUB_OFFLINE=1 to use a checkpoint already downloaded")
    failed = ("did not answer in time" if isinstance(e, httpx2.TimeoutException) else "broke the connection"
              if isinstance(e, httpx2.TransportError) else "sent an answer that could not be read")
    return UserError(f"the Hub at {endpoint} {failed} ({first_line(e)}); try again later (a re-run resumes where "
                     "this one stopped)")


def _os_error(e: OSError) -> UserError:
    """The OS refused to read or write a file of the download (nothing is left half-written: files take their
    names only when complete, and a run that fails removes the directories it created, unless they hold data)."""
    path = e.filename2 or e.filename  # (os.replace names its target second)
    where = path or "the checkpoint directory"
    elsewhere = "move it away or choose another checkpoint directory"
    if e.errno in DISK_FULL:
        return UserError(f"cannot write {e.filename or 'the download'}: {e.strerror}; free some space and run the "
                         "same command again, it resumes where it stopped")
    if e.errno == errno.ENOTDIR and path:
        return UserError(f"{_file_in_the_way(Path(path))} is a file, where {path} needs a directory; {elsewhere}")
    if e.errno == errno.EEXIST and path and os.path.lexists(path) and not os.path.isdir(path):
        return UserError(f"{path} is a file, where the download needs a directory; {elsewhere}")
    if e.errno == errno.EISDIR:
        return UserError(f"{where} is a directory, where the download puts a file; {elsewhere}")
    if e.errno in (errno.EACCES, errno.EPERM):
        denied = "permission denied for" if e.errno == errno.EACCES else "operation not permitted on"
        return UserError(f"{denied} {where}; the download reads and writes under the checkpoint directory: fix the "
                         "permissions or choose another checkpoint directory")
    if e.errno == errno.EROFS:
        return UserError(f"cannot write {where}: it is on a read-only file system; choose another checkpoint "
                         "directory")
    return UserError(f"cannot use {where}: {e.strerror or first_line(e)}")


def _file_in_the_way(path: Path) -> Path:
    """The nearest of path's ancestors that exists but is not a directory (ENOTDIR names the path, not it)."""
    for p in path.parents:
        if os.path.lexists(p) and not p.is_dir():
            return p
    return path


def _answer(e: Any) -> str:
    """The status and the Hub's X-Error-Message ("401: Invalid credentials ..."), or the status and its reason
    phrase ("403 Forbidden") from a server that sends none."""
    response = getattr(e, "response", None)
    if response is None:
        return first_line(e)
    message = response.headers.get("X-Error-Message")
    return f"{response.status_code}: {message}" if message else f"{response.status_code} {response.reason_phrase}"
