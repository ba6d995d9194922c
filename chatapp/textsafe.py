"""Untrusted text (chat titles, messages, model output, file names, error texts) made safe to show.

Two dangers, one place for each:
- terminal control: a C0/C1 control character or an escape sequence written to a terminal moves
  the cursor, recolours the screen or sets the window title. `displayable` shows controls as
  visible symbols (the TUI); `strip_controls` drops them with the sequences they start (a TTY
  stdout, where a symbol would only add noise).
- markup: Textual reads a plain `str` given to most widgets, toasts and option lists as markup, so
  a title such as `[@click=app.quit]` would run an action and `[/]` would raise. `plain` wraps the
  text as Textual `Content`, which is never parsed.

Imports neither torch nor (until `plain` is called) Textual, so the one-shot CLI can use it.
"""
from __future__ import annotations

import re
from typing import Any

# C0 controls (but newline and tab) and DEL as their Unicode pictures (␛, ␇, ␡); C1 controls
# (0x80-0x9f: CSI, OSC and others in 8-bit form) have no pictures and become the replacement sign.
_PICTURES = ({c: 0x2400 + c for c in range(32) if c not in (9, 10)} | {127: 0x2421}
             | {c: 0xFFFD for c in range(0x80, 0xA0)})

# An escape sequence as terminals parse it: CSI (ESC [ or 0x9b) params and a final byte; OSC, DCS,
# APC, PM, SOS (ESC ] P _ ^ X or their C1 forms) up to BEL or ST (or the end of the text); any
# other two-byte ESC sequence. Whatever control is left afterwards is dropped on its own.
_SEQUENCE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]?"
    r"|(?:\x1b[\]P_^X]|[\x9d\x90\x9f\x9e\x98])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|\x1b[ -~]?")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def displayable(text: str) -> str:
    """Text safe to draw in a terminal cell grid: every control but newline and tab becomes a
    visible symbol, so nothing the text holds can act on the terminal."""
    return text.translate(_PICTURES)


def strip_controls(text: str) -> str:
    """Text safe to write to a terminal: escape sequences and other controls removed (newline and
    tab kept). For a stream, apply it to each chunk: a sequence cut between chunks loses its ESC in
    the first, so the rest prints as plain characters and does nothing."""
    return _CONTROLS.sub("", _SEQUENCE.sub("", text))


def plain(text: Any, style: str = "") -> Any:
    """Untrusted text as Textual `Content` (shown as written, never read as markup), controls made
    visible. Use it wherever such text goes into a widget, a toast, a title or an option list."""
    from textual.content import Content

    return Content.styled(displayable(str(text)), style) if style else Content(displayable(str(text)))
