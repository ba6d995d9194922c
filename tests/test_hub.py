"""chatapp.hub against a local fake Hub (tests/fakehub.py): filtering, second source, progress, resume, size and
checksum checks, cancel, offline, delete/disk usage. (Demo checkpoints: tests/engine/test_demo.py.)"""
from __future__ import annotations

import ast
import hashlib
import os
import re
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

# huggingface_hub reads HF_HUB_OFFLINE when its constants module is first imported: import it now, before any
# test sets that variable, so one test's offline mode never leaks into the others.
import huggingface_hub.constants as hf_constants

from chatapp.catalog import Source, load_catalog
from chatapp import hub

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fakehub import FakeHub, free_port, git_blob_id  # noqa: E402

WEIGHTS = bytes(range(256)) * 1200          # 307,200 bytes, served as an LFS file through the "CDN"
CONFIG = b'{"model_type": "axiom", "hidden_size": 8}'
REPO_FILES = {"model.safetensors": WEIGHTS, "config.json": CONFIG, "modeling_axiom.py": b"import os\n",
              "pytorch_model.bin": b"\x80\x04pickle" * 10, "README.md": b"# card\n"}
TOKENIZER = b'{"model": {"type": "BPE"}}'


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "RETRY_WAIT_S", 0.01)
    with FakeHub() as fh:
        monkeypatch.setenv("HF_ENDPOINT", fh.url)
        fh.add_repo("org/model", REPO_FILES)
        fh.add_repo("org/tokenizer", {"tokenizer.json": TOKENIZER, "vocab.txt": b"a\nb\n"})
        yield fh


@pytest.fixture
def entry():
    """A catalog entry (Genesis's chat format) pointed at the fake repos, with a tokenizer repo as second source."""
    base = load_catalog()["genesis"]
    # The hub's own deny-list must hold even if a pattern names a .py or .bin file.
    allow = ("*.safetensors", "*.json", "modeling_axiom.py", "pytorch_model.bin")
    return replace(base, id="fake", source=Source("org/model", "main", allow, 0),
                   extra_sources=(Source("org/tokenizer", "main", ("tokenizer.json",), 0),))


def one_sentence(msg: str) -> bool:
    return "\n" not in msg and msg.endswith(".") and len(re.findall(r"[.!?](\s|$)", msg)) == 1


def test_plan_lists_allowed_files_with_sizes(fake, entry):
    files = hub.plan(entry)
    assert [(f.repo, f.path, f.size) for f in files] == [
        ("org/model", "config.json", len(CONFIG)), ("org/model", "model.safetensors", len(WEIGHTS)),
        ("org/tokenizer", "tokenizer.json", len(TOKENIZER))]
    assert files[1].sha256 == hashlib.sha256(WEIGHTS).hexdigest() and files[1].git_sha1 is None
    # A file outside LFS is checked against the git blob SHA-1 the Hub lists for it.
    assert files[0].git_sha1 == git_blob_id(CONFIG) and files[0].sha256 is None
    assert files[0].commit == fake.repos["org/model"].commit


def test_download_fetches_allowed_files_and_second_source(fake, entry):
    assert not hub.is_downloaded(entry) and hub.local_dir(entry) is None
    d = hub.download(entry)
    assert d.name == fake.repos["org/model"].commit
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    assert (d / "model.safetensors").read_bytes() == WEIGHTS
    assert fake.fetched_paths() == {"config.json", "model.safetensors", "tokenizer.json"}
    assert hub.local_dir(entry) == d and hub.is_downloaded(entry)
    tok = hub.file_path(entry, "tokenizer.json")
    assert tok is not None and tok.read_bytes() == TOKENIZER
    assert hub.file_path(entry, "config.json") == d / "config.json"
    assert hub.file_path(entry, "missing.json") is None
    # The standard cache layout: huggingface_hub's own lookups find the files.
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache
    assert try_to_load_from_cache("org/model", "model.safetensors", cache_dir=str(hub.cache_root())) == \
        str(d / "model.safetensors")
    info = scan_cache_dir(hub.cache_root())
    assert not info.warnings and {r.repo_id for r in info.repos} == {"org/model", "org/tokenizer"}
    # A second call finds everything in place and transfers nothing.
    before = len(fake.requests)
    assert hub.download(entry) == d
    assert not [r for r in fake.requests[before:] if r.method == "GET" and r.sent]


def test_token_goes_to_the_hub_but_never_to_the_cdn(fake, entry, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token_for_tests")
    hub.download(entry)
    cdn = [r for r in fake.requests if r.method == "GET" and r.path == "model.safetensors"]
    assert cdn and all(r.host.startswith("localhost") and not r.auth for r in cdn)
    assert all(r.auth for r in fake.requests if r.method == "HEAD" or r.path == "config.json")


def test_incomplete_second_source_means_not_downloaded(fake, entry):
    hub.download(entry)
    tok = hub.file_path(entry, "tokenizer.json")
    tok.unlink()
    assert hub.local_dir(entry) is None and not hub.is_downloaded(entry)
    hub.download(entry)
    # The blob was still in the cache: the snapshot link is remade without a second transfer.
    assert hub.is_downloaded(entry) and fake.sent("tokenizer.json") == len(TOKENIZER)
    assert hub.file_path(entry, "tokenizer.json").read_bytes() == TOKENIZER


def test_progress_is_byte_accurate_monotonic_and_ends_at_total(fake, entry, monkeypatch):
    monkeypatch.setattr(hub, "PROGRESS_INTERVAL_S", 0.0)
    fake.pace(16_384, 0.003)
    events: list[hub.DownloadProgress] = []
    hub.download(entry, progress=events.append)
    total = len(WEIGHTS) + len(CONFIG) + len(TOKENIZER)
    done = [e.done_bytes for e in events]
    assert all(e.total_bytes == total and e.file_count == 3 for e in events)
    assert done == sorted(done) and done[-1] == total and events[-1].eta_s == 0.0
    # Real bytes, not per-file steps: many distinct values inside the weights file.
    inside = {e.done_bytes for e in events if e.file == "model.safetensors"}
    assert len(inside) >= 5
    assert [e.file_index for e in events] == sorted(e.file_index for e in events)


def test_interrupted_transfer_resumes_sending_only_the_rest(fake, entry):
    fake.break_after("model.safetensors", 100_000)
    d = hub.download(entry)
    gets = fake.gets("model.safetensors")
    assert [(g.range, g.sent) for g in gets] == [(None, 100_000), ("bytes=100000-", len(WEIGHTS) - 100_000)]
    assert (d / "model.safetensors").read_bytes() == WEIGHTS


def test_resume_across_calls_after_the_connection_is_lost(fake, entry, monkeypatch):
    monkeypatch.setattr(hub, "RETRIES", 0)
    fake.break_after("model.safetensors", 120_000)
    with pytest.raises(hub.OfflineError) as e:
        hub.download(entry)
    assert one_sentence(str(e.value)) and "resume" in str(e.value)
    assert not hub.is_downloaded(entry)
    assert hub.disk_usage(entry) == len(CONFIG) + 120_000  # the partial file is kept
    d = hub.download(entry)
    assert fake.gets("model.safetensors")[-1].range == "bytes=120000-"
    assert fake.sent("model.safetensors") == len(WEIGHTS)
    assert (d / "model.safetensors").read_bytes() == WEIGHTS and hub.is_downloaded(entry)


@pytest.mark.parametrize("served", [WEIGHTS[:-1000], WEIGHTS + b"extra"], ids=["short", "long"])
def test_size_mismatch_is_a_hub_error_and_leaves_nothing(fake, entry, served):
    fake.serve_instead("model.safetensors", served)
    with pytest.raises(hub.HubError) as e:
        hub.download(entry)
    assert not isinstance(e.value, hub.OfflineError)
    assert "size" in str(e.value) and one_sentence(str(e.value))
    assert not hub.is_downloaded(entry)
    assert hub.disk_usage(entry) == len(CONFIG)  # no partial weights left to resume from


def test_checksum_mismatch_is_a_hub_error(fake, entry):
    fake.serve_instead("model.safetensors", bytes(len(WEIGHTS)))
    with pytest.raises(hub.HubError, match="checksum"):
        hub.download(entry)
    assert not hub.is_downloaded(entry)


def test_cancel_is_prompt_on_a_stalled_transfer_and_resume_completes(fake, entry, monkeypatch):
    monkeypatch.setattr(hub, "SPEED_WINDOW_S", 0.2)
    fake.stall("model.safetensors", 200_000)
    cancel = threading.Event()
    set_at: list[float] = []
    timers: list[threading.Timer] = []
    events: list[hub.DownloadProgress] = []

    def progress(p):
        events.append(p)
        if p.file == "model.safetensors" and not timers:
            # The local server reaches the stall at once; cancel while the transfer hangs there.
            timers.append(threading.Timer(0.5, lambda: (set_at.append(time.monotonic()), cancel.set())))
            timers[0].start()

    with pytest.raises(hub.DownloadCancelled):
        try:
            hub.download(entry, progress=progress, cancel=cancel)
        finally:
            raised_at = time.monotonic()
    assert set_at and raised_at - set_at[0] < 0.5
    # Reports go on during the stall, and the speed shown falls to zero instead of freezing.
    assert events[-1].done_bytes == len(CONFIG) + 200_000 and events[-1].speed_bps == 0.0
    assert events[-1].eta_s is None
    assert hub.disk_usage(entry) == len(CONFIG) + 200_000 and not hub.is_downloaded(entry)
    del fake.stalls["model.safetensors"]
    d = hub.download(entry)
    assert fake.gets("model.safetensors")[-1].range == "bytes=200000-"
    assert fake.gets("model.safetensors")[-1].sent == len(WEIGHTS) - 200_000
    assert (d / "model.safetensors").read_bytes() == WEIGHTS


def test_cancel_before_start_raises_and_fetches_nothing(fake, entry):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(hub.DownloadCancelled):
        hub.download(entry, cancel=cancel)
    assert not fake.fetched_paths()


def test_server_down_is_offline_error_in_one_sentence(fake, entry, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(hub.OfflineError) as e:
        hub.download(entry)
    assert one_sentence(str(e.value)), str(e.value)


def test_hf_hub_offline_is_offline_error_without_any_request(fake, entry, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub.OfflineError) as e:
        hub.download(entry)
    assert one_sentence(str(e.value)) and "HF_HUB_OFFLINE" in str(e.value)
    with pytest.raises(hub.OfflineError):
        hub.plan(entry)
    assert fake.requests == []


def test_complete_download_is_used_offline(fake, entry, monkeypatch):
    d = hub.download(entry)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    assert hub.download(entry) == d
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.download(entry) == d and hub.file_path(entry, "tokenizer.json") is not None


def test_unknown_repo_and_revision_are_hub_errors(fake, entry):
    for source in (Source("org/nothing", "main", ("*.json",)), Source("org/model", "v9", ("*.json",))):
        with pytest.raises(hub.HubError) as e:
            hub.download(replace(entry, source=source, extra_sources=()))
        assert not isinstance(e.value, hub.OfflineError) and one_sentence(str(e.value))
        assert source.repo in str(e.value)


def test_hf_home_decides_the_cache(fake, entry, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    d = hub.download(entry)
    assert d.is_relative_to(tmp_path / "elsewhere" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "other-cache"))
    assert not hub.is_downloaded(entry)


def test_delete_and_disk_usage_touch_only_that_repo(fake, entry):
    fake.add_repo("org/second", {"model.safetensors": b"\x01" * 5000, "config.json": b"{}"})
    other = replace(entry, id="second", source=Source("org/second", "main", ("*.safetensors", "*.json")),
                    extra_sources=())
    hub.download(entry)
    hub.download(other)
    assert hub.disk_usage(entry) == len(WEIGHTS) + len(CONFIG)
    assert hub.disk_usage(other) == 5002
    hub.delete(entry)
    assert not hub.is_downloaded(entry) and hub.disk_usage(entry) == 0
    assert not (hub.cache_root() / "models--org--model").exists()
    assert hub.is_downloaded(other) and hub.disk_usage(other) == 5002
    # The shared tokenizer repo is another repo: left in place.
    assert (hub.cache_root() / "models--org--tokenizer").is_dir()
    hub.delete(entry)  # deleting twice is harmless


def test_hub_module_is_torch_free():
    # The TUI imports the hub at start-up; building demo checkpoints (torch) lives in engine/demo.py.
    tree = ast.parse(Path(hub.__file__).read_text())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [("." * n.level) + (n.module or "") for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "torch" or "engine" in n.split(".")]


# ---------------------------------------------------------------- a hostile endpoint


@pytest.fixture
def outside(tmp_path):
    """Call it to get what appeared, since the fixture started, outside the HF cache (in the test's home and
    tmp_path, where every hostile name below points)."""
    roots = [Path(os.environ["SMOLLCHAT_HOME"]), tmp_path]

    def listing() -> set[str]:
        cache = hub.cache_root()
        seen = set()
        for root in roots:
            for folder, dirs, names in os.walk(root):  # links are listed, never followed
                for n in dirs + names:
                    p = Path(folder, n)
                    if not p.is_relative_to(cache) and not cache.is_relative_to(p):
                        seen.add(str(p))
        return seen

    start = listing()
    return lambda: sorted(listing() - start)


def refused(entry, outside, *words: str, planted: tuple[Path, ...] = ()) -> None:
    """The download ends in one clear HubError, and nothing appeared outside the cache but what a test planted."""
    try:
        hub.download(entry)
        error = None
    except hub.HubError as e:
        error = e
    assert outside() == sorted(str(p) for p in planted)
    assert isinstance(error, hub.HubError) and not isinstance(error, hub.OfflineError), repr(error)
    assert one_sentence(str(error)) and all(w in str(error) for w in words), str(error)
    assert not hub.is_downloaded(entry)


@pytest.mark.parametrize("path", ["config.json", "model.safetensors"], ids=["regular", "lfs"])
def test_an_etag_that_climbs_out_is_refused(fake, entry, outside, path):
    fake.etag_instead(path, "../../../../planted")
    refused(entry, outside, "unsafe", "planted")


@pytest.mark.parametrize("name", ["../../../../../x.json", "ABS", "..\\..\\..\\x.json", "sub/../../../../../../x.json",
                                  "./config.json", "sub//x.json", "x\x1b[2J.json"],
                         ids=["traversal", "absolute", "backslashes", "inner-dots", "dot", "empty-part", "control"])
def test_a_listed_file_name_that_could_leave_the_snapshot_is_refused(fake, entry, outside, tmp_path, name):
    name = str(tmp_path / "abs" / "x.json") if name == "ABS" else name
    fake.add_repo("org/model", {**REPO_FILES, name: CONFIG})
    fake.answer_any(CONFIG)  # whatever URL the name turns into, this server answers it
    refused(entry, outside, "unsafe file path")
    assert not fake.fetched_paths()


def test_a_commit_that_climbs_out_is_refused(fake, entry, outside):
    fake.repos["org/model"].commit = "../../../../planted"
    refused(entry, outside, "unsafe commit")


@pytest.mark.parametrize("where", ["resolve", "cdn"])
@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x", "http://user:pw@localhost/x"],
                         ids=["file", "ftp", "credentials"])
def test_a_redirect_to_another_scheme_is_refused(fake, entry, outside, where, target):
    if where == "resolve":
        fake.redirect("config.json", target)
    else:
        fake.cdn_redirect(target)
    # huggingface_hub 1.x follows a host-less Location (file:///...) itself, on the same server, and gets a 404.
    words = () if where == "resolve" and target.startswith("file:") else ("unsafe redirect",)
    refused(entry, outside, *words)


@pytest.mark.parametrize("target, ok", [("https://cdn-lfs.hf.co/repos/x?sig=1", True), ("/api/other", True),
                                        ("http://cdn-lfs.hf.co/repos/x", False), ("javascript:alert(1)", False)])
def test_an_https_download_is_never_redirected_to_plain_http(target, ok):
    from urllib.parse import urljoin

    base = "https://huggingface.co/org/model/resolve/main/model.safetensors"
    if ok:
        assert hub._checked("redirect", urljoin(base, target), "x", base=base)
    else:
        with pytest.raises(hub.HubError, match="unsafe redirect"):
            hub._checked("redirect", urljoin(base, target), "x", base=base)


def test_a_cache_folder_reached_through_a_link_still_works(fake, entry, monkeypatch, tmp_path):
    # Containment is judged on resolved paths: a cache moved to another disk and linked back is not "outside".
    (tmp_path / "big-disk").mkdir()
    (tmp_path / "cache").symlink_to(tmp_path / "big-disk")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    d = hub.download(entry)
    assert (d / "config.json").read_bytes() == CONFIG and hub.is_downloaded(entry)
    assert (tmp_path / "big-disk" / "models--org--model" / "blobs").is_dir()


def _plant(kind: str, fake, home: Path) -> Path:
    """A link in the model's cache folder leading out of it, as another user or a broken tool could leave."""
    storage = hub.cache_root() / "models--org--model"
    commit = fake.repos["org/model"].commit
    if kind == "snapshot folder":
        target = home / "elsewhere"
        target.mkdir()
        link = storage / "snapshots" / commit
    elif kind == "partial blob":
        target = home / "victim.bin"
        target.write_bytes(b"precious")
        link = storage / "blobs" / (hashlib.sha256(WEIGHTS).hexdigest() + ".incomplete")
    else:  # a finished-looking snapshot file, the size the Hub lists
        target = home / "outside.json"
        target.write_bytes(b"x" * len(CONFIG))
        link = storage / "snapshots" / commit / "config.json"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return target


@pytest.mark.parametrize("kind", ["snapshot folder", "partial blob", "snapshot file"])
def test_a_planted_link_is_never_followed_out_of_the_cache(fake, entry, outside, kind):
    target = _plant(kind, fake, Path(os.environ["SMOLLCHAT_HOME"]))
    before = target.read_bytes() if target.is_file() else sorted(target.iterdir())
    refused(entry, outside, "leads outside", "delete that link", planted=(target,))
    assert (target.read_bytes() if target.is_file() else sorted(target.iterdir())) == before
    found = hub.file_path(entry, "config.json")
    assert hub.local_dir(entry) is None and (found is None or found.resolve().is_relative_to(hub.cache_root()))


def test_a_flipped_byte_in_a_small_file_is_refused_and_removed(fake, entry, outside):
    fake.serve_instead("config.json", CONFIG[:10] + bytes([CONFIG[10] ^ 1]) + CONFIG[11:])
    refused(entry, outside, "checksum")
    assert hub.disk_usage(entry) == 0  # neither the blob nor a partial file is kept
    assert not list((hub.cache_root() / "models--org--model" / "blobs").iterdir())
    del fake.instead["config.json"]
    assert (hub.download(entry) / "config.json").read_bytes() == CONFIG


def test_an_etag_other_than_the_listed_hash_is_refused(fake, entry, outside):
    fake.etag_instead("config.json", git_blob_id(b"something else"))
    refused(entry, outside, "lists one version", "serves another")


@pytest.mark.parametrize("value", ["bytes abc-def/ghi", "bytes -5-9/10"])
def test_a_garbled_content_range_on_resume_is_a_hub_error(fake, entry, outside, value):
    fake.break_after("model.safetensors", 100_000)
    fake.content_range_instead("model.safetensors", value)
    refused(entry, outside, "size")

