"""`smollchat verify DIR`: check a golden fixture directory in fp32 on CPU.

A fixture directory holds config.json (or config metadata), model.safetensors, golden.safetensors
and golden.json (shared/fixtures/* format). This compares the full-forward `logits`, the cached
greedy `greedy_step_logits` and `greedy_ids`; other golden tensors belong to each architecture's tests.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .loader import LoadError, load_model, read_tensors


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float

    def allows(self, err: float, absmax: float) -> bool:
        return err <= self.atol + self.rtol * absmax


@dataclass
class Comparison:
    name: str
    max_abs_err: float
    ref_absmax: float
    tolerance: Tolerance

    @property
    def ok(self) -> bool:
        return self.tolerance.allows(self.max_abs_err, self.ref_absmax)


@dataclass
class VerifyReport:
    fixture: str
    model_type: str
    controls: dict = field(default_factory=dict)
    comparisons: list[Comparison] = field(default_factory=list)
    greedy_ids_match: bool | None = None
    greedy_ids: list[int] = field(default_factory=list)
    expected_greedy_ids: list[int] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.comparisons) and self.greedy_ids_match is not False

    def lines(self) -> list[str]:
        out = [f"fixture {self.fixture} ({self.model_type})"]
        if self.controls:
            out.append("controls: " + ", ".join(f"{k}={v}" for k, v in self.controls.items()))
        for c in self.comparisons:
            out.append(f"  {c.name:<20} max abs err {c.max_abs_err:.3e}  (|ref| max {c.ref_absmax:.1f}, "
                       f"atol {c.tolerance.atol:g}, rtol {c.tolerance.rtol:g})  {'ok' if c.ok else 'FAIL'}")
        if self.greedy_ids_match is not None:
            out.append(f"  {'greedy_ids':<20} {'match' if self.greedy_ids_match else 'MISMATCH'}"
                       + ("" if self.greedy_ids_match else
                          f"\n    got      {self.greedy_ids}\n    expected {self.expected_greedy_ids}"))
        for name in self.missing:
            out.append(f"  {name:<20} not in this fixture (skipped)")
        out.append("PASS" if self.ok else "FAIL")
        return out


def _tolerance(golden: dict, key: str) -> Tolerance:
    tol = golden.get("suggested_tolerance", {})
    t = tol.get(key) or tol.get("logits_fp32") or {}
    return Tolerance(float(t.get("atol", tol.get("logits_atol", 1e-3))), float(t.get("rtol", tol.get("logits_rtol", 1e-4))))


def _compare(name: str, got: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> Comparison:
    if got.shape != ref.shape:
        raise ValueError(f"{name}: engine produced shape {list(got.shape)}, fixture has {list(ref.shape)}")
    return Comparison(name, float((got.float() - ref.float()).abs().max()), float(ref.abs().max()), tol)


def golden_controls(golden: dict) -> dict:
    """golden.json's `controls` object, minus its note."""
    return {k: v for k, v in (golden.get("controls") or {}).items() if k != "note"}


@torch.inference_mode()
def forced_decode(model, input_ids: torch.Tensor, continuation: list[int], controls=None) -> torch.Tensor:
    """Prefill, then feed `continuation` one token at a time through the cache.

    Returns the logits behind each continuation token ([n, V]; row 0 = prefill's last position).
    Feeding the expected ids means the argmax of each row equals them all iff free greedy decoding
    reproduces them, and the step logits stay comparable after a first mismatch. `controls` (missing ones
    at their defaults) go with every forward.
    """
    n = len(continuation)
    state = model.make_state(input_ids.shape[1] + n, input_ids.device, torch.float32)
    rows = [model.infer(input_ids, state, controls, last_only=True).logits[0, -1]]
    for tok in continuation[:-1]:
        ids = torch.tensor([[tok]], device=input_ids.device)
        rows.append(model.infer(ids, state, controls, last_only=True).logits[0, -1])
    return torch.stack(rows)


@torch.inference_mode()
def verify(fixture_dir: str | Path) -> VerifyReport:
    """Run the fixture's checks; raise UnknownArchitecture for an architecture not built yet."""
    d = Path(fixture_dir)
    try:
        golden = json.loads((d / "golden.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise LoadError(f"{d / 'golden.json'} is not valid JSON ({e})") from None
    tensors = read_tensors(d / "golden.safetensors")
    if not isinstance(golden, dict) or "input_ids" not in tensors:
        raise LoadError(f"{d} is not a golden fixture (golden.json must be an object, golden.safetensors "
                        "must hold input_ids)")
    model = load_model(d, "cpu", torch.float32)
    controls = golden_controls(golden)
    report = VerifyReport(str(d), type(model).__module__.rsplit(".", 1)[-1], controls)
    ids = tensors["input_ids"]
    if "logits" in tensors:
        report.comparisons.append(_compare("logits", model.infer(ids, None, controls).logits, tensors["logits"], _tolerance(golden, "logits_fp32")))
    else:
        report.missing.append("logits")
    if "greedy_ids" in tensors:
        expected = tensors["greedy_ids"][0].tolist()
        step_logits = forced_decode(model, ids, expected, controls)
        got = step_logits.argmax(-1).tolist()
        report.greedy_ids, report.expected_greedy_ids = got, expected
        report.greedy_ids_match = got == expected
        if "greedy_step_logits" in tensors:
            report.comparisons.append(_compare("greedy_step_logits", step_logits[None], tensors["greedy_step_logits"],
                                               _tolerance(golden, "greedy_step_logits_fp32")))
        else:
            report.missing.append("greedy_step_logits")
    else:
        report.missing += ["greedy_ids", "greedy_step_logits"]
    return report
