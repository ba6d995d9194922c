"""What the per-machine kernel choice (chatapp/engine/kernels.py) measures on this machine, for each catalog
model's real shapes: the representative matrix shape per class (built on the meta device: nothing allocated
but the measured matrices), every candidate's median time per call, the path chosen, and the seconds the
measurement took. The choice itself is not recorded: a model load records it.

    PYTHONPATH=. python bench/kernel_choice.py [MODEL ...] [--dtype float32 bfloat16] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatapp.catalog import load_catalog  # noqa: E402
from chatapp.engine import kernels  # noqa: E402
from chatapp.engine.decisions import cpu_info, resolve_threads  # noqa: E402
from chatapp.engine.loader import build_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="*", default=["axiom", "byrne", "genesis", "odinnext", "huginn"])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--threads", type=int)
    p.add_argument("--json", help="write the records here too")
    a = p.parse_args()
    torch.set_num_threads(resolve_threads(a.threads))
    catalog = load_catalog()
    cpu = cpu_info()
    print(f"{cpu['model']} [{' '.join(cpu['flags'])}] {cpu['aten_cpu_capability']}, {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}")
    records = []
    for mid in a.models:
        entry = catalog[mid]
        model = build_model(dict(entry.bench_config), entry.options)  # meta device: shapes only
        for name in a.dtype:
            dtype = getattr(torch, name)
            shapes = kernels.representative_shapes([w for w in model.matrices() if w.dim() == 2])
            t = time.perf_counter()
            chosen, timings = kernels.measure(shapes, dtype)
            took = time.perf_counter() - t
            rec = {"model": mid, "dtype": name, "chosen": {c: str(p) for c, p in chosen.items()}, "timings_ms": timings,
                   "measure_s": round(took, 3), "loadavg": os.getloadavg()[0]}
            records.append(rec)
            print(f"{mid} {name}: {', '.join(f'{c} {p}' for c, p in rec['chosen'].items())} in {took:.2f} s "
                  f"(load {rec['loadavg']:.2f})")
            for case, times in timings.items():
                print(f"    {case}: " + ", ".join(f"{path} {ms:.2f} ms" for path, ms in times.items()))
    if a.json:
        Path(a.json).write_text(json.dumps({"cpu": cpu, "threads": torch.get_num_threads(), "records": records},
                                           indent=1))


if __name__ == "__main__":
    main()
