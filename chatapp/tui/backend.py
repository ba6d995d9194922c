"""What the TUI needs from outside itself, behind small seams the tests replace.

- downloader: `chatapp.hub` (is_downloaded, local_dir, download, delete, disk_usage) or
  `chat.fake.FakeDownloader` in tests. Demo checkpoints are the engine's to make, when one loads.
- loader: `load(entry, progress, quantize) -> engine` (`quantize` None = the catalog entry's default;
  entry a catalog entry or a local model directory, a Path); the real one follows the command line's
  `LoadOptions`: by default the engine runs in a child process (chat/engine_host.py: the UI then
  cannot slow it, bench/tui.md) and this process never imports torch; in-process (--no-engine-process,
  or where no child can start) it imports `chatapp.engine.runtime` (and so torch) only when a model
  is actually loaded, never at start-up. The app's model pool calls it,
  after an estimate of the model's bytes sized it for the memory budget.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

Loader = Callable[[Any, Callable[[str], None], "str | None"], Any]


class DownloadsUnavailable:
    """Stands in for the hub when it cannot be imported: every action says why, nothing crashes."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def is_downloaded(self, entry) -> bool:
        return False

    def local_dir(self, entry) -> Path | None:
        return None

    def disk_usage(self, entry) -> int:
        return 0

    def download(self, entry, progress=None, cancel=None) -> Path:
        raise RuntimeError(self.reason)

    def delete(self, entry) -> None:
        raise RuntimeError(self.reason)


def default_downloader() -> Any:
    try:
        from .. import hub
    except ImportError as e:
        return DownloadsUnavailable(f"downloads are unavailable in this install ({e})")
    return hub


@dataclass(frozen=True)
class LoadOptions:
    """How the command line asked models to load; every load the TUI starts follows it."""

    device: str = "auto"
    dtype: str = "auto"
    compile: str = "auto"
    eager: bool = False
    """Every fast path off (the reference numerics): no compiled step, no quantization."""
    quantize: str | None = None
    """--quantize: the quantization the models screen starts on (None: each entry's default)."""
    engine_process: bool = True
    """The engine in a child process (False: --no-engine-process, in the app's own)."""
    threads: int | None = None
    """--threads: the engine's intra-op threads, applied where it loads (None: its default)."""

    def quantize_unavailable(self) -> str | None:
        """Why weight-only quantization cannot be chosen in this run, or None when it can."""
        if self.eager:
            return "off under --eager (the reference numerics)"
        if self.device == "cuda":
            return "CPU only (PyTorch's packed CPU kernels); this run loads on the GPU"
        return None

    def loader(self) -> Loader:
        """Load a catalog entry (or a local directory) with the real engine, in a child process unless
        `engine_process` is False or none can start (then here: imports torch when called)."""
        def load(entry, progress: Callable[[str], None], quantize: str | None = None) -> Any:
            options = dict(device=self.device, dtype=self.dtype, compile="off" if self.eager else self.compile,
                           quantize="none" if self.eager else quantize,
                           kernels="reference" if self.eager else "auto", threads=self.threads)
            if self.engine_process:
                from ..chat.engine_host import EngineProcessUnavailable, load_engine_process

                try:
                    return load_engine_process(entry, progress=progress, **options)
                except EngineProcessUnavailable as e:
                    progress(f"{e}; loading in this process")
            from ..engine.runtime import entry_for_directory, load_engine

            if isinstance(entry, Path):
                entry = entry_for_directory(entry)
            return load_engine(entry, progress=progress, **options)
        return load


def error_text(e: BaseException) -> str:
    """One clear sentence for a failure: offline and hub errors carry their own message."""
    name = type(e).__name__
    msg = str(e) or name
    if name == "OfflineError":
        return f"Offline: {msg}"
    if name in ("HubError", "LoadError", "TokenizerError", "CatalogError", "RuntimeError", "ValueError",
                "EngineProcessError", "EngineProcessUnavailable"):
        return msg
    return f"{name}: {msg}"


def is_offline(e: BaseException) -> bool:
    return type(e).__name__ == "OfflineError"
