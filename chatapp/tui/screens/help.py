"""The help screen: every binding by scope with its id and current keys (after keys.toml), and where
to remap them."""
from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from ... import locations
from ..keys import KEYS, SCOPES, bindings, keys_for

INTRO = (
    "smollchat: chat with small experimental language models.\n\n"
    "Enter sends, Shift+Enter (or Ctrl+J) starts a new line, Up/Down at the edge of the composer recall "
    "earlier prompts. Tab or Alt+Up moves into the message list, where the letter keys act on the selected "
    "message: edits and regenerations become branches beside the original, never overwriting it. Esc stops "
    "a reply and keeps what it wrote. Ctrl+P lists every command.\n"
)


def help_text(keymap: dict[str, str], keys_file: str) -> Text:
    text = Text(INTRO)
    for scope, title in SCOPES.items():
        text.append(f"\n{title}\n", style="bold")
        for k in KEYS:
            if k.scope == scope:
                text.append(f"  {keys_for(k.id, keymap):<22}", style="bold")
                text.append(f"{k.description:<30}")
                text.append(f"{k.id}\n", style="dim")
    text.append(f"\nRemap any key by id in {keys_file}, e.g.\n", style="italic")
    text.append('  [keys]\n  "composer.send" = "ctrl+j"\n  "chat.stop" = "escape,ctrl+c"\n')
    return text


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; background: $background 60%; }
    HelpScreen > VerticalScroll {
        width: 100; max-width: 95%; height: 90%;
        border: round $primary; background: $surface; padding: 0 2;
    }
    """
    BINDINGS = bindings("help")

    def compose(self) -> ComposeResult:
        keymap = getattr(self.app, "keymap", {})
        with VerticalScroll() as scroll:
            scroll.border_title = "Help"
            yield Static(help_text(keymap, str(locations.keys_path())))

    def action_close(self) -> None:
        self.dismiss(None)
