"""How far the TUI's display lags behind generation, and how much the UI slows the engine: stream
20,000 tokens from the FakeEngine at 2,000 tok/s (really paced, not instant) through the app and
compare, every 10 ms, what the engine had produced with what the reply's view held (its frozen
blocks and its Markdown tail, MessageView.shown_chars).

    python bench/tui_stream.py [--tokens 20000] [--rate 2000] [--size 120x36] [--path all] [--json out.json]

Runs the real app (make_app, chat screen, generation worker, the reply's streaming view) under Textual's
headless driver: layout and rendering happen as in a terminal, only the bytes are not written.
Lag at a sample = now - the moment the engine had produced as much text as the widget shows (the
engine's own per-token time stamps; CLOCK_MONOTONIC is one clock for every process).

Paths (`--path`): "alone" iterates the engine with no app (its own rate, the reference); "thread" is
the engine in the app's process (`--no-engine-process`); "process" the engine in a child process
(chat/engine_host.py, the default for real models); "process-alone" the child with no app. The garbage of
one path (a finished 20k-token reply is a tree of over a million objects) is collected before the next one
starts: left to the collector, it stopped the next run's threads for 2-3 s at some point of its stream (the
"to session" p95 of 1.8-2.9 s that earlier process-path figures showed was that pause).
"""
from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatapp.chat.engine_host import Build, EngineHost  # noqa: E402
from chatapp.chat.fake import FakeDownloader, FakeEngine  # noqa: E402
from chatapp.chat.store import Store  # noqa: E402
from chatapp.contract import Done, SamplingSettings  # noqa: E402
from chatapp.tui.app import make_app  # noqa: E402

PATHS = ("alone", "thread", "process", "process-alone")


def reply_text(tokens: int) -> str:
    """Chat-like Markdown: paragraphs of 40 words, a list and a code block every few paragraphs."""
    words, out, n = [], [], 0
    while n < tokens:
        block = n // 40
        if block % 7 == 3:
            words = [f"- item{n + i}" for i in range(8)]
            out.append("\n".join(words))
            n += 16
        elif block % 7 == 5:
            out.append("```python\n" + "\n".join(f"x{n + i} = {i}" for i in range(6)) + "\n```")
            n += 20
        else:
            out.append(" ".join(f"word{n + i}" for i in range(40)))
            n += 40
    return "\n\n".join(out)


class Timed:
    """An engine seen through the contract that records (engine time stamp, characters so far) per token."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.timeline: list[tuple[int, int]] = []
        self.arrived: list[int] = []  # when each token reached the chat session (this process)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, ids, settings=None, controls=None, **kw):
        self.timeline, self.arrived = [], []
        chars = 0
        for event in self.engine.generate(ids, settings, controls, **kw):
            if not isinstance(event, Done):
                chars += len(event.text)
                self.timeline.append((event.t_ns, chars))
                self.arrived.append(time.monotonic_ns())
            yield event


def make_engine(path: str, tokens: int, rate: float):
    kw = dict(instant=False, tokens_per_s=rate, ttft_s=0.0, context_limit=tokens * 3)
    if path.startswith("process"):
        return EngineHost(Build(FakeEngine, ([reply_text(tokens)],), kw))
    return FakeEngine([reply_text(tokens)], **kw)


def rate_of(timeline: list[tuple[int, int]]) -> float:
    return (len(timeline) - 1) / ((timeline[-1][0] - timeline[0][0]) / 1e9)


def run_alone(engine, tokens: int) -> dict:
    """The engine iterated with nothing else running: the rate it reaches on its own."""
    timed = Timed(engine)
    ids = engine.tokenizer.encode("go")
    for _ in timed.generate(ids, SamplingSettings(max_new_tokens=tokens * 3)):
        pass
    return {"tokens": len(timed.timeline), "engine_rate_tok_s": round(rate_of(timed.timeline), 1)}


async def run_app(engine, tokens: int, size: tuple[int, int]) -> dict:
    home = tempfile.mkdtemp()
    os.environ["SMOLLCHAT_HOME"] = home
    timed = Timed(engine)
    app = make_app(engine=timed, store=Store(Path(home) / "chats.sqlite3"), downloader=FakeDownloader())
    samples: list[tuple[int, int]] = []
    async with app.run_test(size=size) as pilot:
        # Let start-up finish first (the chat screen shows the chat again once the model is in).
        while app.chat_screen is None or not app.chat_screen.is_mounted:
            await pilot.pause(0.05)
        for _ in range(5):
            await pilot.pause(0.2)
        screen = app.chat_screen
        screen.conv.settings["max_new_tokens"] = tokens * 3
        screen.composer.insert("go")

        def sample() -> None:
            view = screen.view.view_for(screen.streaming) if screen.streaming else None
            if view is not None:
                samples.append((time.monotonic_ns(), view.shown_chars))

        timer = app.set_interval(0.01, sample)
        screen.composer.action_send()
        started = time.monotonic()
        def done() -> bool:
            # Finished when the reply's whole text is on screen (after the final full render).
            if screen.streaming is not None or len(screen.conv.messages) < 2:
                return False
            reply = screen.conv.path()[-1]
            view = screen.view.view_for(reply.id)
            return reply.status != "streaming" and view is not None and view.body.source == reply.content

        while not done():
            await asyncio.sleep(0.005)
            if time.monotonic() - started > 600:
                raise TimeoutError("the stream did not finish in 10 minutes")
        end_ns = time.monotonic_ns()
        timer.stop()
        while screen.composer.busy:  # the screen takes the end: leaving before would tear the reply's view down
            await asyncio.sleep(0.05)
        reply = screen.conv.path()[-1]
        shown = screen.view.view_for(reply.id).body.source
    timeline = timed.timeline
    produced_ns = [t for t, _ in timeline]
    produced_chars = [c for _, c in timeline]
    lags = []
    for t, shown_chars in samples:
        # The first moment the engine had produced at least what is shown.
        i = bisect.bisect_left(produced_chars, shown_chars)
        i = min(i, len(produced_ns) - 1)
        lag_ms = max(0.0, (t - produced_ns[i]) / 1e6) if shown_chars else (t - produced_ns[0]) / 1e6
        behind = produced_chars[bisect.bisect_right(produced_ns, t) - 1] - shown_chars if t >= produced_ns[0] else 0
        lags.append((lag_ms, behind))
    gen_s = (produced_ns[-1] - produced_ns[0]) / 1e9
    lag_values = sorted(v for v, _ in lags)
    # Of the lag, what passed before a token reached the chat session (the engine process's batching and
    # the socket; 0 in-process): the rest is the generation worker's batching and the UI's painting.
    transport = sorted((a - t) / 1e6 for a, (t, _) in zip(timed.arrived, timeline))
    return {
        "tokens": len(timeline), "engine_rate_tok_s": round(rate_of(timeline), 1),
        "engine_seconds": round(gen_s, 2), "samples": len(samples),
        "lag_ms": {"median": round(statistics.median(lag_values), 1),
                   "p95": round(lag_values[int(0.95 * (len(lag_values) - 1))], 1),
                   "max": round(lag_values[-1], 1)},
        "max_chars_behind": max(b for _, b in lags),
        "to_session_ms": {"median": round(statistics.median(transport), 2),
                          "p95": round(transport[int(0.95 * (len(transport) - 1))], 2)},
        "all_shown_after_last_token_ms": round((end_ns - produced_ns[-1]) / 1e6, 1),
        "complete": shown == reply.content, "stop_reason": reply.run.get("stop_reason"),
        "terminal": f"{size[0]}x{size[1]} headless",
    }


def run(path: str, tokens: int, rate: float, size: tuple[int, int]) -> dict:
    engine = make_engine(path, tokens, rate)
    try:
        out = run_alone(engine, tokens) if path.endswith("alone") else asyncio.run(run_app(engine, tokens, size))
    finally:
        if hasattr(engine, "close"):
            engine.close()
    return {"path": path, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=20_000)
    p.add_argument("--rate", type=float, default=2_000.0)
    p.add_argument("--size", default="120x36")
    p.add_argument("--path", choices=(*PATHS, "all"), default="all")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    w, h = (int(v) for v in a.size.split("x"))
    results = []
    for path in PATHS if a.path == "all" else (a.path,):
        gc.collect()  # the last path's garbage, outside this path's measurement
        results.append(run(path, a.tokens, a.rate, (w, h)))
        print(json.dumps(results[-1]), flush=True)
    own = {r["path"]: r["engine_rate_tok_s"] for r in results}
    for r in results:
        ref = own.get("process-alone" if r["path"] == "process" else "alone")
        if ref and not r["path"].endswith("alone"):
            print(f"{r['path']}: {r['engine_rate_tok_s']} tok/s = {100 * r['engine_rate_tok_s'] / ref:.1f} % of the "
                  f"engine alone ({ref}); vs the in-process engine alone: "
                  f"{100 * r['engine_rate_tok_s'] / own.get('alone', ref):.1f} %; lag {r['lag_ms']}")
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
