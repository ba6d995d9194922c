"""Per-chat settings: the system prompt (the model's default, none, or the chat's own) and sampling
overrides on top of the model's catalog defaults and an optional saved preset.

Empty fields inherit (catalog < preset < chat); placeholders show the model's default, so what
applies is always visible. Returns {"system_prompt": str | None, "settings": dict} or None.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static, Switch, TextArea

from ...contract import SamplingSettings
from ...textsafe import plain
from ..keys import bindings
from .dialogs import DIALOG_CSS, TextPrompt

FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram", "seed",
          "max_new_tokens", "stop_strings")
_TYPES = {f.name: f.type for f in fields(SamplingSettings)}
NO_PRESET = "(no preset)"
#: Built-in starting points that fill the fields (still editable): the card's own settings (every
#: field empty), a near-deterministic one for facts and code, and a looser one for writing.
BUILTIN = {
    "card": {},
    "precise": {"temperature": 0.2, "top_p": 0.9, "top_k": 40, "repetition_penalty": 1.05},
    "creative": {"temperature": 1.0, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.1},
}


def parse_field(name: str, raw: str) -> Any:
    """Text of one field -> a setting value (None = inherit); ValueError names the field."""
    raw = raw.strip()
    if not raw:
        return None
    if name == "stop_strings":
        return [s.replace("\\n", "\n") for s in (p.strip() for p in raw.split(",")) if s]
    kind = _TYPES[name]
    try:
        return int(raw) if "int" in str(kind) else float(raw)
    except ValueError:
        raise ValueError(f"{name} expects a number, got {raw!r}") from None


def show_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v).replace("\n", "\\n") for v in value)
    return "" if value is None else str(value)


class ChatSettings(ModalScreen[dict | None]):
    DEFAULT_CSS = DIALOG_CSS.format(name="ChatSettings", width=84) + """
    ChatSettings VerticalScroll { height: auto; max-height: 30; }
    ChatSettings TextArea { height: 6; }
    ChatSettings Grid { grid-size: 4; grid-columns: 20 1fr 20 1fr; grid-rows: 1; grid-gutter: 0 1; height: auto; }
    ChatSettings Grid Label { color: $text-muted; }
    ChatSettings .switch-row { height: auto; }
    ChatSettings .switch-row Label { padding: 1 1 0 0; }
    ChatSettings Select { width: 1fr; }
    ChatSettings .switch-row Button { margin: 0 0 0 1; }
    ChatSettings .builtin-row { height: 1; margin: 1 0; }
    ChatSettings .builtin-row Label { padding: 0 1 0 0; width: 20; }
    ChatSettings .builtin-row Button { margin: 0 1 0 0; }
    """
    BINDINGS = bindings("dialog")

    def __init__(self, conv, defaults: SamplingSettings | None, default_system: str, store: Any) -> None:
        super().__init__()
        self.conv = conv
        self.defaults = defaults or SamplingSettings()
        self.default_system = default_system
        self.store = store

    def compose(self) -> ComposeResult:
        own = self.conv.system_prompt
        with Vertical():
            yield Label("Chat settings", classes="title")
            with VerticalScroll():
                with Horizontal(classes="switch-row"):
                    yield Label("Use the model's default system prompt")
                    yield Switch(own is None, id="use-default")
                yield TextArea(self.default_system if own is None else own, id="system", soft_wrap=True,
                               disabled=own is None)
                with Horizontal(classes="switch-row"):
                    yield Label("Preset")
                    yield Select(self._preset_options(), value=self.conv.settings.get("preset") or NO_PRESET,
                                 allow_blank=False, id="preset")
                    yield Button("Save as preset", id="save-preset")
                    yield Button("Delete preset", id="delete-preset")
                with Horizontal(classes="builtin-row"):
                    yield Label("Start from")
                    for name in BUILTIN:
                        yield Button(f"{name}", id=f"builtin-{name}", compact=True)
                with Grid():
                    for name in FIELDS:
                        yield Label(name.replace("_", " "))
                        yield Input(show_value(self.conv.settings.get(name)), id=f"f-{name}", compact=True,
                                    placeholder=show_value(getattr(self.defaults, name)) or "none")
            yield Static("Empty fields use the preset, then the model's defaults. Ctrl+S applies · Esc cancels",
                         classes="hint")
            yield Static("", classes="error", markup=False)

    def _preset_names(self) -> list[str]:
        try:
            return sorted(self.store.list_presets())
        except AttributeError:
            return []

    def _preset_options(self) -> list[tuple[str, str]]:
        names = self._preset_names()
        current = self.conv.settings.get("preset")
        if current and current not in names:
            names.append(current)
        return [(NO_PRESET, NO_PRESET)] + [(plain(n), n) for n in names]

    def on_switch_changed(self, event: Switch.Changed) -> None:
        area = self.query_one("#system", TextArea)
        area.disabled = event.value
        if event.value:
            area.load_text(self.default_system)

    def _collect(self) -> dict[str, Any] | None:
        """The chat's overrides from the form; None (with the error shown) when one is invalid."""
        out: dict[str, Any] = {}
        try:
            for name in FIELDS:
                value = parse_field(name, self.query_one(f"#f-{name}", Input).value)
                if value is not None:
                    out[name] = value
            self.defaults.with_overrides(**out).validate()
        except (ValueError, TypeError) as e:
            self.query_one(".error", Static).update(plain(str(e)))
            return None
        return out

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "delete-preset":
            self._delete_preset()
            return
        if (event.button.id or "").startswith("builtin-"):
            values = BUILTIN[event.button.id.removeprefix("builtin-")]
            for name in FIELDS:
                self.query_one(f"#f-{name}", Input).value = show_value(values.get(name))
            return
        values = self._collect()
        if values is None:
            return

        def named(name: str | None) -> None:
            if not name:
                return
            self.store.save_preset(name, values)
            select = self.query_one("#preset", Select)
            select.set_options(self._preset_options())
            select.value = name
            self.notify(f"Saved preset “{name}”.")

        self.app.push_screen(TextPrompt("Preset name", hint="Saves the fields filled in above."), named)

    def _delete_preset(self) -> None:
        select = self.query_one("#preset", Select)
        name = select.value
        if name in (NO_PRESET, Select.BLANK):
            return
        self.store.delete_preset(name)
        select.set_options(self._preset_options())
        select.value = NO_PRESET
        self.notify(f"Deleted preset “{name}”.")

    def action_save(self) -> None:
        settings = self._collect()
        if settings is None:
            return
        preset = self.query_one("#preset", Select).value
        if preset not in (NO_PRESET, Select.BLANK):
            settings["preset"] = preset
        use_default = self.query_one("#use-default", Switch).value
        system = None if use_default else self.query_one("#system", TextArea).text
        self.dismiss({"system_prompt": system, "settings": settings})

    def action_cancel(self) -> None:
        self.dismiss(None)
