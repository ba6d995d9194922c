"""Huginn-0125 at real size on CPU through our Engine's generate loop (random weights; no checkpoint).

Protocol of shared/anchors/perf-cpu/bench_huginn.py: default RavenConfig shapes (3.56B params), random
weights made in place in the target dtype (N(0, 0.02), norms 1, qk bias 0, as the anchor does), a
16-token random prompt, 4 new tokens (3 decode intervals), greedy, one warm-up then timed runs.
Each configuration prints one JSON line:

    python bench/huginn_cpu.py --steps 4 32 --runs 2
    python bench/huginn_cpu.py --steps 32 --new 8 --modes plain exit=kl:5e-4 draft=4:4   # one process
    python bench/huginn_cpu.py --write-checkpoint DIR                      # a real-size sharded F32 file
    python bench/huginn_cpu.py --load DIR --steps 4                        # load it (peak RSS) and run

Modes: `plain`; `exit=<criterion>:<threshold>` (adaptive exit, num_steps is the cap);
`draft=<draft_steps>:<draft_tokens>` (self-speculative greedy decoding verified at num_steps).

Seconds per token = mean decode interval (token 1 -> token N); TTFT includes the prefill. Peak RSS is
the process's high-water mark (VmHWM) after loading and after generating.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatapp.catalog import get_entry  # noqa: E402
from chatapp.contract import StepEvent  # noqa: E402
from chatapp.engine.loader import build_model, load_model  # noqa: E402
from chatapp.engine.runtime import Engine  # noqa: E402
from chatapp.engine.tokenizer import ByteTokenizer  # noqa: E402

CONFIG = {"model_type": "huginn_raven"}


def vm(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def random_model(dtype: torch.dtype, init: str = "normal"):
    model = build_model(CONFIG).to(dtype).to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_f" in name:
                p.fill_(1.0)
            elif "qk_bias" in name:
                p.zero_()
            elif init == "normal":
                p.normal_(0.0, 0.02)
        if init == "reference":
            # The authors' init (truncated normals, depth-scaled output projections): its recurrence
            # behaves differently from N(0, 0.02) (at real width the latter never settles in 32 steps).
            model.init_demo_weights()
    model.post_load(torch.device("cpu"))
    return model.requires_grad_(False).eval()


def write_checkpoint(out: Path, shard_bytes: int = 4_000_000_000) -> None:
    """The real tensor layout in F32: both embedding copies, freqs_cis, shards named by an index.
    One shard's tensors are held at a time."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shapes = {k: v.shape for k, v in build_model(CONFIG).state_dict().items()}
    shapes["lm_head.weight"] = shapes["transformer.wte.weight"]
    shapes["freqs_cis"] = torch.Size([1, 4096, 1, 48, 2])
    groups, cur, size = [], [], 0
    for name, shape in shapes.items():
        n = shape.numel() * 4
        if cur and size + n > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += n
    groups.append(cur)
    weight_map = {}
    for i, names in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            t = torch.empty(shapes[name])
            if "norm" in name or "ln_f" in name:
                t.fill_(1.0)
            elif "qk_bias" in name or name == "freqs_cis":
                t.zero_()
            else:
                # Seeded by name: lm_head.weight gets the same values as the embedding (the card's two
                # identical copies) without both being held at once.
                key = "transformer.wte.weight" if name == "lm_head.weight" else name
                t.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(sum(map(ord, key)) * 7919))
            tensors[name] = t
        save_file(tensors, str(out / fn))
        weight_map.update({k: fn for k in names})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(CONFIG))


def run_once(engine: Engine, ids: list[int], new: int, controls: dict) -> dict:
    settings = engine.default_settings().with_overrides(max_new_tokens=new, temperature=0.0)
    engine.reset()
    model = engine.model
    model.spec_stats.update(calls=0, drafted=0, accepted=0, plain=0)
    t0 = time.monotonic_ns()
    events = list(engine.generate(ids, settings, controls))
    toks = [e for e in events if isinstance(e, StepEvent)]
    times = [e.t_ns for e in toks]
    intervals = [(b - a) / 1e9 for a, b in zip(times, times[1:])]
    return {"ttft_s": (times[0] - t0) / 1e9, "s_per_token": statistics.mean(intervals) if intervals else None,
            "intervals_s": [round(x, 3) for x in intervals], "tokens": len(toks),
            "steps": [e.steps for e in toks], "spec": dict(model.spec_stats)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new", type=int, default=4)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["plain"], help="plain | exit=crit:thr | draft=steps:tokens")
    ap.add_argument("--cache", default="latest-m4")
    ap.add_argument("--init", default="normal", choices=["normal", "reference"], help="random weights: the anchor's "
                    "N(0, 0.02) or the authors' init")
    ap.add_argument("--load", type=Path, help="load this checkpoint directory instead of random weights")
    ap.add_argument("--write-checkpoint", type=Path)
    ap.add_argument("--config", type=json.loads, default={}, help="config overrides (smoke tests)")
    a = ap.parse_args()
    CONFIG.update(a.config)
    torch.set_num_threads(a.threads)
    if a.write_checkpoint:
        write_checkpoint(a.write_checkpoint)
        return
    dtype = getattr(torch, a.dtype)
    base = vm("VmRSS")
    t = time.perf_counter()
    model = load_model(a.load, "cpu", dtype) if a.load else random_model(dtype, a.init)
    load_s, load_peak, after_load = time.perf_counter() - t, vm("VmHWM"), vm("VmRSS")
    entry = get_entry("huginn")
    engine = Engine(model, ByteTokenizer(entry.tokenizer.specials, entry.chat), entry, torch.device("cpu"),
                    dtype, entry.context)
    ids = torch.randint(0, 65504, (a.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    plain = {"cache_strategy": a.cache, "state_init": "like-init", "exit_criterion": "none", "draft_steps": 0}
    for r, mode in [(r, m) for r in a.steps for m in a.modes]:
        c = {**plain, "num_steps": r}
        kind, _, arg = mode.partition("=")
        if kind == "exit":
            crit, thr = arg.split(":")
            c.update(exit_criterion=crit, exit_threshold=thr)
        elif kind == "draft":
            d, k = arg.split(":")
            c.update(draft_steps=int(d), draft_tokens=int(k))
        # One warm-up per process: first touches of fresh weight pages and buffers are slow here.
        warm = run_once(engine, ids, a.new, c) if (r, mode) == (a.steps[0], a.modes[0]) else None
        runs = [run_once(engine, ids, a.new, c) for _ in range(a.runs)]
        rec = {"model": "huginn-0125 (random weights)", "impl": "smollchat Engine.generate", "dtype": a.dtype,
               "threads": a.threads, "init": "checkpoint" if a.load else a.init, "mode": mode, "num_steps": r,
               "prompt": a.prompt, "new": a.new, "controls": c,
               "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent).stdout.strip(),
               "load_s": round(load_s, 1), "weights_GB": round(model.weight_bytes() / 1e9, 2),
               "rss_before_load_GB": round(base / 1e9, 2), "peak_rss_load_GB": round(load_peak / 1e9, 2),
               "rss_after_load_GB": round(after_load / 1e9, 2), "warmup": warm, "runs": runs,
               "s_per_token_median": statistics.median(x["s_per_token"] for x in runs),
               "mean_steps": statistics.mean(s for x in runs for s in x["steps"]),
               "ttft_s_median": statistics.median(x["ttft_s"] for x in runs),
               "peak_rss_GB": round(vm("VmHWM") / 1e9, 2),
               "kv_allocated_MB": round(engine.memory().allocated.get("kv", 0) / 1e6, 1),
               "host": os.uname().nodename}
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
