"""A loopback Hugging Face Hub: the HTTP endpoints huggingface_hub's client uses to download model repos.

Repos are directories on disk, one per commit, with branch and tag names pointing at commits. Served:

    GET  /api/agent-harnesses                                     (empty) registry the client reads for its user agent
    GET  /api/models/{org}/{name}[/revision/{rev}][?blobs=true]   repo info (sha, siblings, LFS metadata)
    GET  /api/models/{org}/{name}/tree/{rev}[/{path}][?recursive=true]   file tree with sizes, oids, LFS sha256
    POST /api/models/{org}/{name}/paths-info/{rev}                paths=..&paths=.. -> the same entries
    HEAD/GET /{org}/{name}/resolve/{rev}/{path}                   small files: 200 with X-Repo-Commit and
                                                                  ETag (git blob sha1), Range -> 206;
                                                                  LFS files: 302 to the CDN with X-Linked-Etag
                                                                  (sha256) and X-Linked-Size, like the Hub
    HEAD/GET {cdn}/cdn/{sha256}?repo=..&path=..                   the LFS bytes, Range -> 206, no auth

The CDN listens on a second port, so it is another origin, as on the Hub: the client's HEAD stops at the 302,
and httpx drops the Authorization header when it follows the redirect.

Errors carry the X-Error-Code / X-Error-Message headers huggingface_hub maps to its exceptions: RepoNotFound
(404, or 401 for a private repo without an allowed token), RevisionNotFound (404), EntryNotFound (404),
GatedRepo (401 without a token, 403 with a token that has no access), and 401 "Invalid credentials in
Authorization header" for a token the server does not know.

For tests of interrupted downloads, the server counts the body bytes it sends per (repo, file), and can be told
to drop the connection, or to stall, after N bytes of a file, on the next requests for it.

To stand in for mirrors and proxies that speak the API less well than the Hub: `sizes_in_info = False` lists
files in the repo info by name only (no size, blobId or LFS info, even for ?blobs=true); `intercept` answers the
next requests to a URL with a plain HTTP error (no X-Error-Code), a body that is not the Hub's JSON, a body cut
short, or no answer at all.
"""

import hashlib
import json
import socket
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable, Optional, Union
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")
CHUNK = 64 * 1024


class FileEntry:
    def __init__(self, root: Path, path: str) -> None:
        self.path, self.file = path, root / path
        data = self.file.read_bytes()
        self.size = len(data)
        self.git_sha1 = hashlib.sha1(b"blob %d\0" % self.size + data).hexdigest()
        self.lfs = path.endswith(LFS_SUFFIXES)
        if self.lfs:
            self.sha256 = hashlib.sha256(data).hexdigest()
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
            self.pointer_size = len(pointer)
            self.oid = hashlib.sha1(b"blob %d\0" % len(pointer) + pointer.encode()).hexdigest()
        else:
            self.oid = self.git_sha1

    def tree_json(self) -> dict:
        out = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.lfs:
            out["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return out

    def sibling_json(self) -> dict:
        out = {"rfilename": self.path, "size": self.size, "blobId": self.oid}
        if self.lfs:
            out["lfs"] = {"sha256": self.sha256, "size": self.size, "pointerSize": self.pointer_size}
        return out


class HubRepo:
    def __init__(self, repo_id: str, gated: bool = False, private: bool = False) -> None:
        self.repo_id, self.gated, self.private = repo_id, gated, private
        self.commits: dict[str, dict[str, FileEntry]] = {}
        self.refs: dict[str, str] = {}
        self.allowed_tokens: set[str] = set()  # who may read a gated or private repo

    def add_revision(self, directory: Path, refs: Iterable[str] = ("main",)) -> str:
        """Publish the files under `directory` as a new commit; `refs` (branches, tags) point at it. Returns its sha."""
        directory = Path(directory)
        sha = hashlib.sha1(f"{self.repo_id}\n{len(self.commits)}\n{directory}".encode()).hexdigest()
        paths = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
        self.commits[sha] = {p: FileEntry(directory, p) for p in paths}
        for ref in refs:
            self.refs[ref] = sha
        return sha

    def resolve(self, rev: str) -> Optional[str]:
        return rev if rev in self.commits else self.refs.get(rev)


@dataclass
class Interception:
    """What the next `times` requests whose URL path contains `where` (on the hub or the CDN) get instead of
    their answer. how: "answer" (status and body, and no X-Error-Code), "short" (a Content-Length that promises
    more than the body, then the connection drops) or "hang" (nothing until `release` is set, then a drop)."""

    where: str
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain"
    how: str = "answer"
    times: int = 1
    headers: dict = field(default_factory=dict)


class HubServer:
    """The state shared by the handler threads, and the two listening servers (hub, cdn)."""

    def __init__(self) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.valid_tokens: set[str] = set()
        self.served: Counter = Counter()  # (repo_id, path) -> body bytes sent
        self.requests: list[tuple[str, str, Optional[str]]] = []  # (method, url path, Range header)
        self.faults: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
        self.corrupted: set[tuple[str, str]] = set()
        self.interceptions: list[Interception] = []
        self.sizes_in_info = True  # False: the repo info lists file names only, as some mirrors do
        self.release = threading.Event()  # lets stalled responses go (they then drop the connection)
        self.lock = threading.Lock()
        self._hub = _Server(("127.0.0.1", 0), _Handler, self, cdn=False)
        self._cdn = _Server(("127.0.0.1", 0), _Handler, self, cdn=True)
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self._hub, self._cdn)]
        for t in self._threads:
            t.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def add_repo(self, repo_id: str, gated: bool = False, private: bool = False) -> HubRepo:
        self.repos[repo_id] = HubRepo(repo_id, gated=gated, private=private)
        return self.repos[repo_id]

    def add_token(self, token: str, *repo_ids: str) -> None:
        """A token the server knows, with access to the given gated/private repos."""
        self.valid_tokens.add(token)
        for r in repo_ids:
            self.repos[r].allowed_tokens.add(token)

    def drop_after(self, repo_id: str, path: str, *nbytes: int) -> None:
        """The next len(nbytes) GETs of the file each close the connection after sending that many body bytes."""
        with self.lock:
            self.faults[(repo_id, path)].extend(("drop", n) for n in nbytes)

    def stall_after(self, repo_id: str, path: str, nbytes: int) -> None:
        """The next GET of the file sends nbytes, then hangs until `release` is set (then drops the connection)."""
        with self.lock:
            self.faults[(repo_id, path)].append(("stall", nbytes))

    def corrupt(self, repo_id: str, path: str, on: bool = True) -> None:
        """Serve the file with one byte flipped (as a broken proxy or disk would), until turned off."""
        (self.corrupted.add if on else self.corrupted.discard)((repo_id, path))

    def intercept(self, where: str, status: int = 200, body: bytes = b"", **kw) -> None:
        """The next requests whose URL path contains `where` get this answer instead (see Interception)."""
        with self.lock:
            self.interceptions.append(Interception(where, status, body, **kw))

    def next_interception(self, path: str) -> Optional[Interception]:
        """The interception a request to `path` meets, if any (it counts as one of its `times`)."""
        with self.lock:
            for i in self.interceptions:
                if i.where in path:
                    i.times -= 1
                    if i.times <= 0:
                        self.interceptions.remove(i)
                    return i
        return None

    def bytes_served(self, repo_id: str, path: Optional[str] = None) -> int:
        with self.lock:
            return sum(n for (r, p), n in self.served.items() if r == repo_id and path in (None, p))

    def reset_counts(self) -> None:
        with self.lock:
            self.served.clear()
            self.requests.clear()

    def reset(self) -> None:
        """Counts, pending faults and corruption back to none (between tests)."""
        self.release.set()  # free any response still stalled
        with self.lock:
            self.faults.clear()
            self.interceptions.clear()
        self.corrupted.clear()
        self.sizes_in_info = True
        self.reset_counts()
        self.release = threading.Event()

    def close(self) -> None:
        self.release.set()
        for s in (self._hub, self._cdn):
            s.shutdown()
            s.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, hub: HubServer, cdn: bool) -> None:
        super().__init__(address, handler)
        self.hub, self.cdn = hub, cdn


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    # -------------------------------------------------------------------------------------------- routing

    def _handle(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        query = parse_qs(split.query)
        parts = [unquote(s) for s in split.path.split("/")[1:]]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "POST" else b""
        with hub.lock:
            hub.requests.append((self.command, split.path, self.headers.get("Range")))
        interception = hub.next_interception(split.path)
        if interception is not None:
            return self._intercepted(interception)
        try:
            if self.server.cdn:
                if len(parts) == 2 and parts[0] == "cdn" and self.command in ("GET", "HEAD"):
                    return self._cdn(parts[1], query)
                raise _HTTPError(404, "Not found")
            token = self._token()
            if token is not None and token not in hub.valid_tokens:
                raise _HTTPError(401, "Invalid credentials in Authorization header")
            if parts == ["api", "agent-harnesses"] and self.command == "GET":  # fetched for the user agent
                return self._json({"standardEnvVars": [], "harnesses": {}})
            if len(parts) >= 4 and parts[:2] == ["api", "models"]:
                repo = self._repo("/".join(parts[2:4]), token)
                rest = parts[4:]
                if not rest and self.command == "GET":
                    return self._info(repo, "main", query)
                if len(rest) == 2 and rest[0] == "revision" and self.command == "GET":
                    return self._info(repo, rest[1], query)
                if len(rest) >= 2 and rest[0] == "tree" and self.command == "GET":
                    return self._tree(repo, rest[1], "/".join(rest[2:]), query)
                if len(rest) == 2 and rest[0] == "paths-info" and self.command == "POST":
                    return self._paths_info(repo, rest[1], parse_qs(body.decode()))
            elif len(parts) >= 5 and parts[2] == "resolve" and self.command in ("GET", "HEAD"):
                repo = self._repo("/".join(parts[:2]), token)
                return self._resolve(repo, parts[3], "/".join(parts[4:]), token)
            raise _HTTPError(404, "Not found")
        except _HTTPError as e:
            self._error(e)

    def _token(self) -> Optional[str]:
        auth = self.headers.get("Authorization")
        if auth and auth.lower().startswith("bearer "):
            return auth[7:].strip()
        return None

    def _repo(self, repo_id: str, token: Optional[str]) -> HubRepo:
        repo = self.server.hub.repos.get(repo_id)
        if repo is None:
            raise _HTTPError(404, "Repository not found", "RepoNotFound")
        if repo.private and token not in repo.allowed_tokens:
            raise _HTTPError(401, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: HubRepo, rev: str) -> tuple[str, dict[str, FileEntry]]:
        sha = repo.resolve(rev)
        if sha is None:
            raise _HTTPError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha, repo.commits[sha]

    # ------------------------------------------------------------------------------------------- endpoints

    def _info(self, repo: HubRepo, rev: str, query: dict) -> None:
        sha, files = self._commit(repo, rev)
        blobs = query.get("blobs", ["false"])[0].lower() in ("true", "1")
        self._json({
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24], "id": repo.repo_id, "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0], "sha": sha, "lastModified": "2024-01-01T00:00:00.000Z",
            "createdAt": "2023-12-01T00:00:00.000Z", "private": repo.private,
            "gated": "manual" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0,
            "library_name": "transformers", "tags": ["transformers", "safetensors", "phi", "text-generation"],
            "pipeline_tag": "text-generation",
            "siblings": [f.sibling_json() if blobs and self.server.hub.sizes_in_info else {"rfilename": f.path}
                         for f in files.values()],
            "usedStorage": sum(f.size for f in files.values()),
        })

    def _tree(self, repo: HubRepo, rev: str, prefix: str, query: dict) -> None:
        _, files = self._commit(repo, rev)
        recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
        base = f"{prefix}/" if prefix else ""
        if prefix and not any(p.startswith(base) for p in files):
            raise _HTTPError(404, f"Entry not found: {prefix}", "EntryNotFound")
        entries, dirs = [], set()
        for path, f in files.items():
            if not path.startswith(base):
                continue
            rel = path[len(base):].split("/")
            for depth in range(1, len(rel)):  # folders on the way
                d = base + "/".join(rel[:depth])
                if (recursive or depth == 1) and d not in dirs:
                    dirs.add(d)
                    entries.append({"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                                    "path": d})
            if recursive or len(rel) == 1:
                entries.append(f.tree_json())
        self._json(entries)

    def _paths_info(self, repo: HubRepo, rev: str, form: dict) -> None:
        _, files = self._commit(repo, rev)
        self._json([files[p].tree_json() for p in form.get("paths", []) if p in files])

    def _resolve(self, repo: HubRepo, rev: str, path: str, token: Optional[str]) -> None:
        sha, files = self._commit(repo, rev)
        if repo.gated and token not in repo.allowed_tokens:
            if token is None:
                raise _HTTPError(401, f"Access to model {repo.repo_id} is restricted. You must have access to it "
                                      "and be authenticated to access it. Please log in.", "GatedRepo")
            raise _HTTPError(403, f"Access to model {repo.repo_id} is restricted and you are not in the authorized "
                                  f"list. Visit {self.server.hub.url}/{repo.repo_id} to ask for access.", "GatedRepo")
        f = files.get(path)
        if f is None:
            raise _HTTPError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha}
        if f.lfs:
            location = (f"{self.server.hub.cdn_url}/cdn/{f.sha256}?repo={quote(repo.repo_id, safe='')}"
                        f"&path={quote(path, safe='')}")
            note = b"Found. Redirecting to " + location.encode()
            headers.update({"Location": location, "ETag": f'"{f.oid}"', "X-Linked-Etag": f'"{f.sha256}"',
                            "X-Linked-Size": str(f.size), "Content-Type": "text/plain; charset=utf-8"})
            return self._send(302, headers, note)
        headers["ETag"] = f'"{f.git_sha1}"'
        self._serve_file(repo.repo_id, f, headers)

    def _cdn(self, sha256: str, query: dict) -> None:
        hub = self.server.hub
        repo = hub.repos.get(query.get("repo", [""])[0])
        path = query.get("path", [""])[0]
        for files in (repo.commits.values() if repo else []):
            f = files.get(path)
            if f is not None and f.lfs and f.sha256 == sha256:
                return self._serve_file(repo.repo_id, f, {"ETag": f'"{sha256}"'})
        raise _HTTPError(404, "NoSuchKey")

    # ------------------------------------------------------------------------------------------------ I/O

    def _serve_file(self, repo_id: str, f: FileEntry, headers: dict) -> None:
        hub = self.server.hub
        start, end, status = 0, f.size - 1, 200
        rng = self.headers.get("Range")
        if rng:
            try:
                unit, spec = rng.split("=", 1)
                a, b = spec.split("-", 1)
                start, end = int(a), (int(b) if b else f.size - 1)
                assert unit.strip() == "bytes"
            except (ValueError, AssertionError):
                raise _HTTPError(400, f"bad Range {rng!r}")
            if start >= f.size:
                raise _HTTPError(416, "Requested Range Not Satisfiable", headers={"Content-Range": f"bytes */{f.size}"})
            end = min(end, f.size - 1)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        headers.update({"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                        "Content-Length": str(end - start + 1)})
        self._start(status, headers)
        if self.command == "HEAD":
            return
        data = bytearray(f.file.read_bytes()[start:end + 1])
        key = (repo_id, f.path)
        if key in hub.corrupted and data:
            data[len(data) // 2] ^= 0xFF
        with hub.lock:
            fault = hub.faults[key].pop(0) if hub.faults[key] else None
        limit = len(data) if fault is None else min(fault[1], len(data))
        sent = 0
        try:
            while sent < limit:
                piece = bytes(data[sent:min(sent + CHUNK, limit)])
                self.wfile.write(piece)
                sent += len(piece)
                with hub.lock:
                    hub.served[key] += len(piece)
            if fault is not None:
                if fault[0] == "stall":
                    hub.release.wait(timeout=120)
                self._drop()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _intercepted(self, i: Interception) -> None:
        if i.how == "hang":
            self.server.hub.release.wait(timeout=120)
            return self._drop()
        headers = dict(i.headers, **{"Content-Type": i.content_type})
        if i.how == "short":
            self._start(i.status, dict(headers, **{"Content-Length": str(len(i.body) + 1000)}))
            if self.command != "HEAD":
                self.wfile.write(i.body)
            return self._drop()
        self._send(i.status, headers, i.body)

    def _drop(self) -> None:
        """Close the TCP connection in the middle of the body, as a broken network would."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _start(self, status: int, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, status: int, headers: dict, body: bytes) -> None:
        self._start(status, dict(headers, **{"Content-Length": str(len(body))}))
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: Union[dict, list]) -> None:
        self._send(200, {"Content-Type": "application/json"}, json.dumps(obj).encode())

    def _error(self, e: _HTTPError) -> None:
        headers = dict(e.headers, **{"Content-Type": "application/json", "X-Error-Message": e.message})
        if e.code:
            headers["X-Error-Code"] = e.code
        self._send(e.status, headers, json.dumps({"error": e.message}).encode())
