"""The token inspector: a reply's text token by token, coloured by how sure the model was (or by the
entropy, or the recurrence steps), with a token cursor, and the panel that shows the token under it.

`TokenInspector` replaces a reply's Markdown body while it is open (MessageView.open_inspector) and
takes the focus: ← → move the cursor over the groups of tui/tokens.py (a character split over byte
tokens is one cell), n / p jump to the next / previous low-confidence token, c changes the measure,
↑ ↓ pick an alternative, Enter branches with it, e types a replacement, g draws the token anew under
the compute panel's settings. It posts `Requested` for those to its target (InspectorActions);
`InspectorPanel` (under the message list) shows the legend, the token's figures and its alternatives.
Colours are theme variables (tok-0 .. tok-4), so each theme sets inks that meet WCAG AA on its
background; the two least sure levels are underlined as well, for readers who do not tell colours apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.style import Style
from rich.text import Text
from textual.geometry import Region
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Static

from .. import tokens as tk
from ..keys import bindings

LEVEL_CLASSES = tuple(f"inspector--l{k}" for k in range(tk.LEVELS))


def level_css(name: str) -> str:
    """The level inks of widget `name` (theme variables tok-0 .. tok-4; the least sure also underlined)."""
    rules = [f"{name} > .inspector--l{k} {{ color: $tok-{k};{' text-style: underline;' if k >= tk.LOW else ''} }}"
             for k in range(tk.LEVELS)]
    return "\n".join([*rules, f"{name} > .inspector--none {{ color: $text-muted; }}"])


class TokenInspector(Widget, can_focus=True):
    """One reply's tokens, coloured, with a cursor; reports to the panel it was given."""

    COMPONENT_CLASSES = {*LEVEL_CLASSES, "inspector--none"}
    DEFAULT_CSS = """
    TokenInspector { height: auto; margin: 0 0 1 0; }
    TokenInspector:focus { background-tint: $foreground 4%; }
    """ + level_css("TokenInspector")
    BINDINGS = bindings("inspector")

    @dataclass
    class Requested(Message):
        """A branch at token `index` of `message_id`: `action` "alternative" (with `token_id`), "type" or
        "rerun" (the token drawn anew under the chat's controls now)."""

        message_id: str
        action: str
        index: int
        token_id: int | None = None

    def __init__(self, message_id: str, record: dict[str, Any], tokenizer: Any, panel: "InspectorPanel",
                 target: Widget, mode: str = "prob", changes: dict[int, dict[str, Any]] | None = None) -> None:
        super().__init__(id="token-inspector")
        self.message_id = message_id
        self.record = record
        self.tokenizer = tokenizer
        self.panel = panel
        self.target = target
        """Where `Requested` goes (the screen's InspectorActions, not a parent of this widget)."""
        self.changes = dict(changes or {})
        """Token index -> the controls changed while the reply streamed, from that token on (run card)."""
        self.groups = tk.groups(record, tokenizer)
        self.most = tk.max_steps(record)
        self.mode = mode if tk.available(record, mode) else "prob"
        self.cursor = 0
        self.choice = 0

    # Drawing.
    def render(self) -> Text:
        text = Text()
        for i, g in enumerate(self.groups):
            level = tk.group_level(self.record, g, self.mode, self.most)
            style = self.get_component_rich_style(LEVEL_CLASSES[level] if level is not None else "inspector--none")
            if i == self.cursor:
                style += Style(reverse=True, bold=True)
            if self.mode == "steps" and self.changed_at(g):
                text.append("│", self.get_component_rich_style("inspector--none"))  # the depth changed here
            text.append(tk.body_text(g), style)
        return text

    def on_mount(self) -> None:
        self._moved()

    def on_focus(self) -> None:
        self.panel.show(self)  # back from a dialog: the same token and pick

    def on_unmount(self) -> None:
        if self.panel.owner is self:
            self.panel.close()

    def on_resize(self) -> None:
        self.call_after_refresh(self._scroll_to_cursor)

    def changed_at(self, g: tk.Group) -> dict[str, Any]:
        """The control changes that began at one of the group's tokens."""
        return {k: v for i in range(g.start, g.end) for k, v in self.changes.get(i, {}).items()}

    @property
    def group(self) -> tk.Group:
        return self.groups[self.cursor]

    def alternatives(self) -> list[tuple[int, float]]:
        alts = self.record["alternatives"][self.group.start]
        return [(int(i), float(lp)) for i, lp in alts or ()]

    def _moved(self, scroll: bool = True) -> None:
        alts = self.alternatives()
        chosen = self.record["ids"][self.group.start]
        # Start on the best alternative the model did not take: branching with its own pick changes nothing.
        self.choice = next((k for k, (i, _) in enumerate(alts) if i != chosen), 0)
        self._show(scroll)

    def _show(self, scroll: bool = True) -> None:
        self.refresh()
        self.panel.show(self)
        if scroll:
            self.call_after_refresh(self._scroll_to_cursor)

    def _scroll_to_cursor(self) -> None:
        """Keep the cursor's line in sight in the scrolling message list."""
        view = next((a for a in self.ancestors if getattr(a, "is_scrollable", False) and a.allow_vertical_scroll), None)
        width = self.content_size.width
        if view is None or width <= 0 or not self.groups:
            return
        upto = Text("".join(tk.body_text(g) for g in self.groups[:self.cursor + 1]))
        row = max(0, len(upto.wrap(self.app.console, width)) - 1)
        y = self.region.y - view.region.y + int(view.scroll_offset.y) + row
        view.scroll_to_region(Region(0, y, 1, 1), animate=False, spacing=None, immediate=True)

    # Keys.
    def action_move(self, delta: int) -> None:
        self.cursor = max(0, min(len(self.groups) - 1, self.cursor + delta))
        self._moved()

    def action_low(self, step: int) -> None:
        found = tk.find_low(self.record, self.groups, self.cursor, self.mode, step)
        if found is None:
            self.notify(f"No {'further' if step > 0 else 'earlier'} low-confidence token "
                        f"({tk.MODE_LABELS[self.mode]}).", severity="information", timeout=2)
            return
        self.cursor = found
        self._moved()

    def action_mode(self) -> None:
        modes = [m for m in tk.MODES if tk.available(self.record, m)]
        self.mode = modes[(modes.index(self.mode) + 1) % len(modes)] if self.mode in modes else modes[0]
        if len(modes) == 1:
            self.notify("This reply records no other measure (steps are Huginn's).", timeout=2)
        self._show(scroll=False)

    def action_pick(self, delta: int) -> None:
        n = len(self.alternatives())
        if n:
            self.choice = (self.choice + delta) % n
            self.panel.show(self)

    def action_branch(self) -> None:
        alts = self.alternatives()
        if not alts:
            self.notify("No alternatives were recorded for this token: e types a replacement.", severity="warning")
            return
        self._request("alternative", alts[self.choice][0])

    def action_type(self) -> None:
        self._request("type")

    def action_rerun(self) -> None:
        self._request("rerun")

    def _request(self, action: str, token_id: int | None = None) -> None:
        self.target.post_message(self.Requested(self.message_id, action, self.group.start, token_id))

    def action_close(self) -> None:
        self._request("close")

    def action_distribution(self) -> None:
        self._request("distribution")


class InspectorPanel(Static):
    """Under the message list while an inspector is open: legend, the token at the cursor, alternatives."""

    COMPONENT_CLASSES = {*LEVEL_CLASSES, "inspector--none"}
    DEFAULT_CSS = """
    InspectorPanel { height: auto; max-height: 9; padding: 0 1; display: none; border-top: hkey $primary; }
    InspectorPanel.-open { display: block; }
    """ + level_css("InspectorPanel")

    def __init__(self, **kw: Any) -> None:
        super().__init__("", **kw)
        self.owner: TokenInspector | None = None

    def close(self) -> None:
        self.owner = None
        self.remove_class("-open")

    def show(self, ins: TokenInspector) -> None:
        self.owner = ins
        self.add_class("-open")
        self.update(self.describe(ins))

    def _level(self, k: int | None) -> Style:
        return self.get_component_rich_style(LEVEL_CLASSES[k] if k is not None else "inspector--none")

    def describe(self, ins: TokenInspector) -> Text:
        record, g = ins.record, ins.group
        title, labels = tk.legend(ins.mode, ins.most, record["distribution"])
        out = Text(f"{title}: ")
        for k, label in enumerate(labels):
            out.append(f"■{label}", self._level(k))
            out.append(" ")
        out.append("\n")
        i = g.start
        lp, h, steps = record["logprob"][i], record["entropy"][i], record["steps"][i]
        level = tk.group_level(record, g, ins.mode, ins.most)
        out.append(f"token {i + 1}/{len(record['ids'])} ", "bold")
        out.append(tk.visible(g.text) if g.kind == "text" else g.text, self._level(level) + Style(reverse=True))
        figures = [f"p {tk.percent(lp)}"]
        if h is not None:
            figures.append(f"H {h:.2f} nats")
        if steps is not None:
            figures.append(f"{steps} steps")
        changed = ins.changed_at(g)
        if changed:
            figures.append("from here " + ", ".join(f"{k} {v}" for k, v in changed.items()))
        out.append("  " + " · ".join(figures))
        if g.size > 1:
            parts = ", ".join(f"{tk.piece(ins.tokenizer, record['ids'][j])} {tk.percent(record['logprob'][j])}"
                              for j in range(g.start, g.end))
            out.append(f"\n{g.size} tokens make this character: {parts}", "italic")
        alts = ins.alternatives()
        chosen = record["ids"][i]
        if not alts:
            out.append("\nno alternatives recorded · e types a replacement · g draws it anew")
        for k, (token_id, alp) in enumerate(alts):
            mark = "▸ " if k == ins.choice else "  "
            out.append(f"\n{mark}{tk.percent(alp):>6}  ", "bold" if k == ins.choice else "")
            out.append(tk.piece(ins.tokenizer, token_id), "reverse" if k == ins.choice else "")
            if token_id == chosen:
                out.append("  (chosen)")
        return out
