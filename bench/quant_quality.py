"""What the byte products cost in quality next to the same quantized weights multiplied by the activations as
given (aten's products): int8 weights through cpu_gemv's int8 x int8 products (VNNI and AVX2; activations rounded to
int8 blocks of 32), int4 weights in our nibbles layout through gemv_int4 (activations rounded in spans of 128).
Relative logit error against the float model and top-1 agreement, one token at a time through every position of a
prompt (the decode path, where the one-row product runs), on each golden fixture and on a real-size random Axiom.

    python bench/quant_quality.py [--fixtures ../shared/fixtures] [--real axiom] [--tokens 32]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file

from chatapp.catalog import get_entry
from chatapp.engine import cpu_gemv
from chatapp.engine.bench import random_model
from chatapp.engine.loader import load_model, prepare_for_inference

#: Column name -> (quantization, kernel path); aten's paths multiply by x as given.
PATHS = {"int8 (x as given)": ("int8", "row/linear/linear"),
         "int8 x int8 (VNNI)": ("int8", "row/gemv-avx512vnni/linear"),
         "int8 x int8 (AVX2)": ("int8", "row/gemv-avx2-q8/linear"),
         "int4 (aten, x as given)": ("int4", "row/linear/linear"),
         "int4 nibbles (VNNI)": ("int4", "nibbles/gemv-avx512vnni/linear"),
         "int4 nibbles (AVX2)": ("int4", "nibbles/gemv-avx2-q8/linear")}


def decode_logits(model, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Logits of every position, one token at a time (a one-token prefill, then steps)."""
    controls = {"num_steps": 4} if "huginn" in type(model).__module__ else None
    state = model.make_state(ids.shape[1], "cpu", dtype)
    with torch.inference_mode():
        return torch.cat([model.infer(ids[:, i:i + 1], state, controls).logits for i in range(ids.shape[1])], 1).float()


def compare(ref: torch.Tensor, got: torch.Tensor) -> str:
    rel = float((got - ref).norm() / ref.norm())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return f"{rel:.4f} / {top1:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixtures", default=str(Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
    ap.add_argument("--real", default="axiom")
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    runs = {"int8": set(cpu_gemv.products(torch.int8)), "int4": set(cpu_gemv.products(cpu_gemv.INT4))}
    paths = {name: (mode, path) for name, (mode, path) in PATHS.items()
             if path == "row/linear/linear" or path.split("/")[1] in runs[mode]}
    for name in PATHS.keys() - paths.keys():
        print(f"({name}: not on this machine)")
    print("model | " + " | ".join(f"{k}: rel. error / top-1" for k in paths))
    for d in sorted(p for p in Path(args.fixtures).iterdir() if (p / "golden.safetensors").is_file()):
        ids = load_file(str(d / "golden.safetensors"))["input_ids"]
        ref = decode_logits(load_model(d, kernels="reference"), ids, torch.float32)
        cells = []
        for mode, path in paths.values():
            model = load_model(d, quantize=mode, kernels={"dtype": "float32", "widening": path, "narrowing": path})
            cells.append(compare(ref, decode_logits(model, ids, torch.float32)))
        print(f"{d.name} fixture | " + " | ".join(cells))
    entry = get_entry(args.real)
    ids = torch.randint(0, 1000, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    def real(quantize: str | None, path: str = "row/linear/linear") -> torch.Tensor:
        model, _ = random_model(entry, torch.bfloat16)
        prepare_for_inference(model, torch.device("cpu"), torch.bfloat16, quantize,
                              kernels={"dtype": "bfloat16", "widening": path, "narrowing": path})
        return decode_logits(model, ids, torch.bfloat16)
    ref = real(None)
    cells = [compare(ref, real(mode, path)) for mode, path in paths.values()]
    print(f"{entry.id} real size, random weights, bf16 | " + " | ".join(cells))


if __name__ == "__main__":
    main()
