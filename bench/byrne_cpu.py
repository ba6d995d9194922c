"""CPU decode/prefill of our SpikeWhaleLM engine at the real Byrne-86M shape, random weights.

Same protocol as the anchors' CPU scripts (shared/anchors/perf-cpu, and bench/odinnext_cpu.py): batch 1,
128 random prompt ids, 65 new tokens (64 decode intervals), a warm-up run, then the median of 3 timed
runs. Decode tok/s = 64 / (time of token 65 - time of token 1); TTFT = start -> first new token (includes
the prefill, fed in the Engine's 512-token chunks). Greedy (argmax) next tokens. Byrne has no peer implementation to run beside it (the
reference code was never published in full; anchors/cpu.md gives only its roofline).

    python bench/byrne_cpu.py --dtype float32 [--threads 2] [--profile]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from chatapp.engine.generate import PREFILL_CHUNK
from chatapp.engine.loader import build_model, prepare_for_inference

# The real config.json (spec byrne §2.1): 16 x 640, 10 query heads over one 64-dim K/V head, engram, 2 streams.
CONFIG = {"model_type": "spike_whale", "vocab_size": 16512, "hidden_size": 640, "num_hidden_layers": 16,
          "num_attention_heads": 10, "num_key_value_heads": 1, "head_dim": 64, "nope_head_dim": 48,
          "qk_rope_head_dim": 16, "q_lora_rank": 128, "o_lora_rank": 128, "max_position_embeddings": 4096,
          "moe_intermediate_size": 2000, "engram_table_size": 4096, "engram_max_ngram": 3, "engram_num_heads": 2,
          "engram_compress_dim": 32, "hc_mult": 2, "hrm_refine_dim": 128, "hrm_refine_steps": 1}


def run_once(model, ids: torch.Tensor, new: int, dtype: torch.dtype) -> dict:
    state = model.make_state(ids.shape[1] + new, "cpu", dtype)
    stamps = []
    t0 = time.perf_counter()
    # The prompt goes in the Engine's chunks (the same at 128 tokens; bounds the attention mask at 2,048).
    for i in range(0, ids.shape[1], PREFILL_CHUNK):
        logits = model(ids[:, i:i + PREFILL_CHUNK], state, last_only=True)
    for i in range(new):
        tok = logits[0, -1].argmax()
        stamps.append(time.perf_counter())
        if i + 1 < new:
            logits = model(tok.view(1, 1), state, last_only=True)
    ttft = stamps[0] - t0
    steps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
    return {"ttft_s": ttft, "prefill_tok_s": ids.shape[1] / ttft,
            "decode_tok_s": (new - 1) / (stamps[-1] - stamps[0]),
            # The median step is robust to bursts of load from other users of the cores.
            "median_step_ms": 1e3 * steps[len(steps) // 2]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=65)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print the top ops of 16 decode steps")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    t = time.perf_counter()
    model = build_model(CONFIG, device="cpu").eval()
    model.init_demo_weights()
    if dtype == torch.bfloat16:
        # What load_model does for CPU bf16: the engram and the embedding stay fp32 (FP32_TENSORS).
        for name, p in model.named_parameters():
            if name not in model.FP32_TENSORS:
                p.data = p.data.to(dtype)
    prepare_for_inference(model, torch.device("cpu"), dtype)
    init_s = time.perf_counter() - t
    ids = torch.randint(0, CONFIG["vocab_size"], (1, a.prompt), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        run_once(model, ids, 8, dtype)
        if a.profile:
            from torch.profiler import profile

            with profile() as prof:
                run_once(model, ids[:, :8], 17, dtype)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        runs = [run_once(model, ids, a.new, dtype) for _ in range(a.runs)]
    rec = {"model": "byrne-86m", "impl": "smollchat engine (torch CPU path)", "dtype": a.dtype,
           "threads": a.threads, "prompt": a.prompt, "new_tokens": a.new, "init_s": round(init_s, 2),
           "weight_bytes": model.weight_bytes(), "torch": torch.__version__}
    for k in ("ttft_s", "prefill_tok_s", "decode_tok_s", "median_step_ms"):
        vals = [r[k] for r in runs]
        rec[k] = round(statistics.median(vals), 4)
        rec[k + "_all"] = [round(v, 4) for v in vals]
    rec["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
