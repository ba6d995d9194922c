"""What the TUI needs from outside itself, behind small seams the tests replace.

- downloader: `chatapp.hub` (is_downloaded, local_dir, download, delete, disk_usage) or
  `chat.fake.FakeDownloader` in tests. Demo checkpoints are the engine's to make, when one loads.
- loader: `load(entry, progress, quantize) -> engine` (`quantize` None = the catalog entry's default);
  the real one imports `chatapp.engine.runtime` (and so torch) only when a model is actually loaded,
  never at start-up, and follows the command line's `LoadOptions`.
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

    def quantize_unavailable(self) -> str | None:
        """Why weight-only quantization cannot be chosen in this run, or None when it can."""
        if self.eager:
            return "off under --eager (the reference numerics)"
        if self.device == "cuda":
            return "CPU only (PyTorch's packed CPU kernels); this run loads on the GPU"
        return None

    def loader(self) -> Loader:
        """Load a catalog entry with the real engine (imports torch when called)."""
        def load(entry, progress: Callable[[str], None], quantize: str | None = None) -> Any:
            from ..engine.runtime import load_engine

            return load_engine(entry, device=self.device, dtype=self.dtype, progress=progress,
                               compile="off" if self.eager else self.compile,
                               quantize="none" if self.eager else quantize)
        return load



def error_text(e: BaseException) -> str:
    """One clear sentence for a failure: offline and hub errors carry their own message."""
    name = type(e).__name__
    msg = str(e) or name
    if name == "OfflineError":
        return f"Offline: {msg}"
    if name in ("HubError", "LoadError", "TokenizerError", "CatalogError", "RuntimeError", "ValueError"):
        return msg
    return f"{name}: {msg}"


def is_offline(e: BaseException) -> bool:
    return type(e).__name__ == "OfflineError"
