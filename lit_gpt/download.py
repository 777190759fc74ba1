"""Download Phi checkpoints from the Hugging Face Hub: only the files we need, from one commit, verified.

This module knows the Hub: it lists a repo (`HfApi.model_info`), chooses the weight kind and the files, runs
the transfer (lit_gpt/transfer.py: resumable, hashed, recorded) and turns what huggingface_hub, httpx2 and the
OS raise into one-line UserErrors. It speaks through huggingface_hub's own client (its HTTP session, headers
and URLs), so HF_TOKEN or a `hf auth login` token, HF_ENDPOINT mirrors, HF_HUB_OFFLINE and
HF_HUB_DISABLE_PROGRESS_BARS all apply. Converting the download is scripts/download.py's business: nothing
here imports torch or the converter.
"""

import json
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from lit_gpt.config import PHI_MODEL_TYPES
from lit_gpt.files import CONFIG_FILES, HF_CONFIG, TOKENIZER_FILES, WEIGHT_KINDS, is_weight_file
from lit_gpt.transfer import (DISK_FULL, RemoteFile, State, bytes_missing, check_free_space, fetch, fmt_bytes,
                              holds_data, lock)
from lit_gpt.utils import InvalidArgument, UserError, first_line

SUPPORTED_REPO_IDS = ("microsoft/phi-1", "microsoft/phi-1_5", "microsoft/phi-2")
API_TIMEOUT = 30.0
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
    if constants.is_offline_mode():
        return _use_offline_copy(local_dir, repo_id, revision, tokenizer_only)
    with _hub_errors(repo_id, revision, access_token):
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
    remote: dict[str, RemoteFile]  # the repo's top-level files at `commit`
    kind: Optional[str]  # of WEIGHT_KINDS; None with tokenizer_only
    first: list[RemoteFile]
    rest: list[RemoteFile]  # the other config and tokenizer files; the weights are known after `first`
    access_token: Optional[str]

    @property
    def at(self) -> str:
        return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id

    def url(self, f: RemoteFile) -> str:
        from huggingface_hub import hf_hub_url

        return hf_hub_url(self.repo_id, f.path, revision=self.commit)


def _plan(repo_id: str, revision: Optional[str], access_token: Optional[str], from_safetensors: Optional[bool],
          tokenizer_only: bool) -> _Job:
    from huggingface_hub import HfApi, get_hf_file_metadata

    info = HfApi(token=access_token).model_info(repo_id, revision=revision, files_metadata=True,
                                                timeout=API_TIMEOUT)
    remote = {s.rfilename: RemoteFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id)
              for s in info.siblings or [] if "/" not in s.rfilename and s.size is not None}
    job = _Job(repo_id, revision, info.sha or revision or "main", remote, None, [], [], access_token)
    small = [remote[n] for n in CONFIG_FILES + TOKENIZER_FILES if n in remote]
    if tokenizer_only:
        if not any(n in remote for n in ("tokenizer.json", "vocab.json")):
            raise UserError(f"{job.at} has no tokenizer files (tokenizer.json or vocab.json)")
    else:
        if HF_CONFIG not in remote:
            raise UserError(f"{job.at} has no config.json, so it does not hold a Phi checkpoint")
        job.kind = _weight_kind(remote, from_safetensors, job.at)
        index = WEIGHT_KINDS[job.kind][1]
        job.first = [remote[HF_CONFIG]] + ([remote[index]] if index in remote else [])
    job.rest = [f for f in small if f not in job.first]
    # Ask for the first file before writing anything, so that gated repos fail here with the Hub's answer.
    get_hf_file_metadata(job.url((job.first or job.rest)[0]), token=access_token, timeout=API_TIMEOUT)
    return job


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
        return [f for n, f in sorted(job.remote.items()) if is_weight_file(n, job.kind)]
    try:
        shards = sorted(set(json.loads((local_dir / index).read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{index} of {job.at} is malformed ({first_line(e)})")
    missing = [s for s in shards if s not in job.remote]
    if missing:
        raise UserError(f"{index} of {job.at} names {missing[0]}, which the repo does not have")
    return [job.remote[s] for s in shards]


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
    return sum(job.remote[name].size for name in done.files)


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
            got = fetch(f, self.job.url(f), self.local_dir, self.headers, self.state)
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
    while not p.exists():
        created.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
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
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)

    endpoint = constants.ENDPOINT
    status = e.response.status_code if getattr(e, "response", None) is not None else None
    if isinstance(e, GatedRepoError):  # (a RepositoryNotFoundError too: test it first)
        if status == 403 or (access_token or get_token()):
            return UserError(f"{repo_id} is gated and the token has no access to it ({status}): accept its terms at "
                             f"{endpoint}/{repo_id} with the account the token belongs to")
        return TokenNeeded(f"{repo_id} is gated: accept its terms at {endpoint}/{repo_id}, then pass a token with ")
    if isinstance(e, RevisionNotFoundError):
        return InvalidArgument("revision", f"{revision!r} not found in {repo_id}; pass an existing branch, tag or "
                                           "commit hash")
    if isinstance(e, RepositoryNotFoundError):
        return TokenNeeded(f"repository {repo_id} not found on {endpoint}; check the repo id (supported: "
                           f"{', '.join(SUPPORTED_REPO_IDS)}); if it is private, pass a token with ")
    if isinstance(e, RemoteEntryNotFoundError):
        return UserError(f"a file of {repo_id} disappeared from the Hub during the download ({first_line(e)}); "
                         "run the same command again")
    if isinstance(e, OfflineModeIsEnabled):
        return UserError("HF_HUB_OFFLINE is set; unset it to download")
    if isinstance(e, HfHubHTTPError) and status == 401:
        return TokenNeeded(f"the Hub rejected the access token (401: {_server_message(e)}); check ",
                           ", HF_TOKEN or `hf auth login`")
    if isinstance(e, HfHubHTTPError):
        return UserError(f"the Hub answered {status} for {repo_id}: {_server_message(e)}; try again later "
                         "(a re-run resumes where this one stopped)")
    if isinstance(e, (httpx2.ConnectError, httpx2.TimeoutException, httpx2.ProxyError, httpx2.NetworkError)):
        return UserError(f"cannot reach the Hub at {endpoint} ({first_line(e)}); check the network connection, set "
                         "HF_ENDPOINT to use a mirror, or HF_HUB_OFFLINE=1 to use a checkpoint already downloaded")
    if isinstance(e, OSError) and e.errno in DISK_FULL:
        return UserError(f"cannot write {e.filename or 'the download'}: {e.strerror}; free some space and run the "
                         "same command again, it resumes where it stopped")
    return None


def _server_message(e: Any) -> str:
    msg = e.response.headers.get("X-Error-Message") if getattr(e, "response", None) is not None else None
    return msg or first_line(e)
