"""What the int8 x int8 products (cpu_gemv's VNNI and AVX2 ones: activations rounded to int8 blocks of 32) cost in
quality next to the same int8 weights multiplied by the activations as given (aten's product): relative logit
error against the float model and top-1 agreement, one token at a time through every position of a prompt
(the decode path, where the one-row product runs), on each golden fixture and on a real-size random Axiom.

    python bench/int8_quality.py [--fixtures ../shared/fixtures] [--real axiom] [--tokens 32]
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

PATHS = {"int8 (x as given)": "row/linear/linear", "int8 x int8 (VNNI)": "row/gemv-avx512vnni/linear",
         "int8 x int8 (AVX2)": "row/gemv-avx2-q8/linear"}


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
    runs = set(cpu_gemv.products(torch.int8))
    paths = {name: path for name, path in PATHS.items() if path == "row/linear/linear" or path.split("/")[1] in runs}
    for name in PATHS.keys() - paths.keys():
        print(f"({name}: not on this machine)")
    print("model | " + " | ".join(f"{k}: rel. error / top-1" for k in paths))
    for d in sorted(p for p in Path(args.fixtures).iterdir() if (p / "golden.safetensors").is_file()):
        ids = load_file(str(d / "golden.safetensors"))["input_ids"]
        ref = decode_logits(load_model(d, kernels="reference"), ids, torch.float32)
        cells = []
        for path in paths.values():
            model = load_model(d, quantize="int8", kernels={"dtype": "float32", "widening": path, "narrowing": path})
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
    cells = [compare(ref, real("int8", path)) for path in paths.values()]
    print(f"{entry.id} real size, random weights, bf16 | " + " | ".join(cells))


if __name__ == "__main__":
    main()
