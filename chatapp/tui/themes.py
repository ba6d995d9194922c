"""Themes as data: `themes/*.toml` (shipped) plus `<config dir>/themes/*.toml` (the user's).

Each file is one Textual `Theme` record: `name`, `primary`, the optional colour roles, `dark`, and a
`[variables]` table for our own CSS variables (the memory panel's series colours, the token
inspector's levels). A broken user
theme is reported and skipped; it never stops the app.
"""
from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

from textual.color import Color, ColorParseError
from textual.theme import Theme

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_THEME = "smoll-dark"

#: Our CSS variables and their values under themes that do not set them (Textual's built-ins).
VARIABLE_DEFAULTS = {"mem-state": "#f2b134", "mem-kv": "#5fa8d3", "mem-ghost": "#777777",
                     # The token inspector's levels, sure to unsure (a dark background's inks).
                     "tok-0": "#6cc57c", "tok-1": "#b5cf62", "tok-2": "#f2b134", "tok-3": "#f0894a", "tok-4": "#ff7b8a"}

_FIELDS = {f.name for f in fields(Theme)}
_COLOURS = ("primary", "secondary", "warning", "error", "success", "accent", "foreground", "background",
            "surface", "panel", "boost")


class ThemeError(ValueError):
    """A theme file that is not a usable theme record."""


def shipped_theme_dir() -> Path | None:
    """The packaged copy (chatapp/theme_data) or the repo's themes/ in a source checkout."""
    here = Path(__file__).resolve().parent.parent
    for d in (here / "theme_data", here.parent / "themes"):
        if d.is_dir():
            return d
    return None


def theme_from_toml(path: Path) -> Theme:
    """Parse and validate one theme file."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, OSError) as e:
        raise ThemeError(f"{path.name}: {e}") from None
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ThemeError(f"{path.name}: unknown key(s) {', '.join(sorted(unknown))}")
    if not isinstance(raw.get("name"), str) or "primary" not in raw:
        raise ThemeError(f"{path.name}: a theme needs `name` and `primary`")
    for key in _COLOURS:
        if key in raw:
            _check_colour(path, key, raw[key])
    variables = raw.get("variables", {})
    if not isinstance(variables, dict):
        raise ThemeError(f"{path.name}: [variables] must be a table")
    for key, value in variables.items():
        if key in VARIABLE_DEFAULTS:
            _check_colour(path, f"variables.{key}", value)
    return Theme(**{**raw, "variables": {str(k): str(v) for k, v in variables.items()}})


def _check_colour(path: Path, key: str, value: object) -> None:
    try:
        Color.parse(str(value))
    except ColorParseError:
        raise ThemeError(f"{path.name}: {key} = {value!r} is not a colour") from None


def load_themes(dirs: list[Path]) -> tuple[list[Theme], list[str]]:
    """Every theme in `dirs` (later directories override earlier names) and the problems found."""
    themes: dict[str, Theme] = {}
    problems: list[str] = []
    for d in dirs:
        if not d.is_dir():
            continue
        for path in sorted(d.glob("*.toml")):
            try:
                theme = theme_from_toml(path)
            except ThemeError as e:
                problems.append(str(e))
                continue
            themes[theme.name] = theme
    return list(themes.values()), problems
