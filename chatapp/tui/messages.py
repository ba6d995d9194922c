"""Messages that workers post to the UI thread.

Workers (generation, download, model load) never touch widgets; they post these. Text batches are
never merged away (`ReplyChunk`), while figures that only matter at their latest value coalesce in
the queue through `can_replace` (toolong's pattern), so a slow frame never builds a backlog.
"""
from __future__ import annotations

from typing import Any

from textual.message import Message

from ..contract import Done, MemoryReport


class ReplyChunk(Message):
    """A batch of streamed text (about 30 ms worth) for one assistant message."""

    def __init__(self, conv_id: str, message_id: str, text: str, steps: list[int | None], t_ns: int) -> None:
        super().__init__()
        self.conv_id = conv_id
        self.message_id = message_id
        self.text = text
        #: Recurrence steps of each token in the batch (None for models without them).
        self.steps = steps
        #: Engine time of the batch's last token, for measuring display lag.
        self.t_ns = t_ns


class ReplyStats(Message):
    """Live counters of the reply being generated."""

    def __init__(self, message_id: str, new_tokens: int, elapsed_s: float, ttft_s: float | None) -> None:
        super().__init__()
        self.message_id = message_id
        self.new_tokens = new_tokens
        self.elapsed_s = elapsed_s
        self.ttft_s = ttft_s

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ReplyStats) and message.message_id == self.message_id


class MemorySample(Message):
    """The engine's memory report at some point of the conversation."""

    def __init__(self, report: MemoryReport) -> None:
        super().__init__()
        self.report = report

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, MemorySample)


class ReplyFinished(Message):
    """Generation ended: `done` from the engine, or `error` when it raised."""

    def __init__(self, conv_id: str, message_id: str | None, done: Done | None, error: str | None = None) -> None:
        super().__init__()
        self.conv_id = conv_id
        self.message_id = message_id
        self.done = done
        self.error = error


class ModelLoading(Message):
    """A model load moved to a new stage ("loading weights" ...)."""

    def __init__(self, entry_id: str, stage: str) -> None:
        super().__init__()
        self.entry_id = entry_id
        self.stage = stage

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ModelLoading)


class ModelLoaded(Message):
    """A model is ready; `engine` fits EngineProtocol."""

    def __init__(self, engine: Any, entry: Any, key: str | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.entry = entry
        #: Its model pool key (pinned for the chat), None for an engine from elsewhere.
        self.key = key


class ModelLoadFailed(Message):
    def __init__(self, entry_id: str, error: str) -> None:
        super().__init__()
        self.entry_id = entry_id
        self.error = error


class DownloadProgressed(Message):
    """Bytes done/total, speed and ETA of a running download."""

    def __init__(self, entry_id: str, progress: Any) -> None:
        super().__init__()
        self.entry_id = entry_id
        self.progress = progress

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, DownloadProgressed) and message.entry_id == self.entry_id


class DownloadFinished(Message):
    """A download ended: finished (`path`), cancelled, or failed (`error`, one clear sentence)."""

    def __init__(self, entry_id: str, path: Any = None, error: str | None = None, cancelled: bool = False) -> None:
        super().__init__()
        self.entry_id = entry_id
        self.path = path
        self.error = error
        self.cancelled = cancelled
