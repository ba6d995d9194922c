"""Every key binding of the TUI in one table, each with a stable id, plus `keys.toml` loading.

Widgets build their `BINDINGS` from this table (`bindings("messages")`), the help screen and the
command palette list it, and a user remaps any binding by id in `<config dir>/keys.toml`:

    [keys]
    "chat.stop" = "escape,ctrl+c"
    "composer.send" = "ctrl+j"
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from textual.binding import Binding

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass(frozen=True)
class KeySpec:
    """One binding: where it lives, what it does, which keys start it."""

    #: Stable id, the name used in keys.toml ("<scope>.<name>").
    id: str
    #: Comma-separated default keys.
    keys: str
    #: The Textual action run on the widget or screen of the scope.
    action: str
    #: Short text for the footer, help screen and palette.
    description: str
    #: Shown in the footer.
    show: bool = True
    #: Checked before the focused widget sees the key (the composer's Enter, Esc while streaming).
    priority: bool = False

    @property
    def scope(self) -> str:
        return self.id.split(".", 1)[0]


KEYS: tuple[KeySpec, ...] = (
    KeySpec("app.help", "f1", "help", "Help"),
    KeySpec("app.models", "ctrl+o", "models", "Models"),
    KeySpec("app.palette", "ctrl+p", "command_palette", "Commands", show=False),
    KeySpec("app.theme", "f9", "change_theme", "Theme", show=False),
    KeySpec("app.quit", "ctrl+q", "quit", "Quit", show=False),
    KeySpec("app.compare", "f3", "compare", "Compare two answers", show=False),
    KeySpec("chat.stop", "escape", "stop", "Stop", priority=True),
    KeySpec("chat.new", "ctrl+n", "new_chat", "New chat"),
    KeySpec("chat.search", "ctrl+f", "search_chats", "Search chats", show=False),
    KeySpec("chat.rename", "f2", "rename_chat", "Rename chat", show=False),
    KeySpec("chat.delete", "f8", "delete_chat", "Delete chat", show=False),
    KeySpec("chat.settings", "ctrl+s", "chat_settings", "Settings"),
    KeySpec("chat.regenerate", "ctrl+r", "regenerate", "Regenerate", show=False),
    KeySpec("chat.prev_sibling", "alt+left", "sibling(-1)", "Previous branch", show=False),
    KeySpec("chat.next_sibling", "alt+right", "sibling(1)", "Next branch", show=False),
    KeySpec("chat.messages", "alt+up", "focus_messages", "Messages", show=False),
    KeySpec("chat.export", "f4", "export_chat", "Export", show=False),
    KeySpec("chat.import", "f5", "import_chat", "Import", show=False),
    KeySpec("chat.toggle_chats", "ctrl+b", "toggle_chats", "Chat list", show=False),
    KeySpec("chat.toggle_panels", "ctrl+t", "toggle_panels", "Panels", show=False),
    KeySpec("composer.send", "enter", "send", "Send"),
    KeySpec("composer.newline", "shift+enter,ctrl+j", "newline", "Newline"),
    KeySpec("composer.history_prev", "up", "history(-1)", "Previous prompt", show=False),
    KeySpec("composer.history_next", "down", "history(1)", "Next prompt", show=False),
    KeySpec("messages.up", "up,k", "move(-1)", "Previous message", show=False),
    KeySpec("messages.down", "down,j", "move(1)", "Next message", show=False),
    KeySpec("messages.edit", "e", "edit", "Edit"),
    KeySpec("messages.regenerate", "r", "regenerate", "Regenerate"),
    KeySpec("messages.continue", "c", "continue", "Continue"),
    KeySpec("messages.delete", "d,delete", "delete", "Delete"),
    KeySpec("messages.prev_sibling", "left,h", "sibling(-1)", "◀ branch"),
    KeySpec("messages.next_sibling", "right,l", "sibling(1)", "branch ▶"),
    KeySpec("messages.fork", "f", "fork", "Fork"),
    KeySpec("messages.copy", "y", "copy", "Copy"),
    KeySpec("messages.composer", "i", "leave", "Composer", show=False),
    KeySpec("messages.inspect", "t", "inspect", "Inspect tokens"),
    KeySpec("inspector.prev", "left,h", "move(-1)", "◀ token", show=False),
    KeySpec("inspector.next", "right,l", "move(1)", "token ▶", show=False),
    KeySpec("inspector.next_low", "n", "low(1)", "Next unsure"),
    KeySpec("inspector.prev_low", "p", "low(-1)", "Previous unsure", show=False),
    KeySpec("inspector.alt_up", "up,k", "pick(-1)", "Previous alternative", show=False),
    KeySpec("inspector.alt_down", "down,j", "pick(1)", "Next alternative", show=False),
    KeySpec("inspector.branch", "enter,b", "branch", "Branch here"),
    KeySpec("inspector.type", "e", "type", "Type instead"),
    KeySpec("inspector.rerun", "g", "rerun", "Redraw with compute"),
    KeySpec("inspector.mode", "c", "mode", "Colour by"),
    KeySpec("inspector.distribution", "d", "distribution", "Raw or after settings", show=False),
    KeySpec("inspector.close", "t", "close", "Close inspector"),
    KeySpec("chats.delete", "delete", "delete_chat", "Delete chat", show=False),
    KeySpec("models.load", "enter", "load", "Load", priority=True),
    KeySpec("models.quantize", "q", "quantize", "Quantization"),
    KeySpec("models.download", "d", "download", "Download"),
    KeySpec("models.cancel", "x", "cancel_download", "Cancel download"),
    KeySpec("models.delete", "delete", "delete_model", "Delete files"),
    KeySpec("models.close", "escape", "close", "Back"),
    KeySpec("help.close", "escape,f1,q", "close", "Close"),
    KeySpec("compare.run", "ctrl+r", "run", "Run both", priority=True),
    KeySpec("compare.keep_a", "a", "keep('A')", "Keep A"),
    KeySpec("compare.keep_b", "b", "keep('B')", "Keep B"),
    KeySpec("compare.keep_both", "k", "keep('AB')", "Keep both"),
    KeySpec("compare.close", "escape", "close", "Stop / Back", priority=True),
    KeySpec("dialog.save", "ctrl+s", "save", "Save"),
    KeySpec("dialog.cancel", "escape", "cancel", "Cancel"),
)

SCOPES = {
    "app": "Everywhere",
    "chat": "Chat screen",
    "composer": "Composer (the prompt box)",
    "messages": "Message list (alt+up or Tab from the composer)",
    "chats": "Chat list",
    "inspector": "Token inspector (t on a reply; Esc closes it too)",
    "models": "Models screen",
    "help": "Help screen",
    "compare": "Compare screen (F3: the last question answered twice, side by side)",
    "dialog": "Dialogs (rename, edit, settings, export)",
}


def bindings(scope: str) -> list[Binding]:
    """The Textual bindings of one scope, each carrying its id so a keymap can remap it."""
    return [Binding(k.keys, k.action, k.description, show=k.show, priority=k.priority, id=k.id)
            for k in KEYS if k.scope == scope]


def spec(binding_id: str) -> KeySpec:
    for k in KEYS:
        if k.id == binding_id:
            return k
    raise KeyError(binding_id)


class KeymapError(ValueError):
    """A keys.toml that cannot be used; the message says which line to fix."""


def load_keymap(path: Path) -> dict[str, str]:
    """Read `[keys]` from keys.toml: binding id -> comma-separated keys. A missing file is an empty map.

    Unknown ids are refused (a typo would otherwise silently do nothing).
    """
    if not path.is_file():
        return {}
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise KeymapError(f"{path}: {e}") from None
    table = raw.get("keys", {})
    if not isinstance(table, dict):
        raise KeymapError(f"{path}: [keys] must be a table of binding id = \"keys\"")
    known = {k.id for k in KEYS}
    out: dict[str, str] = {}
    for binding_id, keys in table.items():
        if binding_id not in known:
            raise KeymapError(f"{path}: unknown binding id {binding_id!r} (the help screen, F1, lists them)")
        if not isinstance(keys, str) or not keys.strip():
            raise KeymapError(f"{path}: {binding_id} needs a string of keys such as \"ctrl+k\"")
        out[binding_id] = ",".join(part.strip() for part in keys.split(","))
    return out


def keys_for(binding_id: str, keymap: dict[str, str]) -> str:
    """The keys a binding answers to under a keymap, for display."""
    return keymap.get(binding_id, spec(binding_id).keys)
