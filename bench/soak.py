"""Soak: thousands of chat turns through `chat.Session` on a demo model, watching for leaks.

    python bench/soak.py [--model genesis-tiny] [--turns 2000] [--every 100] [--chat-turns 200] [--max-tokens 12]
                         [--out bench/soak.md]

Each turn is one of what a user does (sends, regenerates, edits an earlier message into a new branch,
stops a reply part way, continues a stopped reply, switches branch), drawn from a seeded mix, with the
chat saved in a real SQLite store as the TUI does; a new chat starts every --chat-turns turns. Every
--every turns it records the process RSS, its open file descriptors, the database size (file + WAL)
and the latency of the turns since the last sample, then writes the table and a verdict to --out:
RSS must level off (the growth over the second half is reported) and the descriptors must not grow.
Not part of the test suite: it runs for minutes.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the cat sat on a mat while rain fell over quiet hills and a kettle sang in the kitchen of an old "
         "house where clocks kept their own time").split()


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def db_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


class Soak:
    def __init__(self, session, store, rng: random.Random, chat_turns: int, max_tokens: int) -> None:
        self.session, self.store, self.rng, self.chat_turns = session, store, rng, chat_turns
        self.max_tokens = max_tokens
        self.conv = None
        self.turns_in_chat = 0
        self.counts: dict[str, int] = {}
        self.tokens = 0

    def text(self) -> str:
        return " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(3, 18)))

    def new_chat(self) -> None:
        from chatapp.chat.conversation import Conversation

        self.conv = Conversation(settings={"max_new_tokens": self.max_tokens, "temperature": 0.8})
        self.turns_in_chat = 0

    def run(self, gen, stop_after: int | None = None) -> None:
        """Consume one reply; with stop_after, press stop after that many tokens (as Esc does)."""
        n = 0
        for ev in gen:
            if hasattr(ev, "token_id"):
                n += 1
                if stop_after is not None and n == stop_after:
                    self.session.cancel()
        self.tokens += n

    def turn(self) -> str:
        if self.conv is None or self.turns_in_chat >= self.chat_turns:
            self.new_chat()
        self.turns_in_chat += 1
        conv, rng = self.conv, self.rng
        path = conv.path()
        replies = [m for m in path if m.role == "assistant"]
        users = [m for m in path if m.role == "user"]
        leaf = conv.get(conv.current_leaf) if conv.current_leaf else None
        r = rng.random()
        if r < 0.12 and replies:
            kind = "regenerate"
            self.run(self.session.regenerate(conv, replies[-1].id))
        elif r < 0.22 and users:
            kind = "edit"
            edited = conv.edit(rng.choice(users[-6:]).id, self.text())
            self.run(self.session.stream(conv, edited.id))
        elif r < 0.30 and leaf is not None and leaf.can_continue:
            kind = "continue"
            self.run(self.session.stream(conv, None, continue_from=leaf.id))
        elif r < 0.35 and len(path) > 2:
            kind = "switch+send"
            conv.switch_sibling(rng.choice(path).id, rng.choice((-1, 1)))
            user = conv.add(conv.current_leaf, "user", self.text())
            self.run(self.session.stream(conv, user.id))
        else:
            kind = "stop" if r > 0.90 else "send"
            user = conv.add(conv.current_leaf, "user", self.text())
            stop = rng.randint(1, max(self.max_tokens // 2, 1)) if kind == "stop" else None
            self.run(self.session.stream(conv, user.id), stop_after=stop)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return kind


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="genesis-tiny", help="a demo catalog id")
    ap.add_argument("--turns", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100, help="turns between samples")
    ap.add_argument("--chat-turns", type=int, default=200, help="turns before a new chat starts")
    ap.add_argument("--max-tokens", type=int, default=12, help="reply length cap (the demo decodes slowly)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", default=str(Path(__file__).with_name("soak.md")))
    ap.add_argument("--note", default="", help="a line added to the report (e.g. why fewer turns ran)")
    args = ap.parse_args(argv)

    home = Path(tempfile.mkdtemp(prefix="smollchat-soak-"))
    os.environ.setdefault("SMOLLCHAT_HOME", str(home))
    import torch

    from chatapp.catalog import get_entry
    from chatapp.chat.session import Session
    from chatapp.chat.store import Store
    from chatapp.engine.runtime import load_engine

    torch.set_num_threads(args.threads)
    entry = get_entry(args.model)
    if not entry.demo:
        ap.error(f"{args.model} is not a demo model; the soak runs on the random-weight demos only")
    engine = load_engine(entry, device="cpu")
    db = home / "soak.sqlite3"
    store = Store(db)
    session = Session(engine, store=store)
    soak = Soak(session, store, random.Random(args.seed), args.chat_turns, args.max_tokens)
    print(f"soak: {args.turns} turns on {args.model}, database {db}", file=sys.stderr)

    samples = []
    lat: list[float] = []
    fds0, rss0, t0 = open_fds(), rss_bytes(), time.perf_counter()
    for i in range(1, args.turns + 1):
        t = time.perf_counter()
        soak.turn()
        lat.append(time.perf_counter() - t)
        if i % args.every == 0 or i == args.turns:
            window = lat[-args.every:]
            samples.append({"turn": i, "rss": rss_bytes(), "fds": open_fds(), "db": db_bytes(db),
                            "cache": session.memory().prompt_cache,
                            "p50": statistics.median(window), "p95": sorted(window)[int(0.95 * (len(window) - 1))],
                            "max": max(window), "elapsed": time.perf_counter() - t0})
            s = samples[-1]
            print(f"{i:5d} turns  rss {s['rss'] / 2**20:7.1f} MiB  cache {s['cache'] / 2**20:6.1f} MiB  "
                  f"fds {s['fds']:3d}  db {s['db'] / 2**20:6.2f} MiB  "
                  f"p50 {s['p50'] * 1000:6.1f} ms  p95 {s['p95'] * 1000:6.1f} ms", file=sys.stderr, flush=True)
            if i < args.turns:  # a run stopped early still leaves its figures so far
                report(args, entry, samples, soak, fds0, rss0, quiet=True)
    store.close()
    report(args, entry, samples, soak, fds0, rss0)
    return 0


def report(args, entry, samples, soak, fds0, rss0, quiet: bool = False) -> None:
    half = samples[len(samples) // 2]
    quarter = samples[(3 * len(samples)) // 4]
    last = samples[-1]
    turns_half = max(last["turn"] - half["turn"], 1)
    growth = (last["rss"] - half["rss"]) / 2**20 / turns_half * 1000
    fd_growth = last["fds"] - samples[0]["fds"]
    lines = [
        "# Soak: chat Session on a demo model",
        "",
        f"`python bench/soak.py --model {args.model} --turns {args.turns} --every {args.every} "
        f"--chat-turns {args.chat_turns} --max-tokens {args.max_tokens} --seed {args.seed} --threads {args.threads}`",
        "",
        f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs visible, {args.threads} torch thread; the machine "
        "was shared with other jobs, so latencies are an upper bound)",
        f"- Python {platform.python_version()}, torch {__import__('torch').__version__}, SQLite "
        f"{__import__('sqlite3').sqlite_version}; model {entry.id} (random weights, {entry.params:,} parameters)",
        f"- Turns: {last['turn']} ({', '.join(f'{k} {v}' for k, v in sorted(soak.counts.items()))}); "
        f"{soak.tokens} tokens generated; a new chat every {args.chat_turns} turns; {last['elapsed']:.0f} s in all",
        f"- Before the first turn: RSS {rss0 / 2**20:.1f} MiB, {fds0} open descriptors",
    ]
    if args.note:
        lines.append(f"- Note: {args.note}")
    lines += ["", "| turn | RSS MiB | prompt cache MiB | RSS - cache MiB | open fds | DB MiB | turn p50 ms | p95 ms "
              "| max ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in samples:
        lines.append(f"| {s['turn']} | {s['rss'] / 2**20:.1f} | {s['cache'] / 2**20:.1f} | "
                     f"{(s['rss'] - s['cache']) / 2**20:.1f} | {s['fds']} | {s['db'] / 2**20:.2f} | "
                     f"{s['p50'] * 1000:.1f} | {s['p95'] * 1000:.1f} | {s['max'] * 1000:.1f} |")
    lines += ["", "## Verdict", "",
              f"- RSS over the second half (turn {half['turn']} to {last['turn']}): "
              f"{(last['rss'] - half['rss']) / 2**20:+.1f} MiB, {growth:+.2f} MiB per 1,000 turns; of it the engine's "
              f"prompt cache (snapshots kept within its byte budget): "
              f"{(last['cache'] - half['cache']) / 2**20:+.1f} MiB.",
              f"- RSS over the last quarter (turn {quarter['turn']} to {last['turn']}): "
              f"{(last['rss'] - quarter['rss']) / 2**20:+.1f} MiB (prompt cache "
              f"{(last['cache'] - quarter['cache']) / 2**20:+.1f} MiB).",
              f"- Open descriptors: {samples[0]['fds']} at the first sample, {last['fds']} at the last "
              f"({fd_growth:+d}).", ""]
    if quiet:
        lines.insert(2, f"**Stopped early or still running: {last['turn']} of {args.turns} turns.**\n")
    Path(args.out).write_text("\n".join(lines))
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
