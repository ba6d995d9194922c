"""The body of the generation worker: drain the session's event stream, post batched messages.

Kept free of widgets so the benchmark and the tests drive it directly. It runs in a thread; all it
does to the UI is `post` (thread-safe). Text is batched about every 30 ms; stats and memory
messages coalesce on the UI side, so the engine never waits for rendering.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from ..contract import Done, MemoryReport, StepEvent
from .messages import MemorySample, ReplyChunk, ReplyFinished, ReplyStats

BATCH_S = 0.03


def pump(events: Iterable[StepEvent | Done], *, conv_id: str, message_id: Callable[[], str | None],
         post: Callable[[Any], Any], is_cancelled: Callable[[], bool], cancel: Callable[[], None],
         memory: Callable[[], MemoryReport] | None = None, interval: float | None = None,
         clock: Callable[[], float] = time.monotonic) -> Done | None:
    """Stream one reply. Returns the engine's Done (None when the stream raised: an error was posted).

    Args:
        events: `Session.stream(...)`; it creates/updates the assistant message as tokens arrive.
        message_id: the id of the message being written (asked once the first event arrived).
        post: the thread-safe `post_message` of the receiving screen.
        is_cancelled: the worker's cancel flag; when it turns true the engine is told to stop and
            the stream drains to its final Done("cancelled"), so the partial reply is kept.
        cancel: stops the engine before its next token.
        memory: the engine's memory report, sampled with each batch.
        interval: seconds between batches (BATCH_S when None).
    """
    interval = BATCH_S if interval is None else interval
    start = last = clock()
    mid: str | None = None
    texts: list[str] = []
    steps: list[int | None] = []
    new_tokens, ttft, t_ns, stopping = 0, None, 0, False

    def flush() -> None:
        nonlocal texts, steps
        if mid is None:
            return
        if texts or steps:
            post(ReplyChunk(conv_id, mid, "".join(texts), steps, t_ns))
            texts, steps = [], []
        post(ReplyStats(mid, new_tokens, clock() - start, ttft))
        if memory is not None:
            post(MemorySample(memory()))

    try:
        for event in events:
            if mid is None:
                mid = message_id()
            if isinstance(event, Done):
                if event.text:
                    texts.append(event.text)
                flush()
                post(ReplyFinished(conv_id, mid, event))
                return event
            new_tokens += 1
            if ttft is None:
                ttft = clock() - start
            texts.append(event.text)
            steps.append(event.steps)
            t_ns = event.t_ns
            if not stopping and is_cancelled():
                stopping = True
                cancel()
            now = clock()
            if now - last >= interval:
                last = now
                flush()
    except Exception as e:  # the engine or session failed: show it on the message, keep what streamed
        flush()
        post(ReplyFinished(conv_id, mid, None, error=f"{type(e).__name__}: {e}"))
        return None
    flush()
    post(ReplyFinished(conv_id, mid, None, error="the stream ended without a final record"))
    return None
