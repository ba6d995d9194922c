"""CPU decode/prefill of our OdinNext engine at the real OdinNext-138M shape, random weights.

Same protocol as shared/anchors/perf-cpu/bench_hgrn2.py (the "plain eager" peer), so the two can run back to
back: batch 1, 128 random prompt ids, 65 new tokens (64 decode intervals), a warm-up run, then the median
of 3 timed runs. Decode tok/s = 64 / (time of token 65 - time of token 1); TTFT = start -> first new token
(includes the prefill). Greedy (argmax) next tokens, fp32 recurrent state.

    python bench/odinnext_cpu.py --dtype float32 [--threads 2]
"""
from __future__ import annotations

import time

import torch

from chatapp.engine.loader import build_model, prepare_for_inference
from protocol import arguments, measure

# The real model (spec §2): 16 x 768, 6 heads with a 128 x 128 state, FFN 2048, vocab 32,770.
CONFIG = {"model_type": "odinnext", "vocab_size": 32770, "hidden_size": 768, "num_hidden_layers": 16,
          "num_heads": 6, "expand_ratio": 128, "intermediate_size": 2048, "max_position_embeddings": 2048}


def main() -> None:
    a = arguments(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    t = time.perf_counter()
    model = build_model(CONFIG, device="cpu").to(dtype).eval()
    prepare_for_inference(model, torch.device("cpu"), dtype)  # what load_model does after loading
    init_s = time.perf_counter() - t
    measure(model, a, CONFIG["vocab_size"], {"model": "odinnext-138m", "impl": "smollchat engine (torch CPU path)",
                                             "init_s": round(init_s, 2)})


if __name__ == "__main__":
    main()
