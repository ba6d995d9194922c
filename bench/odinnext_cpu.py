"""CPU decode/prefill of our OdinNext engine at the real OdinNext-138M shape, random weights.

Same protocol as shared/anchors/perf-cpu/bench_hgrn2.py (the "plain eager" peer), so the two can run back to
back: batch 1, 128 random prompt ids, 65 new tokens (64 decode intervals), a warm-up run, then the median
of 3 timed runs. Decode tok/s = 64 / (time of token 65 - time of token 1); TTFT = start -> first new token
(includes the prefill). Greedy (argmax) next tokens, fp32 recurrent state.

    python bench/odinnext_cpu.py --dtype float32 [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from chatapp.engine.loader import build_model, prepare_for_inference

# The real model (spec §2): 16 x 768, 6 heads with a 128 x 128 state, FFN 2048, vocab 32,770.
CONFIG = {"model_type": "odinnext", "vocab_size": 32770, "hidden_size": 768, "num_hidden_layers": 16,
          "num_heads": 6, "expand_ratio": 128, "intermediate_size": 2048, "max_position_embeddings": 2048}


def run_once(model, ids: torch.Tensor, new: int) -> dict:
    state = model.make_state(ids.shape[1] + new, "cpu", next(model.parameters()).dtype)
    stamps = []
    t0 = time.perf_counter()
    logits = model(ids, state, last_only=True)
    for i in range(new):
        tok = logits[0, -1].argmax()
        stamps.append(time.perf_counter())
        if i + 1 < new:
            logits = model(tok.view(1, 1), state, last_only=True)
    ttft = stamps[0] - t0
    return {"ttft_s": ttft, "prefill_tok_s": ids.shape[1] / ttft,
            "decode_tok_s": (new - 1) / (stamps[-1] - stamps[0])}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=65)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    t = time.perf_counter()
    model = build_model(CONFIG, device="cpu").to(dtype).eval()
    prepare_for_inference(model, torch.device("cpu"), dtype)  # what load_model does after loading
    init_s = time.perf_counter() - t
    ids = torch.randint(0, CONFIG["vocab_size"], (1, a.prompt), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        run_once(model, ids, 8)
        runs = [run_once(model, ids, a.new) for _ in range(a.runs)]
    rec = {"model": "odinnext-138m", "impl": "smollchat engine (torch CPU path)", "dtype": a.dtype,
           "threads": a.threads, "prompt": a.prompt, "new_tokens": a.new, "init_s": round(init_s, 2),
           "weight_bytes": model.weight_bytes(), "torch": torch.__version__}
    for k in ("ttft_s", "prefill_tok_s", "decode_tok_s"):
        vals = [r[k] for r in runs]
        rec[k] = round(statistics.median(vals), 4)
        rec[k + "_all"] = [round(v, 4) for v in vals]
    rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
