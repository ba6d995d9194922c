"""A local fake of the Hugging Face Hub routes huggingface_hub 2.4 uses to download, for tests.

Serves, on 127.0.0.1 in a thread:
- GET  /api/models/<repo>/revision/<rev>[?blobs=true]   model info with siblings (size, blobId, lfs)
- GET  /api/models/<repo>/tree/<rev>[/<path>]           tree listing with sizes and oid
  As on the Hub, blobId/oid is the git blob SHA-1 of what git stores: the file itself, or for an LFS file its
  pointer text (the content hash is then lfs.sha256 / lfs.oid).
- HEAD /<repo>/resolve/<rev>/<path>   regular file: 200 + ETag (git blob id), X-Repo-Commit, Content-Length;
                                      LFS file (*.safetensors, *.bin): 302 to the "CDN" + X-Linked-Etag (sha256),
                                      X-Linked-Size, like the real Hub
- GET  the same, and GET/HEAD /cdn/<sha256> on the host name `localhost` (another origin, as the real CDN is),
  with Range support (206 / 416).
Unknown repos, revisions and files answer 404 with the Hub's X-Error-Code header.

Knobs for failure cases: `break_after(path, n, times)` sends the full Content-Length but only n body bytes, then
drops the connection; `serve_instead(path, data)` lists and HEADs the real size but serves other bytes;
`stall(path, n)` sends n bytes and then hangs until `stop()`; `pace(chunk, delay_s)` slows every body down.
A hostile endpoint: `etag_instead(path, etag)` sends another ETag (X-Linked-Etag for LFS) for a file;
`redirect(path, location)` answers the file's resolve URL with a 302 there; `cdn_redirect(location)` makes the "CDN"
answer 302 there; `answer_any(data)` answers every request it cannot route (a traversal name the client
normalised away) with `data` as a regular file; `content_range_instead(path, value)` garbles a 206's Content-Range.
A repo's `commit` may be set to any string.
`requests` records (method, path, Range header, body bytes sent, auth, host) for every request.
"""
from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin")


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The pointer text git stores for an LFS file (git-lfs spec v1)."""
    return (b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n"
            % (hashlib.sha256(data).hexdigest().encode(), len(data)))


def git_oid(name: str, data: bytes) -> str:
    """The oid the Hub lists for a file: its git blob id, of the pointer when the file is in LFS."""
    return git_blob_id(lfs_pointer(data) if name.endswith(LFS_SUFFIXES) else data)


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    commit: str
    branches: tuple[str, ...] = ("main",)

    def resolve(self, rev: str) -> str | None:
        return self.commit if rev == self.commit or rev in self.branches else None


@dataclass
class Logged:
    method: str
    path: str
    range: str | None
    sent: int = 0
    #: Whether the request carried an Authorization header, and the Host it was sent to.
    auth: bool = False
    host: str = ""


class FakeHub:
    """The fake server; use as a context manager or call start()/stop()."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[Logged] = []
        self.breaks: dict[str, list[int]] = {}
        self.instead: dict[str, bytes] = {}
        self.stalls: dict[str, int] = {}
        self.etags: dict[str, str] = {}
        self.redirects: dict[str, str] = {}
        self.cdn_location: str | None = None
        self.fallback: bytes | None = None
        self.ranges: dict[str, str] = {}
        self.chunk, self.delay_s = 1 << 16, 0.0
        self.released = threading.Event()
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------ setup
    def add_repo(self, repo_id: str, files: dict[str, bytes], revision: str = "main") -> str:
        """Add (or replace) a repo; returns its commit hash."""
        digest = hashlib.sha1(repo_id.encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha1(files[name]).digest())
        repo = FakeRepo(repo_id, dict(files), digest.hexdigest(), (revision,))
        self.repos[repo_id] = repo
        return repo.commit

    def break_after(self, path: str, n: int, times: int = 1) -> None:
        self.breaks[path] = [n] * times

    def serve_instead(self, path: str, data: bytes) -> None:
        self.instead[path] = data

    def stall(self, path: str, n: int) -> None:
        self.stalls[path] = n

    def pace(self, chunk: int, delay_s: float) -> None:
        self.chunk, self.delay_s = chunk, delay_s

    def etag_instead(self, path: str, etag: str) -> None:
        self.etags[path] = etag

    def redirect(self, path: str, location: str) -> None:
        self.redirects[path] = location

    def cdn_redirect(self, location: str) -> None:
        self.cdn_location = location

    def answer_any(self, data: bytes) -> None:
        self.fallback = data

    def content_range_instead(self, path: str, value: str) -> None:
        self.ranges[path] = value

    def sent(self, path: str) -> int:
        """Body bytes sent for a file over every GET (resolve and CDN)."""
        return sum(r.sent for r in self.requests if r.method == "GET" and r.path == path)

    def gets(self, path: str) -> list[Logged]:
        return [r for r in self.requests if r.method == "GET" and r.path == path]

    def fetched_paths(self) -> set[str]:
        return {r.path for r in self.requests if r.method == "GET" and r.sent}

    # ------------------------------------------------------------ server
    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def cdn(self) -> str:
        assert self.server is not None
        return f"http://localhost:{self.server.server_address[1]}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(_Handler):
            fake = hub

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.released.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def __enter__(self) -> "FakeHub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------ lookups
    def lfs_file(self, sha: str) -> tuple[FakeRepo, str] | None:
        for repo in self.repos.values():
            for name, data in repo.files.items():
                if name.endswith(LFS_SUFFIXES) and hashlib.sha256(data).hexdigest() == sha:
                    return repo, name
        return None


def free_port() -> int:
    """A port nothing listens on (for 'server down' tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)

    # ------------------------------------------------------------ routing
    def _route(self, head: bool) -> None:
        parts = urlsplit(self.path)
        path, query = unquote(parts.path), parse_qs(parts.query)
        log = Logged("HEAD" if head else "GET", path, self.headers.get("Range"),
                     auth="Authorization" in self.headers, host=self.headers.get("Host", ""))
        with self.fake.lock:
            self.fake.requests.append(log)
        if path.startswith("/api/models/"):
            return self._api(path[len("/api/models/"):], query)
        if path.startswith("/cdn/"):
            if self.fake.cdn_location is not None:
                return self._send(302, {"Location": self.fake.cdn_location, "Content-Length": "0"})
            found = self.fake.lfs_file(path[len("/cdn/"):])
            if found is None:
                return self._error(404, "EntryNotFound")
            repo, name = found
            log.path = name
            return self._file(repo, name, head, log)
        if "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            rev, _, name = rest.partition("/")
            repo = self.fake.repos.get(repo_id)
            if repo is None:
                return self._fallback(head, log) or self._error(404, "RepoNotFound")
            commit = repo.resolve(rev)
            if commit is None:
                return self._fallback(head, log) or self._error(404, "RevisionNotFound")
            if name not in repo.files:
                return self._fallback(head, log) or self._error(404, "EntryNotFound")
            log.path = name
            data = repo.files[name]
            if name in self.fake.redirects:
                # Headers that make the redirect look like the Hub's own (the listed hash and size).
                etag = hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_id(data)
                return self._send(302, {"Location": self.fake.redirects[name], "X-Repo-Commit": commit,
                                        "X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(len(data)),
                                        "ETag": f'"{git_oid(name, data)}"', "Content-Length": "0"})
            if name.endswith(LFS_SUFFIXES):
                sha = hashlib.sha256(data).hexdigest()
                return self._send(302, {"Location": f"{self.fake.cdn}/cdn/{sha}", "X-Repo-Commit": commit,
                                        "X-Linked-Etag": f'"{self.fake.etags.get(name, sha)}"',
                                        "X-Linked-Size": str(len(data)), "ETag": f'"{git_oid(name, data)}"',
                                        "Content-Length": "0"})
            return self._file(repo, name, head, log, commit)
        return self._fallback(head, log) or self._error(404, "RepoNotFound")

    def _fallback(self, head: bool, log: Logged) -> bool:
        """With answer_any(data): serve `data` for a request nothing else answers, as a hostile server would."""
        data = self.fake.fallback
        if data is None:
            return False
        log.path = "<any>"
        headers = {"ETag": f'"{git_blob_id(data)}"', "Content-Length": str(len(data))}
        self._send(200, headers, b"" if head else data)
        return True

    def _api(self, rest: str, query: dict) -> None:
        kind = "/revision/" if "/revision/" in rest else "/tree/"
        if kind not in rest:
            return self._error(404, "RepoNotFound")
        repo_id, tail = rest.split(kind, 1)
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            return self._error(404, "RepoNotFound")
        rev = tail.split("/", 1)[0]
        commit = repo.resolve(rev)
        if commit is None:
            return self._error(404, "RevisionNotFound")
        if kind == "/tree/":
            body = [{"type": "file", "path": n, "size": len(d), "oid": git_oid(n, d),
                     **({"lfs": _lfs(d)} if n.endswith(LFS_SUFFIXES) else {})} for n, d in sorted(repo.files.items())]
        else:
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for n, d in sorted(repo.files.items()):
                s: dict = {"rfilename": n}
                if blobs:
                    s.update(size=len(d), blobId=git_oid(n, d))
                    if n.endswith(LFS_SUFFIXES):
                        s["lfs"] = {"size": len(d), "sha256": hashlib.sha256(d).hexdigest(),
                                    "pointerSize": len(lfs_pointer(d))}
                siblings.append(s)
            body = {"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "siblings": siblings}
        payload = json.dumps(body).encode()
        self._send(200, {"Content-Type": "application/json", "Content-Length": str(len(payload))}, payload)

    # ------------------------------------------------------------ responses
    def _file(self, repo: FakeRepo, name: str, head: bool, log: Logged, commit: str | None = None) -> None:
        data = repo.files[name]
        etag = git_blob_id(data) if not name.endswith(LFS_SUFFIXES) else hashlib.sha256(data).hexdigest()
        headers = {"ETag": f'"{self.fake.etags.get(name, etag)}"', "Accept-Ranges": "bytes"}
        if commit:
            headers["X-Repo-Commit"] = commit
        if head:
            return self._send(200, {**headers, "Content-Length": str(len(data))})
        body = self.fake.instead.get(name, data)
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0])
            if start >= len(body):
                return self._send(416, {"Content-Range": f"bytes */{len(body)}", "Content-Length": "0"})
            status = 206
            headers["Content-Range"] = self.fake.ranges.get(name, f"bytes {start}-{len(body) - 1}/{len(body)}")
        piece = body[start:]
        headers["Content-Length"] = str(len(piece))
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        with self.fake.lock:
            cuts = self.fake.breaks.get(name)
            cut = cuts.pop(0) if cuts else None
        stall_at = self.fake.stalls.get(name)
        limit = len(piece) if cut is None else min(cut, len(piece))
        sent = 0
        try:
            while sent < limit:
                if stall_at is not None and start + sent >= stall_at:
                    self.fake.released.wait(5)
                    break
                n = min(self.fake.chunk, limit - sent)
                if stall_at is not None:
                    n = min(n, max(1, stall_at - start - sent))
                self.wfile.write(piece[sent:sent + n])
                self.wfile.flush()
                sent += n
                log.sent = sent
                if self.fake.delay_s:
                    time.sleep(self.fake.delay_s)
        except OSError:
            pass
        if cut is not None or stall_at is not None:
            # Drop the connection mid-body, as a network failure would.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _error(self, status: int, code: str) -> None:
        payload = json.dumps({"error": f"{code} (fake hub)"}).encode()
        self._send(status, {"X-Error-Code": code, "X-Error-Message": f"{code} (fake hub)",
                            "Content-Type": "application/json", "Content-Length": str(len(payload))}, payload)

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)


def _lfs(data: bytes) -> dict:
    return {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": len(lfs_pointer(data))}
