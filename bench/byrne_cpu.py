"""CPU decode/prefill of our SpikeWhaleLM engine at the real Byrne-86M shape, random weights.

Same protocol as the anchors' CPU scripts (shared/anchors/perf-cpu, and bench/odinnext_cpu.py): batch 1,
128 random prompt ids, 65 new tokens (64 decode intervals), a warm-up run, then the median of 3 timed
runs. Decode tok/s = 64 / (time of token 65 - time of token 1); TTFT = start -> first new token (includes
the prefill, fed in the Engine's 512-token chunks). Greedy (argmax) next tokens. Byrne has no peer implementation to run beside it (the
reference code was never published in full; anchors/cpu.md gives only its roofline).

    python bench/byrne_cpu.py --dtype float32 [--threads 2] [--profile]
"""
from __future__ import annotations

import time

import torch

from chatapp.engine.loader import build_model, prepare_for_inference
from protocol import arguments, measure, run_once

# The real config.json (spec byrne §2.1): 16 x 640, 10 query heads over one 64-dim K/V head, engram, 2 streams.
CONFIG = {"model_type": "spike_whale", "vocab_size": 16512, "hidden_size": 640, "num_hidden_layers": 16,
          "num_attention_heads": 10, "num_key_value_heads": 1, "head_dim": 64, "nope_head_dim": 48,
          "qk_rope_head_dim": 16, "q_lora_rank": 128, "o_lora_rank": 128, "max_position_embeddings": 4096,
          "moe_intermediate_size": 2000, "engram_table_size": 4096, "engram_max_ngram": 3, "engram_num_heads": 2,
          "engram_compress_dim": 32, "hc_mult": 2, "hrm_refine_dim": 128, "hrm_refine_steps": 1}


def main() -> None:
    ap = arguments(__doc__.splitlines()[0])
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
    if a.profile:
        from torch.profiler import profile

        ids = torch.randint(0, CONFIG["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(1))
        with torch.inference_mode(), profile() as prof:
            run_once(model, ids, 17, dtype)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    measure(model, a, CONFIG["vocab_size"], {"model": "byrne-86m", "impl": "smollchat engine (torch CPU path)",
                                             "init_s": round(init_s, 2)})


if __name__ == "__main__":
    main()
