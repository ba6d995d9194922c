"""The compare screen (F3 or the palette, from a chat): the chat's last question answered twice, side by side.

Each side is a model and NAME=VALUE words (sampling settings, compute controls, quantize/dtype): two models,
or one model with two settings. Engines come from the app's model pool; the plan line says whether the two
stream at once (two engines that fit the budget together) or one after the other (one engine, or two that do
not fit), and the pool line shows the budget and its use. Runs go on worker threads (chat/compare.run_side),
which post coalescing updates. Keeping a side puts its reply into the chat as a new sibling with its own run
card (both sides: two siblings); the screen then closes on the chat, the kept reply selected.
"""
from __future__ import annotations

import threading
import time

from textual import on
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Input, Select, Static

from ...chat import compare
from ...chat.compare import Result, Side, parse_side, plan, run_side
from ...chat.conversation import Conversation
from ...textsafe import plain
from ..keys import bindings
from ..widgets.compare_pane import ComparePane

LABELS = ("A", "B")
#: Seconds between a running side's updates (text and figures coalesce in between).
UPDATE_S = 0.05


class SideUpdate(Message):
    """Where one side stands, from its worker thread."""

    def __init__(self, label: str, status: str, text: str = "", figures: dict | None = None, error: bool = False,
                 finished: bool = False) -> None:
        super().__init__()
        self.label, self.status, self.text, self.figures = label, status, text, figures
        self.error, self.finished = error, finished

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, SideUpdate) and message.label == self.label and not message.finished


def default_words(controls: tuple) -> tuple[str, str]:
    """A first comparison worth running: Huginn-style depth 4 vs 32 where the model has it, else greedy vs
    the chat's own sampling."""
    names = {c.name for c in controls}
    if "num_steps" in names:
        return "num_steps=4", "num_steps=32"
    return "", "temperature=0"


class CompareScreen(Screen[list[str] | None]):
    DEFAULT_CSS = """
    CompareScreen { layout: vertical; }
    #compare-header {
        height: 1; padding: 0 1; background: $panel; color: $text; text-wrap: nowrap; text-overflow: ellipsis;
    }
    #compare-setup { height: 3; }
    #compare-setup > Select { width: 1fr; }
    #compare-setup > Input { width: 1fr; }
    #compare-plan { height: auto; padding: 0 1; color: $text; }
    #compare-plan.-error { color: $text-error; }
    #compare-pool { height: 1; padding: 0 1; color: $text-muted; }
    #compare-panes { height: 1fr; }
    """
    BINDINGS = bindings("compare")

    def __init__(self, conv: Conversation, models: list[str], model: str | None, words: tuple[str, str]) -> None:
        super().__init__()
        self.conv = conv
        self.question = compare.last_user_turn(conv)  # ValueError (said to the user) when there is none
        self.models = models
        self.model = model if model in models else (models[0] if models else None)
        self.words = words
        self.results: dict[str, Result] = {}
        self.pending: set[str] = set()  # the sides whose run has not finished
        self._note = ""  # how the last run went: side by side or one after the other, and why
        self._cancel = threading.Event()

    def compose(self) -> ComposeResult:
        asked = " ".join(self.question.content.split())
        yield Static(plain(f"Compare · two answers to: {asked}"),
                     id="compare-header")
        with Horizontal(id="compare-setup"):
            for label, words in zip(LABELS, self.words):
                yield Select([(m, m) for m in self.models], value=self.model or Select.BLANK, allow_blank=False,
                             id=f"model-{label}", prompt="model")
                yield Input(words, placeholder=f"{label}: NAME=VALUE …", id=f"words-{label}")
        yield Static("", id="compare-plan")
        yield Static("", id="compare-pool")
        with Horizontal(id="compare-panes"):
            for label in LABELS:
                yield ComparePane(label, id=f"pane-{label}")
        yield Footer()

    def on_mount(self) -> None:
        self._replan()
        self.query_one("#words-B", Input).focus()

    # Setup.
    def sides(self) -> tuple[Side, Side]:
        out = []
        for label in LABELS:
            model = self.query_one(f"#model-{label}", Select).value
            if not isinstance(model, str):
                raise ValueError(f"side {label}: choose a model")
            out.append(parse_side(label, model, self.query_one(f"#words-{label}", Input).value))
        return out[0], out[1]

    @on(Input.Changed)
    @on(Select.Changed)
    def _replan(self) -> None:
        if self.pending:
            return
        try:
            a, b = self.sides()
            note = plan(self.app.pool, a, b).note
            for pane, side in zip(self._panes(), (a, b)):
                pane.setup(side.describe())
            self._plan(f"{note} Ctrl+R runs both.")
        except ValueError as e:
            self._plan(str(e), error=True)
        self._pool_line()

    def _plan(self, text: str, error: bool = False) -> None:
        line = self.query_one("#compare-plan", Static)
        line.update(plain(text))
        line.set_class(error, "-error")

    def _pool_line(self) -> None:
        self.query_one("#compare-pool", Static).update(f"Model pool: {self.app.pool.usage().line()}")

    def _panes(self) -> list[ComparePane]:
        return [self.query_one(f"#pane-{label}", ComparePane) for label in LABELS]

    # Running.
    @on(Input.Submitted)
    def action_run(self) -> None:
        if self.pending:
            self.notify("Both sides are still running; Esc stops them.", severity="warning")
            return
        try:
            a, b = self.sides()
            how = plan(self.app.pool, a, b)
        except ValueError as e:
            self._plan(str(e), error=True)
            return
        self.results = {"A": Result(a, how.keys[0]), "B": Result(b, how.keys[1])}
        self._cancel = threading.Event()
        presets = self._presets()
        for pane, side in zip(self._panes(), (a, b)):
            pane.clear()
            pane.setup(side.describe())
        self._note = how.note
        self._plan(how.note)
        self.pending = set(LABELS)
        if how.parallel:
            for label in LABELS:
                self._panes()[LABELS.index(label)].status("starting")
                self._start([label], presets)
        else:
            self._panes()[0].status("starting")
            self._panes()[1].status("waiting: runs after A")
            self._start(list(LABELS), presets)

    def _presets(self) -> dict[str, dict | None]:
        """The chat's preset, read here on the UI thread (the store's connection stays on it)."""
        name = self.conv.settings.get("preset")
        return {name: self.app.store.get_preset(name)} if name else {}

    def _start(self, labels: list[str], presets: dict[str, dict | None]) -> None:
        self.run_worker(lambda: self._work(labels, presets), thread=True, group="compare", exit_on_error=False)

    def _work(self, labels: list[str], presets: dict[str, dict | None]) -> None:
        for label in labels:
            result = self.results[label]
            last = 0.0

            def progress(stage: str, label: str = label) -> None:
                self.post_message(SideUpdate(label, stage))

            for ev in run_side(self.app.pool, result, self.conv, self.question.id, cancel=self._cancel,
                               presets=presets.get, progress=progress):
                now = time.monotonic()
                if now - last >= UPDATE_S:
                    last = now
                    self.post_message(SideUpdate(label, "streaming", result.text, result.figures()))
            self.post_message(SideUpdate(label, _final(result), result.text, result.figures(),
                                         error=result.error is not None, finished=True))

    def on_side_update(self, event: SideUpdate) -> None:
        pane = self.query_one(f"#pane-{event.label}", ComparePane)
        pane.status(event.status, event.error)
        if event.text or event.figures:
            pane.reply(event.text, event.figures)
        self._pool_line()
        if event.finished and event.label in self.pending:
            self.pending.discard(event.label)
            if not self.pending:
                keepable = any(r.reply is not None and r.done is not None for r in self.results.values())
                hint = "a keeps A, b keeps B, k keeps both (as branches of the chat); Ctrl+R runs again." if keepable \
                    else "Nothing to keep; Ctrl+R runs again."
                self._plan(f"{self._note} Done: {hint}")
                self.set_focus(None)  # the letter keys act on the screen, not a field

    # Keeping and leaving.
    def action_keep(self, which: str) -> None:
        if self.pending:
            self.notify("Wait for both replies (or Esc stops them), then keep.", severity="warning")
            return
        if not self.results:
            self.notify("Run the comparison first: Ctrl+R.", severity="warning")
            return
        try:
            kept = compare.keep([self.results[label] for label in which], list(self.results.values()), self.conv,
                                self.app.store)
        except (ValueError, OSError) as e:
            self.notify(str(e), severity="error")
            return
        names = " and ".join(which)
        self.notify(f"Kept {names} in the chat as {'new branches' if len(kept) > 1 else 'a new branch'}, "
                    "each with its run card.")
        self.dismiss([m.id for m in kept])

    def action_close(self) -> None:
        if self.pending:
            self._cancel.set()
            self._plan("Stopping: each side keeps what it wrote so far.")
            return
        self.dismiss(None)


def _final(result: Result) -> str:
    if result.error:
        return result.error
    done = result.done
    if done is None:
        return "stopped"
    return {"eos": "done", "stop_string": "done (stop string)", "max_tokens": "done (token limit)",
            "cancelled": "stopped", "context_full": "done (context full)"}.get(done.stop_reason, done.stop_reason)
