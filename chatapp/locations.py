"""Where smollchat keeps things: platformdirs locations, overridable for tests.

SMOLLCHAT_HOME=<dir> puts config, data and cache under one directory (tests set it). Model weights
live in the huggingface_hub cache (HF_HOME / HF_HUB_CACHE), not here.
"""
from __future__ import annotations

import os
from pathlib import Path

APP = "smollchat"


def _home() -> Path | None:
    h = os.environ.get("SMOLLCHAT_HOME")
    return Path(h) if h else None


def config_dir() -> Path:
    """User settings, keys.toml, user themes (themes/*.toml)."""
    if h := _home():
        return _ensure(h / "config")
    from platformdirs import user_config_dir
    return _ensure(Path(user_config_dir(APP)))


def data_dir() -> Path:
    """The conversation database and demo checkpoints."""
    if h := _home():
        return _ensure(h / "data")
    from platformdirs import user_data_dir
    return _ensure(Path(user_data_dir(APP)))


def cache_dir() -> Path:
    if h := _home():
        return _ensure(h / "cache")
    from platformdirs import user_cache_dir
    return _ensure(Path(user_cache_dir(APP)))


def demo_dir() -> Path:
    """Deterministic random-weight demo checkpoints, made on first use."""
    return _ensure(data_dir() / "demo")


def database_path() -> Path:
    return data_dir() / "chats.sqlite3"


def user_themes_dir() -> Path:
    return config_dir() / "themes"


def keys_path() -> Path:
    return config_dir() / "keys.toml"


def _ensure(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
