"""Per-chat settings: the system prompt (the model's default, none, or the chat's own) and sampling
overrides on top of the model's catalog defaults and an optional preset (a built-in one from
chat/presets.py, listed first and never deletable, or one the user saved).

Empty fields inherit (catalog < preset < chat); placeholders show what the model's defaults and the
chosen preset give, so what applies is always visible. Returns {"system_prompt": str | None,
"settings": dict} or None.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Select, Static, Switch, TextArea

from ...chat.presets import BUILTIN_PRESETS, builtin_preset, is_builtin
from ...contract import SamplingSettings
from ...textsafe import plain
from ..keys import bindings
from .dialogs import DIALOG_CSS, TextPrompt

FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "no_repeat_ngram", "seed",
          "max_new_tokens", "stop_strings")
_TYPES = {f.name: f.type for f in fields(SamplingSettings)}
NO_PRESET = "(no preset)"


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
    ChatSettings TextArea.-inherited { color: $text-muted; }
    ChatSettings Grid { grid-size: 4; grid-columns: 20 1fr 20 1fr; grid-rows: 1; grid-gutter: 0 1; height: auto;
                     margin: 1 0 0 0; }
    ChatSettings Grid Label { color: $text-muted; }
    ChatSettings .switch-row { height: auto; }
    ChatSettings .switch-row Label { padding: 1 1 0 0; }
    ChatSettings Select { width: 1fr; }
    ChatSettings .switch-row Button { margin: 0 0 0 1; }
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
            with VerticalScroll(can_focus=False):  # an invisible Tab stop otherwise; its fields scroll it
                with Horizontal(classes="switch-row"):
                    yield Label("Use the model's default system prompt")
                    yield Switch(own is None, id="use-default")
                # Read-only rather than disabled while it shows the default: a disabled field leaves the
                # Tab order, which then differed between chats with and without their own prompt.
                area = TextArea(self.default_system if own is None else own, id="system", soft_wrap=True,
                                read_only=own is None)
                area.set_class(own is None, "-inherited")
                yield area
                with Horizontal(classes="switch-row"):
                    yield Label("Preset")
                    yield Select(self._preset_options(), value=self.conv.settings.get("preset") or NO_PRESET,
                                 allow_blank=False, id="preset")
                    yield Button("Save as preset", id="save-preset")
                    yield Button("Delete preset", id="delete-preset")
                with Grid():
                    for name in FIELDS:
                        yield Label(name.replace("_", " "))
                        yield Input(show_value(self.conv.settings.get(name)), id=f"f-{name}", compact=True)
            yield Static("Empty fields use the preset, then the model's defaults. Ctrl+S applies · Esc cancels",
                         classes="hint")
            yield Static("", classes="error", markup=False)

    def on_mount(self) -> None:
        self._show_preset()

    def _saved_presets(self) -> dict[str, dict[str, Any]]:
        try:
            return self.store.list_presets()
        except AttributeError:
            return {}

    def _preset_options(self) -> list[tuple[str, str]]:
        """No preset, the built-ins, then the user's presets by name."""
        names = [*BUILTIN_PRESETS, *(n for n in sorted(self._saved_presets()) if not is_builtin(n))]
        current = self.conv.settings.get("preset")
        if current and current not in names:
            names.append(current)
        return [(NO_PRESET, NO_PRESET)] + [(plain(n), n) for n in names]

    def _chosen_preset(self) -> str | None:
        value = self.query_one("#preset", Select).value
        return None if value in (NO_PRESET, Select.BLANK) else str(value)

    def _show_preset(self) -> None:
        """Placeholders show what applies where a field is empty: the model's default under the chosen
        preset."""
        name = self._chosen_preset()
        values = (builtin_preset(name) or self._saved_presets().get(name) or {}) if name else {}
        under = self.defaults
        try:
            under = self.defaults.with_overrides(**values)
        except TypeError:  # a damaged saved preset: the session names it when the chat is used
            pass
        for field in FIELDS:
            self.query_one(f"#f-{field}", Input).placeholder = show_value(getattr(under, field)) or "none"

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "preset":
            self._show_preset()

    def on_switch_changed(self, event: Switch.Changed) -> None:
        area = self.query_one("#system", TextArea)
        area.read_only = event.value
        area.set_class(event.value, "-inherited")
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
        values = self._collect()
        if values is None:
            return

        def named(name: str | None) -> None:
            if not name:
                return
            try:
                self.store.save_preset(name, values)
            except ValueError as e:  # a built-in's name, or settings the store refuses
                self.query_one(".error", Static).update(plain(str(e)))
                return
            select = self.query_one("#preset", Select)
            select.set_options(self._preset_options())
            select.value = name
            self.notify(f"Saved preset “{name}”.")

        self.app.push_screen(TextPrompt("Preset name", hint="Saves the fields filled in above."), named)

    def _delete_preset(self) -> None:
        select = self.query_one("#preset", Select)
        name = self._chosen_preset()
        # The button stays enabled (a disabled one would change the Tab order with the preset): it says why not.
        if name is None or is_builtin(name):
            why = "Choose a saved preset to delete." if name is None else f"“{name}” is built in: it cannot be deleted."
            self.query_one(".error", Static).update(plain(why))
            return
        self.store.delete_preset(name)
        select.set_options(self._preset_options())
        select.value = NO_PRESET
        self.notify(f"Deleted preset “{name}”.")

    def action_save(self) -> None:
        settings = self._collect()
        if settings is None:
            return
        preset = self._chosen_preset()
        if preset is not None:
            settings["preset"] = preset
        use_default = self.query_one("#use-default", Switch).value
        system = None if use_default else self.query_one("#system", TextArea).text
        self.dismiss({"system_prompt": system, "settings": settings})

    def action_cancel(self) -> None:
        self.dismiss(None)
