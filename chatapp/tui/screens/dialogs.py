"""Small modal dialogs that return typed results: a one-line prompt, a yes/no question, and the
message editor (editing never overwrites: the caller adds the result as a new sibling)."""
from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static, TextArea

from ...textsafe import plain
from ..keys import bindings

DIALOG_CSS = """
{name} {{ align: center middle; background: $background 60%; }}
{name} > Vertical {{
    width: {width}; height: auto; max-height: 90%; padding: 1 2;
    border: round $primary; background: $surface;
}}
{name} .title {{ text-style: bold; margin: 0 0 1 0; }}
{name} .hint {{ color: $text-muted; margin: 1 0 0 0; }}
{name} .error {{ color: $error; height: auto; }}
{name} .buttons {{ height: auto; align-horizontal: right; margin: 1 0 0 0; }}
{name} Button {{ margin: 0 0 0 1; min-width: 10; }}
"""


class TextPrompt(ModalScreen[str | None]):
    """Ask for one line of text (a chat title, a file path, a preset name)."""

    DEFAULT_CSS = DIALOG_CSS.format(name="TextPrompt", width=64)
    BINDINGS = bindings("dialog")

    def __init__(self, title: str, value: str = "", placeholder: str = "", hint: str = "") -> None:
        super().__init__()
        self.title_text, self.value, self.placeholder, self.hint = title, value, placeholder, hint

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(plain(self.title_text), classes="title")
            yield Input(self.value, placeholder=self.placeholder, id="value")
            if self.hint:
                yield Static(plain(self.hint), classes="hint")
            yield Static("", classes="error", markup=False)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.action_save()

    def show_error(self, text: str) -> None:
        self.query_one(".error", Static).update(plain(text))

    def action_save(self) -> None:
        value = self.query_one(Input).value.strip()
        if value:
            self.dismiss(value)

    def action_cancel(self) -> None:
        self.dismiss(None)


class Confirm(ModalScreen[bool]):
    """A yes/no question; Enter on the focused button answers, Esc says no."""

    DEFAULT_CSS = DIALOG_CSS.format(name="Confirm", width=60)
    BINDINGS = bindings("dialog")

    def __init__(self, question: str, yes: str = "Delete", detail: str = "") -> None:
        super().__init__()
        self.question, self.yes, self.detail = question, yes, detail

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(plain(self.question), classes="title")
            if self.detail:
                yield Static(plain(self.detail), classes="hint")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", id="no")
                yield Button(self.yes, id="yes", variant="error")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_save(self) -> None:
        self.dismiss(True)

    def action_cancel(self) -> None:
        self.dismiss(False)


class EditMessage(ModalScreen[str | None]):
    """Edit a message's text; saving returns it (the caller makes a sibling branch)."""

    DEFAULT_CSS = DIALOG_CSS.format(name="EditMessage", width="90%") + """
    EditMessage TextArea { height: 16; }
    """
    BINDINGS = bindings("dialog")

    def __init__(self, role: str, content: str) -> None:
        super().__init__()
        self.role, self.content = role, content

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Edit {self.role} message: saving adds a new branch beside it", classes="title")
            yield TextArea(self.content, id="editor", soft_wrap=True)
            yield Static("Ctrl+S saves · Esc cancels", classes="hint")

    def on_mount(self) -> None:
        editor = self.query_one(TextArea)
        editor.focus()
        editor.move_cursor(editor.document.end)

    def action_save(self) -> None:
        text = self.query_one(TextArea).text
        self.dismiss(text if text.strip() and text != self.content else None)

    def action_cancel(self) -> None:
        self.dismiss(None)
