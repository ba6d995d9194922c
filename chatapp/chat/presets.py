"""Built-in sampling presets: shipped starting points that a chat names in `settings["preset"]` just
as it names a preset the user saved, listed beside those in the chat settings.

Their names end in " (built-in)", so a built-in never shadows a user's preset (or the other way
round), and the store refuses to save under such a name. They are sampling overrides on top of the
catalog entry, like any preset: "card" overrides nothing (the model card's own settings).
"""
from __future__ import annotations

from typing import Any

SUFFIX = " (built-in)"
BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    "card" + SUFFIX: {},
    # Near-deterministic, for facts and code.
    "precise" + SUFFIX: {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.05},
    # Looser, for writing.
    "creative" + SUFFIX: {"temperature": 1.0, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.1},
}


def is_builtin(name: str) -> bool:
    return name.endswith(SUFFIX)


def builtin_preset(name: str) -> dict[str, Any] | None:
    """A built-in preset's settings (a copy), or None when `name` is not one."""
    found = BUILTIN_PRESETS.get(name)
    return dict(found) if found is not None else None
