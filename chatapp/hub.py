"""Model files from the Hugging Face Hub, in its standard cache: plan, download (resumable, cancellable), inspect.

Torch-free (the TUI imports it at start-up); demo checkpoints are built by engine/demo.py, this module only finds them.
From huggingface_hub: the listing (`HfApi.model_info(files_metadata=True)`), each file's metadata
(`get_hf_file_metadata`), URLs, auth headers, the shared HTTP session, error types, `filter_repo_objects`, the cache
lock, `try_to_load_from_cache`, `scan_cache_dir`. Done here: the byte transfer, since `hf_hub_download` can neither
resume nor cancel promptly. The body is streamed with a `Range` request into `blobs/<hash>.incomplete` by a reader
thread that hands chunks over a small queue; the calling thread writes them, reports exact byte counts and polls the
cancel event every 0.1 s, so a cancel takes effect within ~0.1 s even on a stalled connection and leaves a partial
file the next call resumes (listing and HEAD requests time out after CONNECT_TIMEOUT_S). A finished file lands where
`hf_hub_download` puts it (`blobs/<hash>`, `snapshots/<commit>/<path>` -> relative symlink, `refs/<revision>`), so
`hf cache` and `scan_cache_dir` see it (layout checked against huggingface_hub 2.4.0 by tests/test_hub.py).

A hostile endpoint (an HF_ENDPOINT mirror, a proxy) cannot make a download write outside the model's cache folder:
every name the server supplies passes `_checked` (commit, hashes, file paths, redirect targets) and blob names come
from the listed hashes, never from the ETag (which must equal them); every path is resolved by `_contained` before
anything is written or trusted there, so a planted link is not followed out. Each file is checked against its listed
size and hash: sha256 for LFS files, the git blob SHA-1 for the others.

Every file of one source comes from the commit its revision resolved to when listed. Completion is recorded per
source in `<repo cache>/.smollchat/<revision>.json`; `local_dir` trusts a snapshot only when that record matches the
catalog and every file is on disk with its size, without network. The environment (HF_HOME, HF_HUB_CACHE,
HF_ENDPOINT, HF_HUB_OFFLINE) is read at each call, not at import.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import re
import shutil
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import quote, urljoin, urlsplit

from . import locations
from .catalog import ModelEntry, Source

__all__ = ["DownloadProgress", "RemoteFile", "HubError", "OfflineError", "DownloadCancelled", "plan", "download",
           "local_dir", "is_downloaded", "file_path", "delete", "disk_usage", "cache_root",
           "demo_dir", "demo_stamp", "demo_ready"]

DEFAULT_ENDPOINT = "https://huggingface.co"
#: Code and pickle formats are never fetched, whatever a catalog glob says (the catalog refuses them too).
FORBIDDEN_SUFFIXES = (".py", ".pyc", ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
#: At most one progress report per interval (plus one at each file boundary and one at the end).
PROGRESS_INTERVAL_S = 0.1
#: The speed reported is the average over about this many recent seconds.
SPEED_WINDOW_S = 3.0
#: How often the writing thread looks at the cancel event while it waits for data.
POLL_S = 0.1
#: Reconnects (with Range) per file after a transfer breaks off; the count restarts whenever bytes arrived.
RETRIES = 3
RETRY_WAIT_S = 0.5
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
#: How long to wait for another process that holds the same file's cache lock.
LOCK_WAIT_S = 1.0
MANIFEST_DIR = ".smollchat"
DEMO_STAMP = ".smollchat-demo.json"
_TRANSIENT_STATUS = (408, 429, 500, 502, 503, 504)


class HubError(RuntimeError):
    """A download that failed; the message is one sentence saying what happened and what to do."""


class OfflineError(HubError):
    """No network (or HF_HUB_OFFLINE is set) and the files are not all local."""


class DownloadCancelled(HubError):
    """The caller's cancel event was set; bytes fetched so far are kept and the next download resumes."""


@dataclass(frozen=True)
class DownloadProgress:
    """Progress of one download. Bytes are totals over every planned file (files already local count as done);
    `done_bytes` never decreases and the last report of a finished download has done_bytes == total_bytes."""

    file: str
    done_bytes: int
    total_bytes: int
    speed_bps: float
    eta_s: float | None
    # After the byte fields so the five-field positional form (chat.fake.FakeDownloader) stays valid.
    file_index: int = 0
    file_count: int = 0


@dataclass(frozen=True)
class RemoteFile:
    """One file a download fetches."""

    repo: str
    #: The catalog's revision (branch, tag or commit).
    revision: str
    path: str
    size: int
    #: The commit the revision resolved to when listed; every file of a plan's source comes from it.
    commit: str = ""
    #: LFS files: the content hash the finished file is checked against.
    sha256: str | None = None
    #: Other files: their git blob SHA-1 (sha1 of b"blob <size>\0" + content), checked the same way.
    git_sha1: str | None = None

    @property
    def blob_name(self) -> str:
        """The name of its file under blobs/: the hash the Hub lists (and sends as its ETag), never the ETag itself."""
        return self.sha256 or self.git_sha1 or ""

    def hasher(self) -> Any:
        """A fresh hasher whose hexdigest is `blob_name` once the whole file went through it."""
        return hashlib.sha256() if self.sha256 else hashlib.sha1(b"blob %d\0" % self.size)


# ---------------------------------------------------------------- environment, read at call time


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _offline() -> bool:
    return _is_true(os.environ.get("HF_HUB_OFFLINE")) or _is_true(os.environ.get("TRANSFORMERS_OFFLINE"))


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")


def cache_root() -> Path:
    """huggingface_hub's cache directory, resolved the way it does (HF_HUB_CACHE, else HF_HOME/hub)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _storage(repo: str, cache: Path | None = None) -> Path:
    # The same folder name as huggingface_hub's repo_folder_name(repo_type="model").
    return (cache or cache_root()) / ("models--" + repo.replace("/", "--"))


def _sources(entry: ModelEntry) -> list[Source]:
    return ([entry.source] if entry.source else []) + list(entry.extra_sources)


def _allowed(path: str, allow: tuple[str, ...]) -> bool:
    from huggingface_hub.utils import filter_repo_objects

    if path.lower().endswith(FORBIDDEN_SUFFIXES):
        return False
    return bool(list(filter_repo_objects([path], allow_patterns=list(allow))))


# ---------------------------------------------------------------- what the server says, and where it may lead

_HEX_LENGTH = {"commit": 40, "git blob SHA-1": 40, "sha256": 64}
MAX_REDIRECTS = 5


def _checked(kind: str, value: Any, what: str, base: str = "") -> str:
    """The one gate for every name a server supplies before it becomes part of a path or a URL that is fetched.

    Hashes: lowercase hex of their length. "file path": relative, '/'-separated plain segments (no '..', '.', empty
    or absolute parts, backslashes, drive letters, control characters). "redirect": http(s) with a host and no
    credentials, never https -> http (`base` is the URL that redirected)."""
    if not value:
        raise HubError(f"the server at {_endpoint()} sent no {kind} for {what}; try again later.")
    ok = isinstance(value, str) and len(value) <= 1024
    if ok and kind in _HEX_LENGTH:
        ok = re.fullmatch(f"[0-9a-f]{{{_HEX_LENGTH[kind]}}}", value) is not None
    elif ok and kind == "file path":
        ok = not (value.startswith("/") or "\\" in value or re.match(r"[A-Za-z]:", value)
                  or any(ord(c) < 32 or ord(c) == 127 for c in value)
                  or any(part in ("", ".", "..") for part in value.split("/")))
    elif ok and kind == "redirect":
        parts = urlsplit(value)
        ok = (parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc
              and not (urlsplit(base).scheme == "https" and parts.scheme == "http"))
    elif ok:
        raise ValueError(f"unknown kind {kind!r}")
    if not ok:
        raise HubError(f"the server at {_endpoint()} sent an unsafe {kind} for {what} ({str(value)[:200]!r}), which "
                       "was refused; check that HF_ENDPOINT and any proxy lead to a Hub you trust.")
    return value


def _inside(root: Path, path: Path) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([real, top]) == top


def _contained(root: Path, path: Path) -> None:
    """A HubError unless `path`, every link resolved, stays inside `root`: checked before anything is written or
    trusted there, so a link planted in the cache is never followed out of it."""
    if not _inside(root, path):
        raise HubError(f"{path} leads outside its cache folder {root} (a link there points to "
                       f"{os.path.realpath(path)}), so nothing was written; delete that link and download again.")


# ---------------------------------------------------------------- errors


@contextmanager
def _hub_errors(what: str, repo: str, revision: str = "") -> Iterator[None]:
    """Turn huggingface_hub / HTTP failures into HubError or OfflineError with one clear sentence."""
    from huggingface_hub import errors as hf_errors

    try:
        yield
    except HubError:
        raise
    except hf_errors.OfflineModeIsEnabled:
        raise OfflineError(f"cannot fetch {what}: huggingface_hub is in offline mode (HF_HUB_OFFLINE was set when "
                           "it was imported); restart without HF_HUB_OFFLINE to download.") from None
    except hf_errors.GatedRepoError:
        raise HubError(f"{repo} is gated on the Hub: accept its terms on the model page and log in with "
                       "`hf auth login`, then try again.") from None
    except hf_errors.RepositoryNotFoundError:
        raise HubError(f"the Hub has no repository {repo} (or it is private); check the catalog entry.") from None
    except hf_errors.RevisionNotFoundError:
        raise HubError(f"{repo} has no revision {revision!r} on the Hub; check the catalog entry.") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise HubError(f"{what} does not exist on the Hub; the repository changed since it was listed.") from None
    except hf_errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else "?"
        raise HubError(f"the Hub answered HTTP {status} for {what}; try again later.") from None
    except (hf_errors.HTTPError, ConnectionError) as e:
        # The transport's base error (httpx in 1.x, httpx2 in 2.x); with status errors handled above: the network.
        raise OfflineError(f"cannot reach the Hugging Face Hub at {_endpoint()} to fetch {what} "
                           f"({type(e).__name__}); check the network connection and try again.") from None
    except OSError as e:
        raise HubError(f"cannot write {what} to {cache_root()} ({e.strerror or e}).") from None


def _check_cancel(cancel: threading.Event | None, tracker: "_Tracker") -> None:
    if cancel is not None and cancel.is_set():
        raise DownloadCancelled(f"download cancelled with {tracker.base + tracker.current} of {tracker.total} "
                                "bytes on disk; the next download resumes from there.")


def _pause(seconds: float, cancel: threading.Event | None, tracker: "_Tracker") -> None:
    """Sleep before a retry, still answering a cancel at once."""
    if cancel is None:
        time.sleep(seconds)
    elif cancel.wait(seconds):
        _check_cancel(cancel, tracker)


# ---------------------------------------------------------------- plan


def plan(entry: ModelEntry) -> list[RemoteFile]:
    """List the entry's repo(s) on the Hub and keep the allowed files, with their sizes (needs the network)."""
    if entry.demo or entry.source is None:
        return []
    if _offline():
        raise OfflineError(f"cannot list {entry.id} on the Hub because HF_HUB_OFFLINE is set; unset it to download.")
    return [f for src in _sources(entry) for f in _list_source(src)]


def _list_source(src: Source) -> list[RemoteFile]:
    from huggingface_hub import HfApi

    with _hub_errors(f"the file list of {src.repo}", src.repo, src.revision):
        info = HfApi(endpoint=_endpoint()).model_info(src.repo, revision=src.revision, files_metadata=True,
                                                      timeout=CONNECT_TIMEOUT_S)
    commit = _checked("commit", info.sha, f"{src.repo}@{src.revision}")
    out = []
    for s in info.siblings or []:
        if not _allowed(s.rfilename, src.allow):
            continue
        what = f"{src.repo}/{s.rfilename}"
        path = _checked("file path", s.rfilename, f"a file of {src.repo}")
        size = s.lfs.size if s.lfs else s.size
        if not isinstance(size, int) or size < 0:
            raise HubError(f"the Hub listed {what} without a valid size; try again later.")
        if s.lfs is None and s.blob_id is None:
            raise HubError(f"the Hub listed {what} without its git blob id, so it cannot be checked; try again later.")
        out.append(RemoteFile(src.repo, src.revision, path, size, commit,
                              _checked("sha256", s.lfs.sha256, what) if s.lfs else None,
                              None if s.lfs else _checked("git blob SHA-1", s.blob_id, what)))
    if not out:
        raise HubError(f"{src.repo}@{src.revision} has no file matching {', '.join(src.allow)}; "
                       "check the catalog entry.")
    return out


# ---------------------------------------------------------------- progress


class _Tracker:
    """Byte-accurate, monotonic, rate-limited progress over a whole plan."""

    def __init__(self, files: list[RemoteFile], callback: Callable[[DownloadProgress], None] | None) -> None:
        self.callback, self.total, self.count = callback, sum(f.size for f in files), len(files)
        self.index, self.file, self.shown = 0, "", 0
        self.base = 0      # bytes of the files already finished
        self.current = 0   # bytes of the current file on disk
        self.received = 0  # bytes received from the network in this call
        self.samples: deque[tuple[float, int]] = deque([(time.monotonic(), 0)])
        self.last = 0.0

    def begin(self, index: int, rf: RemoteFile, have: int = 0) -> None:
        self.index, self.file, self.current = index, rf.path, have
        self.emit(force=True)

    def add(self, n: int) -> None:
        self.current += n
        self.received += n
        self.emit()

    def restart_file(self) -> None:
        # The server ignored our Range: the file starts again, but what is shown does not go back.
        self.current = 0

    def end(self, size: int) -> None:
        self.base += size
        self.current = 0
        self.emit(force=True)

    def speed(self, now: float) -> float:
        self.samples.append((now, self.received))
        while len(self.samples) > 2 and now - self.samples[1][0] > SPEED_WINDOW_S:
            self.samples.popleft()
        t0, b0 = self.samples[0]
        return (self.received - b0) / (now - t0) if now - t0 > 1e-3 else 0.0

    def emit(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.callback is None or (not force and now - self.last < PROGRESS_INTERVAL_S):
            return
        self.last = now
        self.shown = min(self.total, max(self.shown, self.base + self.current))
        speed = self.speed(now)
        left = self.total - self.shown
        eta = 0.0 if left == 0 else (left / speed if speed > 0 else None)
        self.callback(DownloadProgress(self.file, self.shown, self.total, speed, eta, self.index, self.count))


# ---------------------------------------------------------------- download


def download(entry: ModelEntry, progress: Callable[[DownloadProgress], None] | None = None,
             cancel: threading.Event | None = None) -> Path:
    """Fetch every planned file into the HF cache (resuming partial files) and return the main snapshot dir.

    Raises DownloadCancelled (partial files kept), OfflineError (no network or HF_HUB_OFFLINE, files missing),
    HubError (anything else: unknown repo, size or checksum mismatch, ...). A demo entry is not downloaded: its
    directory is returned once the engine has made it (chatapp.engine.demo.ensure_demo).
    """
    if entry.demo:
        if (d := local_dir(entry)) is not None:
            return d
        raise HubError(f"{entry.id} is a demo checkpoint with random weights: it is made on this machine when it is "
                       "loaded, not downloaded.")
    if entry.source is None:
        raise HubError(f"{entry.id} has no download source in the catalog.")
    if _offline():
        if (d := local_dir(entry)) is not None:
            return d
        raise OfflineError(f"{entry.id} is not fully downloaded and HF_HUB_OFFLINE is set, so nothing can be "
                           f"fetched; unset HF_HUB_OFFLINE and run `smollchat download {entry.id}` again.")
    try:
        files = plan(entry)
    except OfflineError:
        if (d := local_dir(entry)) is not None:
            return d
        raise
    cache = cache_root()
    tracker = _Tracker(files, progress)
    for src in _sources(entry):
        mine = [f for f in files if f.repo == src.repo and f.revision == src.revision]
        _prepare_snapshot(cache, src, mine[0].commit)
    for i, rf in enumerate(files, 1):
        _check_cancel(cancel, tracker)
        _fetch(rf, cache, i, tracker, cancel)
    for src in _sources(entry):
        _write_manifest(cache, src, [f for f in files if f.repo == src.repo and f.revision == src.revision])
    tracker.emit(force=True)
    return _storage(entry.source.repo, cache) / "snapshots" / files[0].commit


def _prepare_snapshot(cache: Path, src: Source, commit: str) -> None:
    # The snapshot folder exists before the ref that names it, as scan_cache_dir requires.
    storage = _storage(src.repo, cache)
    with _hub_errors(f"the cache folder of {src.repo}", src.repo):
        for folder in (storage / "snapshots" / commit, storage / "blobs"):
            _contained(storage, folder)
            folder.mkdir(parents=True, exist_ok=True)
        if src.revision != commit:
            ref = storage / "refs" / src.revision
            _contained(storage, ref)
            ref.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(ref, commit)


def _fetch(rf: RemoteFile, cache: Path, index: int, tracker: _Tracker, cancel: threading.Event | None) -> None:
    from filelock import Timeout
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import WeakFileLock

    storage = _storage(rf.repo, cache)
    snapshot = storage / "snapshots" / rf.commit
    pointer = snapshot / rf.path
    what = f"{rf.repo}/{rf.path}"
    # Its folders stay inside the snapshot, and a link already there (ours point into blobs/) inside the model's
    # folder: one leading elsewhere is neither trusted as done nor written through.
    _contained(snapshot, pointer.parent)
    if os.path.lexists(pointer):
        _contained(storage, pointer)
    if pointer.is_file() and pointer.stat().st_size == rf.size:
        tracker.begin(index, rf, rf.size)
        tracker.end(rf.size)
        return
    url = hf_hub_url(rf.repo, rf.path, revision=rf.commit, endpoint=_endpoint())
    with _hub_errors(what, rf.repo, rf.revision):
        meta = get_hf_file_metadata(url, timeout=CONNECT_TIMEOUT_S)
    if meta.size is not None and meta.size != rf.size:
        raise HubError(f"the Hub reports two sizes for {what} ({rf.size} listed, {meta.size} served); "
                       "try again later.")
    etag = _checked("sha256" if rf.sha256 else "git blob SHA-1", meta.etag, what)
    if etag != rf.blob_name:
        raise HubError(f"the Hub lists one version of {what} and serves another (ETag {etag}, listed "
                       f"{rf.blob_name}); try again later.")
    # The CDN location the Hub redirects to (signed, so the auth token never goes there); Xet-stored files have
    # none we can stream, so they come through the resolve URL's own redirect.
    source = url if meta.xet_file_data is not None else _checked("redirect", meta.location or url, what, base=url)
    blob = storage / "blobs" / rf.blob_name
    lock = cache / ".locks" / storage.name / f"{rf.blob_name}.lock"
    with _hub_errors(what, rf.repo):
        _contained(storage, blob)
        _contained(cache, lock)
        lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with WeakFileLock(lock, timeout=LOCK_WAIT_S):
            if blob.is_file() and blob.stat().st_size != rf.size:
                blob.unlink()
            if not blob.is_file():
                _transfer(rf, source, urlsplit(source).netloc == urlsplit(url).netloc, blob, index, tracker, cancel)
            else:
                tracker.begin(index, rf, rf.size)
            with _hub_errors(what, rf.repo):
                _link(blob, pointer)
    except Timeout:
        raise HubError(f"another process is downloading {what} into the same cache; "
                       "wait for it to finish and try again.") from None
    tracker.end(rf.size)


def _transfer(rf: RemoteFile, url: str, send_auth: bool, blob: Path, index: int, tracker: _Tracker,
              cancel: threading.Event | None) -> None:
    """Stream one file into `<blob>.incomplete` from where it stopped, check it, and move it into place."""
    from huggingface_hub.utils import build_hf_headers

    what = f"{rf.repo}/{rf.path}"
    part = blob.with_name(blob.name + ".incomplete")
    hasher = rf.hasher()
    # Compression would make byte offsets and sizes meaningless for Range resume.
    headers = {k: v for k, v in build_hf_headers().items() if send_auth or k.lower() != "authorization"}
    headers["Accept-Encoding"] = "identity"
    failures = 0
    _contained(blob.parent, part)
    with _hub_errors(what, rf.repo), _append(part) as f:
        have = f.tell()
        if have > rf.size:
            f.truncate(0)
            have = 0
        if have:
            _hash_prefix(part, have, hasher)
        tracker.begin(index, rf, have)
        while have < rf.size:
            _check_cancel(cancel, tracker)
            reader = _Reader(url, {**headers, "Range": f"bytes={have}-"} if have else headers, what)
            got = 0
            try:
                status, start = reader.head(cancel, tracker)
                if status == 416:
                    raise _SizeMismatch(have, False)
                if have and (status != 206 or start != have):
                    f.seek(0)
                    f.truncate(0)
                    have = 0
                    hasher = rf.hasher()
                    tracker.restart_file()
                for chunk in reader.chunks(cancel, tracker):
                    if have + len(chunk) > rf.size:
                        raise _SizeMismatch(have + len(chunk), True)
                    f.write(chunk)
                    have += len(chunk)
                    got += len(chunk)
                    hasher.update(chunk)
                    tracker.add(len(chunk))
                if have < rf.size:
                    raise _SizeMismatch(have, False)
            except _SizeMismatch as e:
                f.close()
                part.unlink(missing_ok=True)
                seen = f"more than {rf.size}" if e.args[1] else f"only {e.args[0]}"
                raise HubError(f"{what} does not have the size the Hub reports ({rf.size} bytes listed, {seen} "
                               "served), so the partial file was removed; try again later.") from None
            except _Transient as e:
                f.flush()
                failures = 1 if got else failures + 1
                if failures > RETRIES:
                    raise OfflineError(f"the connection to the Hub broke off while fetching {what} ({have} of "
                                       f"{rf.size} bytes kept, {e}); run the download again to resume.") from None
                _pause(RETRY_WAIT_S * failures, cancel, tracker)
            finally:
                reader.close()
    if hasher.hexdigest() != rf.blob_name:
        part.unlink(missing_ok=True)
        raise HubError(f"{what} does not match the checksum the Hub reports; the file was removed, try again.")
    with _hub_errors(what, rf.repo):
        os.replace(part, blob)


def _append(path: Path) -> Any:
    """`open(path, "ab")` that refuses to follow a link at `path` (O_NOFOLLOW), checked or not."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(path, flags, 0o644), "ab")


class _SizeMismatch(Exception):
    """The body is longer or shorter than the size the Hub listed (args: bytes seen, whether too many)."""


class _Transient(Exception):
    """An HTTP status worth retrying (rate limit, gateway errors)."""


def _hash_prefix(path: Path, n: int, hasher: Any) -> None:
    with open(path, "rb") as g:
        while n > 0 and (block := g.read(min(n, 1 << 20))):
            hasher.update(block)
            n -= len(block)


def _range_start(r: Any) -> int | None:
    """Where a 206 body starts (from Content-Range), else None (the body is then taken as the whole file)."""
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", r.headers.get("Content-Range", "").strip())
    return int(m.group(1)) if r.status_code == 206 and m else None


class _Reader:
    """One streamed GET in a daemon thread; chunks come through a bounded queue.

    The calling thread never blocks on the socket, so it can notice a cancel within POLL_S. The reader thread
    only reads the network (it never touches the file), and stops at its next chunk or read timeout after close().
    """

    def __init__(self, url: str, headers: dict[str, str], what: str) -> None:
        self.what = what
        self.q: queue.Queue = queue.Queue(maxsize=16)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url, headers), daemon=True, name="smollchat-download")
        self.thread.start()

    def _put(self, item: tuple) -> bool:
        while not self.stop.is_set():
            try:
                self.q.put(item, timeout=POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, url: str, headers: dict[str, str]) -> None:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub.utils import get_session, hf_raise_for_status

        try:
            # (connect, read, write, pool): the tuple form both httpx and httpx2 accept, so no transport import.
            timeout = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S, READ_TIMEOUT_S, CONNECT_TIMEOUT_S)
            # Redirects are followed here, each target checked (and the token dropped when the host changes).
            for _ in range(MAX_REDIRECTS + 1):
                with get_session().stream("GET", url, headers=headers, timeout=timeout, follow_redirects=False) as r:
                    if r.status_code in (301, 302, 303, 307, 308) and r.headers.get("Location"):
                        target = _checked("redirect", urljoin(url, r.headers["Location"]), self.what, base=url)
                        if urlsplit(target).netloc != urlsplit(url).netloc:
                            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
                        url = target
                        continue
                    if r.status_code in _TRANSIENT_STATUS:
                        raise _Transient(f"HTTP {r.status_code}")
                    if r.status_code >= 400 and r.status_code != 416:
                        r.read()
                        hf_raise_for_status(r)
                    if self._put(("head", (r.status_code, _range_start(r)))) and r.status_code != 416:
                        for chunk in r.iter_bytes():
                            if chunk and not self._put(("data", chunk)):
                                return
                        self._put(("end", None))
                    return
            raise HubError(f"the Hub redirected {self.what} more than {MAX_REDIRECTS} times; try again later.")
        except hf_errors.HfHubHTTPError as e:
            self._put(("error", e))
        except hf_errors.HTTPError as e:  # the transport's (connect, read timeout, broken body): worth a retry
            self._put(("error", _Transient(type(e).__name__)))
        except BaseException as e:  # handed to the writing thread, which decides
            self._put(("error", e))

    def _next(self, cancel: threading.Event | None, tracker: _Tracker) -> tuple[str, Any]:
        while True:
            _check_cancel(cancel, tracker)
            try:
                kind, value = self.q.get(timeout=POLL_S)
            except queue.Empty:
                # Keep reporting while nothing arrives, so a stalled transfer shows its speed falling to 0.
                tracker.emit()
                continue
            if kind == "error":
                raise value
            return kind, value

    def head(self, cancel: threading.Event | None, tracker: _Tracker) -> tuple[int, int | None]:
        kind, value = self._next(cancel, tracker)
        if kind != "head":
            raise _Transient("no response")
        return value

    def chunks(self, cancel: threading.Event | None, tracker: _Tracker) -> Iterator[bytes]:
        while True:
            kind, value = self._next(cancel, tracker)
            if kind == "end":
                return
            yield value

    def close(self) -> None:
        self.stop.set()


def _link(blob: Path, pointer: Path) -> None:
    """snapshots/<commit>/<path> -> ../../blobs/<etag>, relative like huggingface_hub's; a copy without symlinks."""
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.symlink(os.path.relpath(blob, pointer.parent), tmp)
    except (OSError, NotImplementedError):
        shutil.copyfile(blob, tmp)
    os.replace(tmp, pointer)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------- local state (no network)


def _manifest_path(cache: Path, src: Source) -> Path:
    return _storage(src.repo, cache) / MANIFEST_DIR / f"{quote(src.revision, safe='')}.json"


def _write_manifest(cache: Path, src: Source, files: list[RemoteFile]) -> None:
    record = {"repo": src.repo, "revision": src.revision, "commit": files[0].commit, "allow": list(src.allow),
              "files": {f.path: f.size for f in files}}
    path = _manifest_path(cache, src)
    with _hub_errors(f"the download record of {src.repo}", src.repo):
        _contained(_storage(src.repo, cache), path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, json.dumps(record, indent=1, sort_keys=True))


def _complete_snapshot(src: Source, cache: Path | None = None) -> Path | None:
    """The source's snapshot dir when its download record matches the catalog and every file is on disk (inside
    the model's cache folder: a link leading out of it does not count)."""
    cache = cache or cache_root()
    storage = _storage(src.repo, cache)
    try:
        record = json.loads(_manifest_path(cache, src).read_text(encoding="utf-8"))
        if record["allow"] != list(src.allow) or not record["files"]:
            return None
        snap = storage / "snapshots" / _checked("commit", record["commit"], "the download record")
        for name, size in record["files"].items():
            p = snap / _checked("file path", name, "the download record")
            if not p.is_file() or p.stat().st_size != size or not _inside(storage, p):
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, HubError):
        return None
    return snap


def demo_dir(entry: ModelEntry) -> Path:
    """Where a demo entry's checkpoint lives (engine/demo.py builds it there)."""
    return locations.demo_dir() / entry.id


def demo_stamp(entry: ModelEntry) -> dict[str, Any]:
    """What a demo was made from; a demo whose stamp differs is stale and made again."""
    # Round-tripped through JSON so it compares equal to what was written.
    return json.loads(json.dumps({"demo_config": entry.demo_config, "demo_seed": entry.demo_seed,
                                  "options": entry.options}, sort_keys=True))


def demo_ready(d: Path, stamp: dict[str, Any] | None = None) -> bool:
    """Whether `d` holds a made demo (with `stamp`: made from exactly that)."""
    if not ((d / "model.safetensors").is_file() and (d / "config.json").is_file()):
        return False
    if stamp is None:
        return True
    try:
        return json.loads((d / DEMO_STAMP).read_text(encoding="utf-8")) == stamp
    except (OSError, ValueError):
        return False


def local_dir(entry: ModelEntry) -> Path | None:
    """The complete local snapshot (main source, with every extra source complete too), or the made demo dir."""
    if entry.demo:
        d = demo_dir(entry)
        return d if demo_ready(d) else None
    if entry.source is None:
        return None
    cache = cache_root()
    main = _complete_snapshot(entry.source, cache)
    if main is None or any(_complete_snapshot(s, cache) is None for s in entry.extra_sources):
        return None
    return main


def is_downloaded(entry: ModelEntry) -> bool:
    return local_dir(entry) is not None


def file_path(entry: ModelEntry, name: str) -> Path | None:
    """A finished file from the main snapshot or an extra source (e.g. Genesis's tokenizer.json), else None."""
    if entry.demo:
        p = demo_dir(entry) / name
        return p if p.is_file() else None
    cache = cache_root()
    for src in _sources(entry):
        snap = _complete_snapshot(src, cache)
        if snap is not None and (snap / name).is_file() and _inside(snap.parent.parent, snap / name):
            return snap / name
    from huggingface_hub import try_to_load_from_cache

    for src in _sources(entry):
        # A file already in the cache for this revision (another tool may have fetched it) is as good.
        try:
            found = try_to_load_from_cache(src.repo, name, cache_dir=str(cache), revision=src.revision)
        except ValueError:
            found = None
        if isinstance(found, str) and Path(found).is_file() and _inside(_storage(src.repo, cache), Path(found)):
            return Path(found)
    return None


def disk_usage(entry: ModelEntry) -> int:
    """Bytes on disk for the entry's main repo (finished and partial blobs), or its demo dir. Extra sources (a
    tokenizer repo) are not counted: delete() leaves them, as other models or tools may share them."""
    if entry.demo:
        d = demo_dir(entry)
        return sum(p.stat().st_size for p in d.glob("*") if p.is_file()) if d.is_dir() else 0
    if entry.source is None:
        return 0
    storage = _storage(entry.source.repo)
    return (sum(p.stat().st_size for p in (storage / "blobs").glob("*") if p.is_file()) +
            sum(p.stat().st_size for p in (storage / "snapshots").glob("**/*") if p.is_file() and not p.is_symlink()))


def delete(entry: ModelEntry) -> None:
    """Remove the entry's main repo from the cache (every cached revision, partial files, its record). Only that
    repo's folder is touched: other repos, including an extra source such as a shared tokenizer repo, stay."""
    if entry.demo:
        shutil.rmtree(demo_dir(entry), ignore_errors=True)
        return
    if entry.source is None:
        return
    cache = cache_root()
    storage = _storage(entry.source.repo, cache)
    if not storage.exists():
        return
    from huggingface_hub import scan_cache_dir

    try:
        info = scan_cache_dir(cache)
        hashes = [rev.commit_hash for repo in info.repos
                  if repo.repo_type == "model" and repo.repo_id == entry.source.repo for rev in repo.revisions]
        if hashes:
            # huggingface_hub's own deletion also releases blobs shared through its cross-repo store.
            info.delete_revisions(*hashes).execute()
    except (OSError, ValueError):
        pass
    # What the scan does not know about (partial blobs, the download record) goes with the folder.
    shutil.rmtree(storage, ignore_errors=True)
    shutil.rmtree(cache / ".locks" / storage.name, ignore_errors=True)
