"""The compute panel: a form built from the model's declared `CONTROLS` alone, and a live readout of
the recurrence steps each token used (mean/max, a per-token strip, the saving from early exit).

Nothing here names a model: a model without controls gets no panel, and the form is whatever its
ControlSpecs say (int/float/str -> input, choice -> select, bool -> switch).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.reactive import reactive
from textual.widgets import Input, Label, Select, Static, Switch

from ...contract import ControlSpec
from ...textsafe import plain
from ..figures import steps_strip, steps_summary

#: The control that caps the steps a token may use; the early-exit saving is measured against it.
BUDGET_CONTROL = "num_steps"


class ComputePanel(Vertical):
    """Hidden for models that declare no controls."""

    DEFAULT_CSS = """
    ComputePanel { height: auto; padding: 0 1; border-top: hkey $panel; }
    ComputePanel .title { text-style: bold; }
    ComputePanel #controls { height: auto; }
    ComputePanel .row { height: auto; }
    ComputePanel .row Label { width: 19; padding: 0 1 0 0; color: $text-muted; }
    ComputePanel .row Input, ComputePanel .row Select { width: 1fr; }
    ComputePanel Input.-invalid { border: tall $error; }
    ComputePanel .help { color: $error; height: auto; }
    ComputePanel .readout { color: $text-accent; height: auto; }
    """

    steps: reactive[tuple] = reactive(tuple, layout=True)
    """Per-token steps of the reply shown (None for a token without them)."""

    @dataclass
    class Changed(Message):
        """A control got a valid new value."""

        panel: "ComputePanel"
        name: str
        value: Any

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.specs: tuple[ControlSpec, ...] = ()
        self.values: dict[str, Any] = {}
        self._rebuilding = asyncio.Lock()
        self._reply_budget: int | None = None
        """The step budget the reply shown ran with: its figures never mix with a newer setting."""

    def compose(self) -> ComposeResult:
        yield Static("Compute", classes="title")
        yield Vertical(id="controls")
        yield Static("", classes="help", markup=False)
        yield Static("", classes="readout", markup=False)

    async def set_controls(self, specs: tuple[ControlSpec, ...], values: dict[str, Any]) -> None:
        """Show a model's controls with the chat's values (defaults where unset).

        The same controls only get their values updated (no remount, so a value being edited is
        not thrown away); other controls rebuild the form.
        """
        async with self._rebuilding:
            specs = tuple(specs)
            wanted = {s.name: values.get(s.name, s.default) for s in specs}
            box = self.query_one("#controls", Vertical)
            if specs == self.specs and box.children:
                for spec in specs:
                    if wanted[spec.name] != self.values.get(spec.name):
                        self._set_field(spec, wanted[spec.name])
                self.values = wanted
                return
            self.specs, self.values = specs, wanted
            self.display = bool(specs)
            await box.remove_children()
            await box.mount_all([self._row(s) for s in specs])
            self.query_one(".help", Static).update("")
            self._readout()

    def _set_field(self, spec: ControlSpec, value: Any) -> None:
        field = self.query_one(f"#control-{spec.name}")
        # Showing a chat's stored value is not an edit: no Changed message may come of it.
        with field.prevent(Input.Changed, Select.Changed, Switch.Changed):
            if isinstance(field, Switch):
                field.value = bool(value)
            elif isinstance(field, Select):
                field.value = value
            else:
                field.value = str(value)
        field.remove_class("-invalid")

    def _row(self, spec: ControlSpec) -> Horizontal:
        value = self.values[spec.name]
        wid = f"control-{spec.name}"
        choices = [c for c in spec.choices if not (isinstance(c, str) and c.endswith("*"))]
        if spec.type == "bool":
            field: Any = Switch(bool(value), id=wid)
        elif spec.type == "choice" and choices and len(choices) == len(spec.choices):
            field = Select([(str(c), c) for c in choices], value=value if value in choices else Select.BLANK,
                           allow_blank=False, id=wid, compact=True)
        else:
            field = Input(str(value), id=wid, compact=True)
        field.tooltip = spec.help or None
        return Horizontal(Label(plain(spec.label)), field, classes="row")

    def _spec(self, widget_id: str | None) -> ControlSpec | None:
        name = (widget_id or "").removeprefix("control-")
        return next((s for s in self.specs if s.name == name), None)

    def _accept(self, widget, raw: Any) -> None:
        spec = self._spec(widget.id)
        if spec is None:
            return
        help_line = self.query_one(".help", Static)
        try:
            value = spec.coerce(raw)
        except ValueError as e:
            widget.add_class("-invalid")
            help_line.update(plain(str(e)))
            return
        widget.remove_class("-invalid")
        help_line.update("")
        if self.values.get(spec.name) != value:
            self.values[spec.name] = value
            self.post_message(self.Changed(self, spec.name, value))

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._accept(event.input, event.value)

    def on_input_blurred(self, event: Input.Blurred) -> None:
        self._accept(event.input, event.value)

    def on_select_changed(self, event: Select.Changed) -> None:
        event.stop()
        if event.value is not Select.BLANK:
            self._accept(event.select, event.value)

    def on_switch_changed(self, event: Switch.Changed) -> None:
        event.stop()
        self._accept(event.switch, event.value)

    def begin_reply(self) -> None:
        """A reply starts with the controls as they are now."""
        self.show_reply((), self.values.get(BUDGET_CONTROL))

    def add_steps(self, steps: tuple) -> None:
        self.steps = (*self.steps, *steps)

    def show_reply(self, steps: tuple, budget: object) -> None:
        """The steps of one reply and the budget it ran with (from its run card, or at its start)."""
        self._reply_budget = int(budget) if isinstance(budget, (int, float)) and not isinstance(budget, bool) else None
        self.steps = tuple(steps)
        if self.is_mounted:
            self._readout()

    def watch_steps(self) -> None:
        if self.is_mounted:
            self._readout()

    def _readout(self) -> None:
        steps = list(self.steps)
        readout = self.query_one(".readout", Static)
        if not any(s is not None for s in steps):
            readout.update("steps per token: (after the next reply)" if self.specs else "")
            return
        budget = self._reply_budget
        mean, peak, saving = steps_summary(steps, budget)
        width = max(8, self.size.width - 2)
        lines = [f"steps/token  mean {mean:.1f} · max {peak}" + (f" of {budget}" if budget else ""),
                 steps_strip(steps, width, budget or peak)]
        if saving is not None:
            lines.append(f"early exit saved {saving * 100:.0f}% of {budget} × {len(steps)} steps")
        text = "\n".join(lines)
        readout.update(text, layout=text.count("\n") != str(readout.content).count("\n"))
