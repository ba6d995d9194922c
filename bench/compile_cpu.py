"""Eager vs compiled decode step (engine/graphs.py) side by side in one process, CPU.

The model is built in memory with random N(0, 0.02) matrices and unit norms: Axiom at its real shape
(bench/axiom_cpu.py's CONFIG) or a demo entry's [demo_config]. A 128-token random prompt goes through the
eager prefill once; each repeat restores that state and times `--steps` greedy decode steps, eager then
compiled then compiled with freezing, so a neighbour's load hits every path alike. Medians of the repeats.

    python bench/compile_cpu.py --model axiom --dtype float32 [--threads 2] [--profile]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from axiom_cpu import CONFIG as AXIOM  # noqa: E402
from chatapp.catalog import get_entry  # noqa: E402
from chatapp.engine import graphs  # noqa: E402
from chatapp.engine.decisions import cpu_model  # noqa: E402
from chatapp.engine.loader import build_model, prepare_for_inference  # noqa: E402


def random_model(config: dict, dtype: torch.dtype):
    model = build_model(config, device="cpu").to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.empty(p.shape).normal_(0.0, 0.02, generator=g))
            else:
                p.fill_(1.0)
    return prepare_for_inference(model, torch.device("cpu"), dtype)


def decode(step, model, state, snap, tok: torch.Tensor, n: int) -> float:
    """Seconds for n greedy steps from the snapshot."""
    state.restore(snap)
    t = time.perf_counter()
    for _ in range(n):
        tok = step(tok, state).logits[0, -1].argmax().view(1, 1)
    return time.perf_counter() - t


def top_ops(step, state, snap, tok: torch.Tensor, n: int = 8, rows: int = 12) -> str:
    from torch.profiler import profile

    state.restore(snap)
    with profile() as prof:
        for _ in range(n):
            tok = step(tok, state).logits[0, -1].argmax().view(1, 1)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="axiom", help="axiom (real shape) or a demo entry id, e.g. axiom-tiny")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-freezing", action="store_true", help="skip the frozen-weights variant")
    ap.add_argument("--profile", action="store_true", help="print the top ops of 8 steps per path (stderr)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    config = AXIOM if a.model == "axiom" else get_entry(a.model).demo_config
    model = random_model(config, dtype)
    arch = config["model_type"]
    state = model.make_state(model.max_context, "cpu", dtype)
    paths = {"eager": model.infer}
    compile_s = {}
    for name, freezing in (("compiled", False), ("compiled+freezing", True)):
        if freezing and a.no_freezing:
            continue
        step = graphs.CompiledStep(model, torch.device("cpu"), freezing=freezing)
        graphs._point_caches_here()
        compile_s[name], _, _ = graphs.warm_up(step, state, torch.device("cpu"), measure=False)
        if step.failed:
            print(f"{name}: {step.failed}", file=sys.stderr)
            continue
        paths[name] = step
    ids = torch.randint(0, config["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(1))
    times: dict[str, list[float]] = {k: [] for k in paths}
    with torch.inference_mode():
        tok = torch.zeros(1, 1, dtype=torch.long)
        model(ids, state, last_only=True)
        snap = state.snapshot()
        for step in paths.values():  # warm-up
            decode(step, model, state, snap, tok, 4)
        for _ in range(a.repeats):
            for name, step in paths.items():
                times[name].append(decode(step, model, state, snap, tok, a.steps))
        if a.profile:
            for name, step in paths.items():
                print(f"== {name}\n{top_ops(step, state, snap, tok)}", file=sys.stderr)
    rec = {"model": a.model, "arch": arch, "dtype": a.dtype, "threads": a.threads, "steps": a.steps,
           "repeats": a.repeats, "torch": torch.__version__, "cpu": cpu_model(),
           "capability": torch.backends.cpu.get_cpu_capability(),
           "compile_s": {k: round(v, 1) for k, v in compile_s.items()},
           "cache": str(graphs.compile_cache_dir())}
    for name, ts in times.items():
        rec[name] = {"tok_s": round(a.steps / statistics.median(ts), 2),
                     "tok_s_all": [round(a.steps / t, 2) for t in ts]}
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
