"""Demo checkpoints: a demo catalog entry's random-weight model, built with torch and saved on disk.

Where a demo lives and when it counts as made (`demo_dir`, `demo_stamp`, `demo_ready`) is the torch-free
downloader's business (chatapp/hub.py: the TUI asks it without importing torch); building and writing is here.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .. import hub
from ..catalog import ModelEntry
from .loader import LoadError, build_model

__all__ = ["ensure_demo"]


def ensure_demo(entry: ModelEntry) -> Path:
    """Make (once, deterministically) the demo entry's random-weight checkpoint and return its directory.

    config.json = the entry's demo_config; model.safetensors = the state_dict of Model(ModelArgs) built on CPU
    under torch.manual_seed(demo_seed) (then `init_demo_weights()` when the architecture has one). Written in a
    temporary directory and renamed into place, so a crash never leaves half a demo.
    """
    if not entry.demo:
        raise LoadError(f"{entry.id} is not a demo entry; download it with `smollchat download {entry.id}`.")
    final = hub.demo_dir(entry)
    stamp = hub.demo_stamp(entry)
    if hub.demo_ready(final, stamp):
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.id}.", dir=final.parent))
    try:
        # A private RNG stream: the caller's torch seed state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(entry.demo_seed)
            model = build_model(dict(entry.demo_config), entry.options, device="cpu")
            init = getattr(model, "init_demo_weights", None)
            if callable(init):
                init()
        # Clones: tied weights share storage, which save_file refuses.
        tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"smollchat_demo": "random weights"})
        (tmp / "config.json").write_text(json.dumps(entry.demo_config, indent=1, sort_keys=True), encoding="utf-8")
        (tmp / hub.DEMO_STAMP).write_text(json.dumps(stamp, sort_keys=True), encoding="utf-8")
        _swap_in(tmp, final, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _swap_in(tmp: Path, final: Path, stamp: dict[str, Any]) -> None:
    """Rename a finished directory into place, replacing a stale one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        # Another process finished the same demo first; its bytes are the same.
        if not hub.demo_ready(final, stamp):
            raise
