"""The live reply: the one generation worker and the display of what it streams.

`LiveReply.start` runs `Session.stream` in a thread (streaming.pump posts batched messages back to
this widget); what arrives is gathered into frames and painted into the message list as soon as the
`FramePacer` allows. It posts `Progress` (steps, memory) for the panels and `Finished` when the reply
ended; it never touches the tree or the store.

Why pace: a paint and the layout and drawing it causes take the UI thread's time, and with an engine in
this process a busy UI thread starves the generation thread of the GIL (the engine slowed to a tenth of
its rate in bench/tui_stream.py when every batch was painted). The pacer keeps painting's share of the
UI thread near a target (UI_BUSY_TARGET with the engine in this process, PROCESS_BUSY_TARGET with an
engine process): the next paint may start once the last one's cost (the UI thread's CPU time until the
screen was refreshed after it) divided by the target has passed. A cheap paint (what one paint renders is
bounded: widgets/streaming_body.py) so follows the text within MIN_FRAME_S, as it arrives, and a costly
one less often. It used to stretch the interval by 1.5x per busy frame up to a second and shrink it by
0.8x per idle one, after a fixed 50 ms wait per frame, counting all the UI thread's work: each later
paint then had more text to render, so it stayed busy and the display fell 0.3-2 s behind (bench/tui.md).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from textual import work
from textual.message import Message
from textual.widget import Widget
from textual.worker import Worker, get_current_worker

from ...contract import ControlChannel, Done, MemoryReport
from ..messages import MemorySample, ReplyChunk, ReplyFinished, ReplyStats
from ..streaming import pump
from .conversation import ConversationView

#: The shortest time between the starts of two paints of the live reply (30 a second at most: more would
#: cost the UI thread without showing text sooner to a reader).
MIN_FRAME_S = 1 / 30
#: The longest: however costly a paint, a streaming reply is painted at least this often.
MAX_FRAME_S = 0.5
#: The share of the UI thread's time painting may take while a reply streams from an engine in this
#: process (see FramePacer): the rest is the engine's, which needs the GIL...
UI_BUSY_TARGET = 0.35
#: ...and from an engine in its own process (chat/engine_host.py), which the UI cannot slow: then only
#: the threads that bring tokens to this process need time beside the painting. In bench/tui_stream.py
#: (20k tokens, process path) 0.5 gave the same or lower lag than 0.7 and a lower "to session" p95.
PROCESS_BUSY_TARGET = 0.5
#: The interpreter's thread switch interval while a reply streams from an engine in this process. With
#: the default 5 ms a thread waiting for the GIL (the engine, between torch calls) can wait 5 ms each
#: time the UI thread holds it; in bench/tui_stream.py 0.2 ms let the FakeEngine run at 2/3 of its rate
#: with no UI, 5 ms at 1/10. An engine in its own process (chat/engine_host.py) needs none of it.
STREAMING_SWITCH_S = 0.0002


class FramePacer:
    """When the next paint may start. A paint's cost is the UI thread's CPU time from its start until the
    screen was refreshed after it (the layout and drawing it caused); the next paint may start `cost / busy`
    after it, within [min_s, max_s], so painting keeps the thread about `busy` busy whatever the reply's
    length, and a cheap paint follows the text at once. `clock` and `cpu` are the wall clock and the UI
    thread's CPU clock (the tests pass fake ones)."""

    def __init__(self, busy: float = UI_BUSY_TARGET, min_s: float = MIN_FRAME_S, max_s: float = MAX_FRAME_S,
                 clock: Callable[[], float] = time.monotonic, cpu: Callable[[], float] = time.thread_time) -> None:
        self.min_s, self.max_s, self.busy = min_s, max_s, busy
        self._clock, self._cpu = clock, cpu
        self.interval = min_s
        self._start = (clock() - max_s, cpu())

    def delay(self) -> float:
        """Seconds from now until a paint may start (0: now)."""
        return max(0.0, self._start[0] + self.interval - self._clock())

    def painting(self) -> None:
        """A paint starts now."""
        self._start = (self._clock(), self._cpu())

    def painted(self) -> None:
        """The screen was refreshed after the paint: its cost sets the interval to the next one."""
        cost = self._cpu() - self._start[1]
        self.interval = min(self.max_s, max(self.min_s, cost / self.busy))


@dataclass
class Frame:
    """What arrived since the last paint."""

    message_id: str | None = None
    text: list[str] = field(default_factory=list)
    steps: list[int | None] = field(default_factory=list)
    stats: ReplyStats | None = None
    memory: MemoryReport | None = None
    t_ns: int = 0


class LiveReply(Widget):
    """Not drawn itself: it streams into the ConversationView it was given."""

    DEFAULT_CSS = "LiveReply { display: none; }"

    @dataclass
    class Progress(Message):
        """Per-token steps that arrived (to append) and the latest memory report, if any."""

        steps: tuple[int | None, ...]
        memory: MemoryReport | None

    @dataclass
    class Started(Message):
        """A reply began (the composer waits, the compute panel starts a new readout)."""

        conv_id: str

    @dataclass
    class Finished(Message):
        """The reply ended: `done` from the engine, or `error` (then `message_id` is None when no
        reply was started, e.g. the prompt does not fit: the prompt `parent_id` failed)."""

        conv_id: str
        parent_id: str | None
        message_id: str | None
        done: Done | None
        error: str | None

    def __init__(self, view: ConversationView, **kw: Any) -> None:
        super().__init__(**kw)
        self.view = view
        self.streaming: str | None = None
        """Id of the reply being generated (its message id once known, "" before), None when idle."""
        self.conv_id: str | None = None
        self._reply_parent: str | None = None
        self._worker: Worker | None = None
        self._select: bool | None = None
        self._reply_session: Any = None
        self._frame = Frame()
        self._frame_due = False
        self._pacer = FramePacer()
        self._switch_s = sys.getswitchinterval()
        self.last_shown_ns = 0
        """Engine time of the newest token on screen (the display-lag benchmark reads it)."""
        self.live_controls = False
        """The reply streaming now takes compute changes from its next token on (it has a ControlChannel)."""

    @property
    def busy(self) -> bool:
        return self.streaming is not None

    @staticmethod
    def channel_for(session: Any, conv: Any) -> ControlChannel | None:
        """A channel for compute changes while the reply streams (Session.change_controls), where the model
        has controls a running reply can take; none while a speculative draft is asked for (drafts run
        ahead of the token shown, so the engine drafts only for a call without a channel)."""
        if not any(spec.live for spec in session.controls):
            return None
        controls = session.controls_for(conv)
        return None if controls.get("draft_steps", 0) else ControlChannel()

    def start(self, session: Any, conv: Any, parent_id: str, continue_from: str | None = None,
              select: bool | None = None, events: Iterator[Any] | None = None,
              channel: ControlChannel | None = None) -> None:
        """Generate a reply under `parent_id` (or extend `continue_from`) in the generation worker;
        `select`: the new reply takes the selection (True), or the list decides (None). `events`: a
        session stream made already (Session.branch_at, which adds its reply at once) with its `channel`,
        run in its place."""
        if events is None:
            channel = self.channel_for(session, conv)
        self.live_controls = channel is not None
        self.streaming = continue_from or ""
        self._select = select
        self.conv_id, self._reply_parent, self._reply_session = conv.id, parent_id, session
        self._frame = Frame()
        self._pacer = FramePacer(PROCESS_BUSY_TARGET if session.info().get("engine_process") else UI_BUSY_TARGET)
        self._switch_s = sys.getswitchinterval()
        if not session.info().get("engine_process"):
            sys.setswitchinterval(min(self._switch_s, STREAMING_SWITCH_S))
        self._worker = self._generate(session, conv, parent_id, continue_from, events, channel)
        self.post_message(self.Started(conv.id))

    def stop(self) -> bool:
        """Stop the reply at once (the partial text stays, marked stopped); False when idle."""
        if self.streaming is None or self._worker is None:
            return False
        self._reply_session.cancel()
        self._worker.cancel()
        return True

    @work(thread=True, exclusive=True, group="generate")
    def _generate(self, session: Any, conv: Any, parent_id: str, continue_from: str | None,
                  events: Iterator[Any] | None, channel: ControlChannel | None) -> None:
        worker = get_current_worker()
        if events is None:
            events = session.stream(conv, parent_id, continue_from=continue_from, channel=channel)
        pump(events, conv_id=conv.id, message_id=lambda: continue_from or conv.current_leaf,
             post=self.post_message, is_cancelled=lambda: worker.is_cancelled, cancel=session.cancel,
             memory=session.memory)

    # What the worker posts.
    def _queue_frame(self) -> None:
        if not self._frame_due:
            self._frame_due = True
            delay = self._pacer.delay()
            if delay > 0:
                self.set_timer(delay, self.paint_frame)
            else:  # after the messages already queued (one batch posts text, figures and memory together)
                self.call_later(self.paint_frame)

    def on_reply_chunk(self, event: ReplyChunk) -> None:
        frame = self._frame
        frame.message_id = event.message_id
        frame.text.append(event.text)
        frame.steps.extend(event.steps)
        frame.t_ns = event.t_ns
        self._queue_frame()

    def on_reply_stats(self, event: ReplyStats) -> None:
        self._frame.stats = event
        self._frame.message_id = self._frame.message_id or event.message_id
        self._queue_frame()

    def on_memory_sample(self, event: MemorySample) -> None:
        self._frame.memory = event.report
        self._queue_frame()

    async def paint_frame(self) -> None:
        """Show everything gathered since the last paint (also called once when the reply ends)."""
        self._frame_due = False
        self._pacer.painting()
        self.call_after_refresh(self._pacer.painted)
        frame, self._frame = self._frame, Frame()
        steps = tuple(frame.steps) if any(s is not None for s in frame.steps) else ()
        if steps or frame.memory is not None:
            self.post_message(self.Progress(steps, frame.memory))
        conv = self.view.conv
        if frame.message_id is None or conv is None or conv.id != self.conv_id or frame.message_id not in conv.messages:
            return  # another chat is on screen: the reply streams on into its tree, unseen
        view = self.view.view_for(frame.message_id)
        if view is None:
            view = await self.view.add_message(conv.get(frame.message_id), live=True, select=self._select)
        self.streaming = frame.message_id
        if frame.text:
            await view.write("".join(frame.text))
            self.last_shown_ns = frame.t_ns
        if frame.stats is not None and frame.stats.message_id == frame.message_id:
            view.show_live(frame.stats.new_tokens, frame.stats.elapsed_s, frame.stats.ttft_s)

    async def on_reply_finished(self, event: ReplyFinished) -> None:
        await self.paint_frame()
        self.streaming, self._worker = None, None
        sys.setswitchinterval(self._switch_s)
        view = self.view.view_for(event.message_id) if event.message_id else None
        if view is not None:
            await view.finish()
        self.post_message(self.Finished(event.conv_id, self._reply_parent, event.message_id, event.done, event.error))
