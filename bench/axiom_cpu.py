"""Axiom-Dense-380M at its real shape on CPU through our Engine's generate loop (random weights).

Protocol of shared/anchors/perf-cpu (bench_hf_llama.py / bench_axiom_ref.py): batch 1, 128 random prompt
ids, 65 new tokens (64 decode intervals), greedy, one warm-up run, then the median of 3 timed runs.
Decode tok/s = 64 / (time of token 65 - time of token 1); TTFT = call start -> first new token (includes
the prefill); prefill tok/s = 128 / TTFT.

The model goes through the path the CLI uses: a real-size F32 checkpoint in the authors' export layout
(spec axiom §2.3: no key prefix, `lm_head.weight` stored beside `embed.weight` with the same values, the
`rope_cos`/`rope_sin` buffers, no safetensors metadata) is loaded by `load_engine` (the catalog's tokenizer
and chat format, the loader's sanitize and CPU post-processing), and timed through `Engine.generate`
(sampler, stop checks and detokenizer included).

    python bench/axiom_cpu.py --write-checkpoint /tmp/axiom-real        # 1.95 GB, once
    python bench/axiom_cpu.py --load /tmp/axiom-real --dtype float32 [--threads 2] [--card] [--profile]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatapp.contract import Done, SamplingSettings, StepEvent  # noqa: E402
from chatapp.engine.runtime import Engine, entry_for_directory, load_engine  # noqa: E402

# config.json as the authors' upload.py writes it (spec axiom §2.2); the values are ModelConfig's defaults.
CONFIG = {"architectures": ["axiomForCausalLM"], "model_type": "axiom", "vocab_size": 100277, "dim": 1024,
          "n_layers": 24, "n_heads": 16, "n_kv_heads": 8, "ffn_dim_multiplier": 2.6667, "max_seq_len": 1024,
          "rope_theta": 10000.0, "norm_eps": 1e-05, "dropout": 0.0, "bos_token_id": None,
          "eos_token_id": 100257, "pad_token_id": 100257}


def vm(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    return 0


def write_checkpoint(out: Path) -> None:
    """The real tensor inventory (221 tensors, 1,954,656,256 bytes F32), N(0, 0.02) matrices, unit norms."""
    from safetensors.torch import save_file

    c = CONFIG
    dim, hd = c["dim"], c["dim"] // c["n_heads"]
    ffn = (int(dim * c["ffn_dim_multiplier"]) + 255) // 256 * 256
    g = torch.Generator().manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.empty(shape).normal_(0.0, 0.02, generator=g)

    t: dict[str, torch.Tensor] = {"embed.weight": rnd(c["vocab_size"], dim)}
    t["lm_head.weight"] = t["embed.weight"].clone()  # the export clones the tied head
    for i in range(c["n_layers"]):
        p = f"layers.{i}."
        t[p + "attn_norm.weight"] = torch.ones(dim)
        t[p + "attn.wq.weight"] = rnd(c["n_heads"] * hd, dim)
        t[p + "attn.wk.weight"] = rnd(c["n_kv_heads"] * hd, dim)
        t[p + "attn.wv.weight"] = rnd(c["n_kv_heads"] * hd, dim)
        t[p + "attn.wo.weight"] = rnd(dim, c["n_heads"] * hd)
        t[p + "ffn_norm.weight"] = torch.ones(dim)
        t[p + "ffn.w1.weight"] = rnd(ffn, dim)
        t[p + "ffn.w3.weight"] = rnd(ffn, dim)
        t[p + "ffn.w2.weight"] = rnd(dim, ffn)
    t["norm.weight"] = torch.ones(dim)
    inv = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    ang = torch.outer(torch.arange(2 * c["max_seq_len"]).float(), inv)
    t["rope_cos"], t["rope_sin"] = ang.cos(), ang.sin()
    out.mkdir(parents=True, exist_ok=True)
    save_file(t, str(out / "model.safetensors"))  # no metadata, as upload.py writes it
    (out / "config.json").write_text(json.dumps(c, indent=2))


def run_once(engine: Engine, ids: list[int], settings: SamplingSettings) -> dict:
    engine.reset()  # a fresh prompt every run (the Engine would otherwise reuse the cached prefix)
    t0 = time.monotonic_ns()
    events = list(engine.generate(ids, settings))
    toks = [e.t_ns for e in events if isinstance(e, StepEvent)]
    done = next(e for e in events if isinstance(e, Done))
    steps = sorted(b - a for a, b in zip(toks, toks[1:]))
    ttft = (toks[0] - t0) / 1e9
    return {"ttft_s": ttft, "prefill_tok_s": len(ids) / ttft,
            "decode_tok_s": (len(toks) - 1) / ((toks[-1] - toks[0]) / 1e9),
            # The median step is robust to bursts of load from other users of the two cores.
            "median_step_ms": steps[len(steps) // 2] / 1e6, "new_tokens": len(toks), "stop": done.stop_reason}


def profile_decode(engine: Engine, ids: list[int], n: int = 16) -> None:
    """Top ops of n single-token model calls after the prompt (the decode step alone, no sampler)."""
    from torch.profiler import profile

    model, state = engine.model, engine.state
    engine.reset()
    with torch.inference_mode():
        model(torch.tensor([ids]), state, last_only=True)
        tok = torch.tensor([[ids[-1]]])
        model(tok, state, last_only=True)
        with profile() as prof:
            for _ in range(n):
                model(tok, state, last_only=True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20), file=sys.stderr)
    engine.reset()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load", type=Path, help="checkpoint directory written by --write-checkpoint")
    ap.add_argument("--write-checkpoint", type=Path)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=65)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--card", action="store_true", help="the catalog's sampler (T 0.2, top-p 0.85, top-k 50, "
                    "rep 1.15, no-repeat-3gram) instead of greedy")
    ap.add_argument("--profile", action="store_true", help="print the top ops of 16 decode steps (stderr)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.write_checkpoint:
        write_checkpoint(a.write_checkpoint)
        return
    if a.load is None:
        ap.error("--load DIR (or --write-checkpoint DIR) is required")
    t = time.perf_counter()
    engine = load_engine(entry_for_directory(a.load), device="cpu", dtype=a.dtype, model_dir=a.load)
    load_s, load_peak = time.perf_counter() - t, vm("VmHWM")
    ids = torch.randint(0, CONFIG["vocab_size"], (a.prompt,), generator=torch.Generator().manual_seed(1)).tolist()
    if a.card:
        settings = engine.default_settings().with_overrides(max_new_tokens=a.new, seed=0)
    else:
        settings = SamplingSettings(temperature=0.0, max_new_tokens=a.new)
    if a.profile:
        profile_decode(engine, ids)
    warm = run_once(engine, ids, settings)
    runs = [run_once(engine, ids, settings) for _ in range(a.runs)]
    rec = {"model": "axiom-380m (random weights, real shape)", "impl": "smollchat Engine.generate",
           "dtype": a.dtype, "sampler": "card" if a.card else "greedy", "threads": a.threads,
           "prompt": a.prompt, "new": a.new,
           "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent).stdout.strip(),
           "load_s": round(load_s, 2), "weight_bytes": engine.model.weight_bytes(),
           "peak_rss_load_mb": round(load_peak / 2**20, 1), "warmup": warm}
    for k in ("ttft_s", "prefill_tok_s", "decode_tok_s", "median_step_ms"):
        vals = [r[k] for r in runs]
        rec[k] = round(statistics.median(vals), 4)
        rec[k + "_all"] = [round(v, 4) for v in vals]
    rec["new_tokens"] = [r["new_tokens"] for r in runs]
    rec["stop"] = sorted({r["stop"] for r in runs})
    rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    # Resident now, split: file-backed pages (weights still mapped from the safetensors file) vs anonymous.
    rec["rss_anon_mb"], rec["rss_file_mb"] = round(vm("RssAnon") / 2**20, 1), round(vm("RssFile") / 2**20, 1)
    rec["loadavg"] = os.getloadavg()[0]
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
