"""The anchors' CPU protocol, shared by the per-model bench scripts that drive a model directly.

Batch 1, a random prompt, greedy (argmax) next tokens; the prompt goes in the Engine's prefill chunks.
Decode tok/s = (new - 1) / (time of the last token - time of the first); TTFT = start -> first new token
(includes the prefill). The median step is reported too: it is robust to a neighbour stealing a core.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from chatapp.engine.generate import PREFILL_CHUNK


def arguments(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=65)
    ap.add_argument("--runs", type=int, default=3)
    return ap


def run_once(model, ids: torch.Tensor, new: int, dtype: torch.dtype) -> dict:
    state = model.make_state(ids.shape[1] + new, "cpu", dtype)
    stamps = []
    t0 = time.perf_counter()
    for i in range(0, ids.shape[1], PREFILL_CHUNK):
        logits = model(ids[:, i:i + PREFILL_CHUNK], state, last_only=True)
    for i in range(new):
        tok = logits[0, -1].argmax()
        stamps.append(time.perf_counter())
        if i + 1 < new:
            logits = model(tok.view(1, 1), state, last_only=True)
    ttft = stamps[0] - t0
    step = statistics.median(b - a for a, b in zip(stamps, stamps[1:]))
    return {"ttft_s": ttft, "prefill_tok_s": ids.shape[1] / ttft,
            "decode_tok_s": (new - 1) / (stamps[-1] - stamps[0]), "median_step_ms": 1e3 * step}


def measure(model, a: argparse.Namespace, vocab_size: int, record: dict) -> None:
    """A warm-up run, then `a.runs` timed runs; print one JSON record with medians and every run."""
    dtype = getattr(torch, a.dtype)
    ids = torch.randint(0, vocab_size, (1, a.prompt), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        run_once(model, ids, 8, dtype)
        runs = [run_once(model, ids, a.new, dtype) for _ in range(a.runs)]
    rec = {**record, "dtype": a.dtype, "threads": a.threads, "prompt": a.prompt, "new_tokens": a.new,
           "weight_bytes": model.weight_bytes(), "torch": torch.__version__}
    for k in runs[0]:
        vals = [r[k] for r in runs]
        rec[k] = round(statistics.median(vals), 4)
        rec[k + "_all"] = [round(v, 4) for v in vals]
    rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    print(json.dumps(rec), flush=True)
