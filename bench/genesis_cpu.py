"""CPU decode/prefill of our Genesis engine at the real Genesis-152M shape, random weights.

Same protocol as shared/anchors/perf-cpu/bench_genesis.py (the reference package's own loop), so the two
can run back to back: batch 1, 128 random prompt ids, 65 new tokens (64 decode intervals), a warm-up
run, then the median of 3 timed runs. Decode tok/s = 64 / (time of token 65 - time of token 1);
TTFT = start -> first new token (includes the prefill). Greedy (argmax) next tokens.

    python bench/genesis_cpu.py --dtype float32 [--threads 2] [--selective]
"""
from __future__ import annotations

import time

import torch

from chatapp.engine.arch.genesis import GENESIS_147M
from chatapp.engine.loader import build_model, prepare_for_inference
from protocol import arguments, measure


def main() -> None:
    ap = arguments(__doc__.splitlines()[0])
    ap.add_argument("--selective", action="store_true",
                    help="selective activation on (k = 0.85), as the Instruct metadata may say (spec §1.1)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    # The reference bench's config: genesis_147m with the real vocabulary.
    cfg = {**GENESIS_147M, "model_type": "genesis", "vocab_size": 50279}
    if a.selective:
        cfg.update(use_selective_activation=True, selective_k_ratio=0.85)
    t = time.perf_counter()
    model = build_model(cfg, device="cpu").to(dtype).eval()
    prepare_for_inference(model, torch.device("cpu"), dtype)  # what load_model does after loading
    init_s = time.perf_counter() - t
    measure(model, a, cfg["vocab_size"], {"model": "genesis-152m", "impl": "smollchat engine (torch CPU path)",
                                          "selective": a.selective, "init_s": round(init_s, 2)})


if __name__ == "__main__":
    main()
