"""Where one decode step's time goes: a model at its real size (random weights, as `smollchat bench` builds it),
its step as the engine runs it (kernel choice, quantization, compiled or eager), then torch.profiler over N
steps after a 64-token prompt. Prints the step time (median and fastest of 30) and the top operators by
self CPU time; the issue's note quotes it where a target is missed.

    python bench/profile_step.py odinnext [--threads 2] [--quantize int8] [--compile auto|on|off] [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from chatapp.catalog import get_entry
from chatapp.engine.bench import random_model
from chatapp.engine.decisions import cpu_info
from chatapp.engine.graphs import decode_step
from chatapp.engine.loader import prepare_for_inference, resolve_dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantize", choices=("none", "int8", "int4"), default="none")
    ap.add_argument("--compile", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rows", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    entry, dev = get_entry(args.model), torch.device("cpu")
    dtype = resolve_dtype(args.dtype, dev, entry.cpu_dtype)
    quant = None if args.quantize == "none" else args.quantize
    model, _ = random_model(entry, dtype)
    prepare_for_inference(model, dev, dtype, quant, kernels="auto")
    state = model.make_state(min(entry.context, model.max_context), dev, dtype)
    step, report = decode_step(model, entry.architecture, state, dev, dtype, args.compile)
    info = cpu_info()
    print(f"{entry.id} {str(dtype).removeprefix('torch.')} quantize={args.quantize} threads={args.threads} "
          f"compile: {report.label}")
    print(f"kernels: {model.kernel_choice.label}")
    print(f"cpu: {info['model']} [{' '.join(info['flags'])}] {info['aten_cpu_capability']}, "
          f"load {os.getloadavg()[0]:.2f}")
    with torch.inference_mode():
        state.reset()
        model.infer(torch.randint(0, model.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)), state)
        tok = torch.zeros(1, 1, dtype=torch.long)
        for _ in range(5):
            step(tok, state)
        times = []
        for _ in range(30):
            t = time.perf_counter()
            step(tok, state)
            times.append(time.perf_counter() - t)
        print(f"step: median {statistics.median(times) * 1e3:.2f} ms, fastest {min(times) * 1e3:.2f} ms "
              f"(30 steps, model only, no sampler)")
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step(tok, state)
    print(f"profile of {args.steps} steps:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
