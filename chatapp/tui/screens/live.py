"""The live reply's display: what the generation worker posts is gathered into frames painted at
most every FRAME_S, so the UI thread stays mostly idle while text streams.

Why pace: every paint that grows the reply re-lays out the whole screen, whose cost grows with the
number of Markdown blocks on it; painting per worker batch kept the UI thread busy all the time,
and a busy UI thread starves the generation thread of the GIL (the engine slowed to a tenth of its
rate in bench/tui_stream.py). Text still goes through MarkdownStream, which coalesces further.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

from ...engine.api import MemoryReport
from ..messages import MemorySample, ReplyChunk, ReplyStats
from ..widgets.compute import ComputePanel
from ..widgets.memory import MemoryPanel

#: Seconds between paints of the live reply: 20 per second at most...
FRAME_S = 0.05
#: ...and at least one per second. In between, the interval follows the UI thread's load.
MAX_FRAME_S = 1.0
#: The share of the time the UI thread may be busy while a reply streams. Painting a long reply
#: costs more (each paint re-lays out every block on screen), so paints then come less often,
#: and the generation thread keeps getting the GIL.
UI_BUSY_TARGET = 0.35
#: The interpreter's thread switch interval while a reply streams. With the default 5 ms a thread
#: waiting for the GIL (the engine, between torch calls) can wait 5 ms each time the UI thread holds
#: it; in bench/tui_stream.py 0.2 ms let the FakeEngine run at 2/3 of its rate with no UI, 5 ms at 1/10.
STREAMING_SWITCH_S = 0.0002


@dataclass
class Frame:
    """What arrived since the last paint."""

    message_id: str | None = None
    text: list[str] = field(default_factory=list)
    steps: list[int | None] = field(default_factory=list)
    stats: ReplyStats | None = None
    memory: MemoryReport | None = None
    t_ns: int = 0


class LiveReply:
    """Mixed into ChatScreen (which provides conv, view, streaming and query_one)."""

    def init_live(self) -> None:
        self._frame = Frame()
        self._frame_due = False
        self._frame_s = FRAME_S
        self._load_mark = (time.monotonic(), time.thread_time())
        self._switch_s = sys.getswitchinterval()
        self.last_shown_ns = 0
        """Engine time of the newest token on screen (the display-lag benchmark reads it)."""

    def generation_started(self) -> None:
        self._frame_s = FRAME_S
        self._load_mark = (time.monotonic(), time.thread_time())
        self._switch_s = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch_s, STREAMING_SWITCH_S))

    def generation_ended(self) -> None:
        sys.setswitchinterval(self._switch_s)

    def _queue_frame(self) -> None:
        if not self._frame_due:
            self._frame_due = True
            self.set_timer(self._frame_s, self.paint_frame)

    def _pace(self) -> None:
        """Adjust the paint interval to the UI thread's CPU use since the last paint."""
        wall, cpu = time.monotonic(), time.thread_time()
        busy = (cpu - self._load_mark[1]) / max(wall - self._load_mark[0], 1e-3)
        self._load_mark = (wall, cpu)
        grow = 1.5 if busy > UI_BUSY_TARGET else 0.8
        self._frame_s = min(MAX_FRAME_S, max(FRAME_S, self._frame_s * grow))

    def on_reply_chunk(self, event: ReplyChunk) -> None:
        if self.conv is None or event.conv_id != self.conv.id:
            return
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
        self._pace()
        frame, self._frame = self._frame, Frame()
        if frame.memory is not None:
            self.query_one(MemoryPanel).report = frame.memory
        if frame.message_id is None or self.conv is None or frame.message_id not in self.conv.messages:
            return
        view = self.view.view_for(frame.message_id)
        if view is None:
            view = await self.view.add_message(self.conv.get(frame.message_id), live=True)
        self.streaming = frame.message_id
        if frame.text:
            await view.write("".join(frame.text))
            self.last_shown_ns = frame.t_ns
        if any(s is not None for s in frame.steps):
            compute = self.query_one(ComputePanel)
            compute.steps = (*compute.steps, *frame.steps)
        if frame.stats is not None and frame.stats.message_id == frame.message_id:
            view.show_live(frame.stats.new_tokens, frame.stats.elapsed_s, frame.stats.ttft_s)
