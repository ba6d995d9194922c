"""The models screen's "Load with" row: the weight-only quantization (none/int8/int4) the selected
model loads with, remembered per model while the screen is open.

It starts on the command line's --quantize, else the catalog entry's default, and is disabled with
the reason where the run cannot quantize (--eager, --device cuda): see `backend.LoadOptions`.
"""
from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label, Select, Static

from ..backend import LoadOptions

QUANTIZE = ("none", "int8", "int4")
HELP = {"none": "weights as stored", "int8": "weight-only int8: about half the bf16 bytes",
        "int4": "weight-only int4: about a quarter, the largest error"}


class QuantizeChoice(Horizontal):
    DEFAULT_CSS = """
    QuantizeChoice { height: 1; margin: 1 0 0 0; }
    QuantizeChoice Label { width: 10; color: $text-muted; }
    QuantizeChoice Select { width: 12; }
    QuantizeChoice #models-quantize-help { width: 1fr; padding: 0 0 0 1; color: $text-muted; }
    """

    def __init__(self, options: LoadOptions, start: Any = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.options = options
        self.chosen: dict[str, str] = {}
        """Choices made on this screen, by model id."""
        self._start = self.value(start) if start is not None else "none"
        self._entry: Any = None

    def compose(self) -> ComposeResult:
        yield Label("Load with")
        # Built on the first model's value: the list announces its value when it mounts.
        yield Select([(q, q) for q in QUANTIZE], allow_blank=False, compact=True, value=self._start,
                     id="models-quantize")
        yield Static("", id="models-quantize-help", markup=False)

    @property
    def expanded(self) -> bool:
        return self.query_one(Select).expanded

    def default(self, entry: Any) -> str:
        return self.options.quantize or entry.quantize

    def value(self, entry: Any) -> str:
        """What `entry` loads with (none where this run cannot quantize)."""
        if self.options.quantize_unavailable():
            return "none"
        return self.chosen.get(entry.id, self.default(entry))

    def asked(self, entry: Any) -> str | None:
        """The loader's `quantize`: a choice made here as such; the default stays the command line's or
        the catalog's (the engine drops the catalog's CPU default on a GPU)."""
        value = self.value(entry)
        return self.options.quantize if value == self.default(entry) else value

    def show(self, entry: Any) -> None:
        self._entry = entry
        select = self.query_one(Select)
        why_not = self.options.quantize_unavailable()
        value = self.value(entry)
        with select.prevent(Select.Changed):
            select.value = value
        select.disabled = why_not is not None
        if why_not:
            note = f"quantization {why_not}"
        else:
            note = f"{HELP[value]}{' (the default)' if value == self.default(entry) else ''} · q changes it"
        self.query_one("#models-quantize-help", Static).update(note)

    def cycle(self, entry: Any) -> str | None:
        """none -> int8 -> int4 -> none; the reason instead where this run cannot quantize."""
        why_not = self.options.quantize_unavailable()
        if why_not:
            return f"Quantization is {why_not}."
        self.chosen[entry.id] = QUANTIZE[(QUANTIZE.index(self.value(entry)) + 1) % len(QUANTIZE)]
        self.show(entry)
        return None

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        entry = self._entry
        if entry is not None and event.value in QUANTIZE and event.value != self.value(entry):
            self.chosen[entry.id] = event.value
            self.show(entry)
