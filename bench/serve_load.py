"""Load on `smollchat serve` over the loopback: concurrent streaming clients, some hanging up midway.

    python bench/serve_load.py [--model axiom-tiny] [--clients 8] [--requests 20] [--disconnect 0.25]

starts `smollchat serve --model MODEL` on a free 127.0.0.1 port, asks each of a few prompts once alone
(greedy: the expected answers), then runs the load: every client streams its requests one after
another, and with probability --disconnect hangs up after a random number of chunks. Every answer
must be its prompt's expected answer (a hung-up one a prefix of it) with one response id throughout:
nothing mixed into another. Prints requests/s, tokens/s, p50/p99 time to first token and the server's
RSS over the run. tests/server/test_load.py runs `run_load` on a smaller scale.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

PROMPTS = ["Name a colour.", "Count to three.", "What is rain?", "Say hello.", "Pick a number.", "Describe a cat.",
           "Why is the sky blue?", "Spell 'tree'."]


@dataclass
class Outcome:
    prompt: str
    text: str = ""
    ids: set[str] = field(default_factory=set)
    ttft_s: float | None = None
    tokens: int = 0
    hung_up: bool = False
    finish: str | None = None
    error: str | None = None


def stream(url: str, model: str, prompt: str, max_tokens: int, hang_up_after: int | None = None) -> Outcome:
    """One streaming chat request; hang up after `hang_up_after` content chunks if given."""
    out = Outcome(prompt)
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            out.error = f"HTTP {r.status}: {r.read()[:200]!r}"
            return out
        chunks = 0
        while line := r.fp.readline():
            if not line.startswith(b"data: "):
                continue
            if line.strip() == b"data: [DONE]":
                break
            ev = json.loads(line[6:])
            if "error" in ev:
                out.error = ev["error"]["message"]
                break
            out.ids.add(ev["id"])
            if ev.get("usage"):
                out.tokens = ev["usage"]["completion_tokens"]
            for choice in ev["choices"]:
                text = choice["delta"].get("content") or ""
                if text:
                    if out.ttft_s is None:
                        out.ttft_s = time.perf_counter() - t0
                    out.text += text
                    chunks += 1
                out.finish = choice.get("finish_reason") or out.finish
            if hang_up_after is not None and chunks >= hang_up_after:
                out.hung_up = True
                conn.sock.shutdown(socket.SHUT_RDWR)
                break
    except OSError as e:
        out.error = f"{type(e).__name__}: {e}"
    finally:
        conn.close()
    return out


def expected_answers(url: str, model: str, max_tokens: int, prompts: list[str] = PROMPTS) -> dict[str, str]:
    return {p: stream(url, model, p, max_tokens).text for p in prompts}


def run_load(url: str, model: str = "axiom-tiny", clients: int = 8, requests: int = 5, disconnect: float = 0.25,
             max_tokens: int = 16, seed: int = 0, prompts: list[str] = PROMPTS) -> list[Outcome]:
    """`clients` threads, each streaming `requests` requests in a row; outcomes in completion order."""
    rng = random.Random(seed)
    plans = [[(rng.choice(prompts), rng.randint(1, max(1, max_tokens // 2)) if rng.random() < disconnect else None)
              for _ in range(requests)] for _ in range(clients)]
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def client(plan):
        for prompt, hang in plan:
            o = stream(url, model, prompt, max_tokens, hang)
            with lock:
                outcomes.append(o)

    threads = [threading.Thread(target=client, args=(p,)) for p in plans]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def problems(outcomes: list[Outcome], expected: dict[str, str]) -> list[str]:
    """Everything wrong with a run: errors, mixed ids, answers that are not their prompt's."""
    bad = []
    for o in outcomes:
        want = expected[o.prompt]
        if o.error:
            bad.append(f"{o.prompt!r}: {o.error}")
        elif len(o.ids) != 1:
            bad.append(f"{o.prompt!r}: chunks of {len(o.ids)} responses")
        elif o.hung_up and not want.startswith(o.text):
            bad.append(f"{o.prompt!r}: hung-up answer {o.text!r} is not a prefix of {want!r}")
        elif not o.hung_up and (o.text != want or o.finish is None):
            bad.append(f"{o.prompt!r}: answer {o.text!r} != {want!r} (finish {o.finish})")
    return bad


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="axiom-tiny")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--disconnect", type=float, default=0.25)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "chatapp", "serve", "--model", args.model, "--port", str(port)],
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                time.sleep(0.2)
        expected = expected_answers(url, args.model, args.max_tokens)
        rss: list[int] = [_rss_kib(server.pid)]
        done = threading.Event()

        def sample():
            while not done.wait(0.1):
                rss.append(_rss_kib(server.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        outcomes = run_load(url, args.model, args.clients, args.requests, args.disconnect, args.max_tokens)
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    finally:
        server.terminate()
        server.wait(30)
    bad = problems(outcomes, expected)
    ttft = sorted(o.ttft_s for o in outcomes if o.ttft_s is not None)
    finished = [o for o in outcomes if not o.hung_up]
    tokens = sum(o.tokens for o in finished)  # (a hung-up request gets no usage record)
    print(json.dumps({
        "model": args.model, "clients": args.clients, "requests": len(outcomes), "hung_up": len(outcomes) - len(finished),
        "problems": bad, "wall_s": round(wall, 2), "requests_per_s": round(len(outcomes) / wall, 2),
        "completion_tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
        "ttft_p99_ms": round(1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 1),
        "rss_mib": {"start": round(rss[0] / 1024, 1), "max": round(max(rss) / 1024, 1), "end": round(rss[-1] / 1024, 1)},
        "cpu": _cpu_model(), "cpus": os.cpu_count(), "torch_threads": os.environ.get("OMP_NUM_THREADS", "default"),
    }, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
