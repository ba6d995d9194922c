"""The fused CPU decode step of a pre-norm GQA transformer (Axiom): one token through one C++ op
(csrc/dense_step.cpp), offered to graphs.decode_step as an alternative to compiling the step with inductor.

Why: Axiom-380M's compiled int8 step took ~15.5 ms on a 2-vCPU Zen 4, of which ~12.5 ms were the products
(reading the weights at memory speed) and ~3 ms everything else: inductor's Python wrapper calling ~100 ops and
kernels a step, dynamo's guards, a dozen small kernels a layer and each op's dispatch. llama.cpp's Q8_0 step
took ~14.8 ms. Here the layer loop, norms, RoPE, cache writes, SiLU and residual adds run in C++ between the
very products the modules call, so a step costs its products plus tens of microseconds. No compiler run, no
compile cache: the step is ready as soon as the extension is (built once per machine, cpu_gemv.py).

What it reads from the model: `ArchModel.dense_layout()` (the architecture names its norms, its four products
a layer and its attention shape), and for each product the path the kernel choice and quantization left on the
module (`describe`). Anything the op does not run the way the module would (a bias, oneDNN-prepacked weights,
bf16 tiles for one row, a norm in another dtype) makes `build` return None with the reason, and the step stays
the compiled or eager one. Numerics are the eager modules' (the same rounding points) within the dtype's
tolerance: tests/engine/test_dense_step.py.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from . import cpu_gemv
from .arch.base import Forward
from .generate import roll_back
from .layers import CpuLinear, PackedLinear, RMSNorm, RopeTable
from .quant import QuantLinear, head_weight
from .state import KVState, StateList

log = logging.getLogger(__name__)

#: Why `build` returns None for an architecture without a fused step.
NO_LAYOUT = "the architecture has no fused step"
#: Product kinds of csrc/dense_step.cpp (enum Kind).
GEMV, LINEAR, INT8, INT8_ATEN, INT4, INT4_ATEN = range(6)


@dataclass(frozen=True)
class DenseLayout:
    """What an architecture hands the fused step (ArchModel.dense_layout).

    norms: attn_norm and ffn_norm of each layer, then the final norm; products: wqkv (q | k | v rows), wo, w13
    (gate | up rows) and w2 of each layer; rope: the interleaved-pair RoPE table; embed: the token lookup.
    """

    n_heads: int
    n_kv: int
    head_dim: int
    ffn_dim: int
    norms: list[RMSNorm]
    products: list[nn.Module]
    attention: list[Any]
    rope: RopeTable
    embed: nn.Module


class Unsupported(ValueError):
    """A module the fused step cannot run as the module itself would."""


def describe(m: nn.Module | None, weight: torch.Tensor | None = None, options: Mapping[str, Any] | None = None
             ) -> tuple[int, int, int, int, torch.Tensor, torch.Tensor]:
    """(kind, level, group, out features, weight, scales) of the one-row product module `m` runs; for the head,
    `m` is its quantized module or None, `weight` the float head and `options` the kernel choice's cpu_linear
    options for it (model.head_product)."""
    none = torch.empty(0)
    if isinstance(m, QuantLinear):
        if m.bias is not None:
            raise Unsupported("a quantized product with a bias")
        if m.mode == "int8":
            if m.in_features % 16:
                raise Unsupported("an int8 width that is not a multiple of 16")
            kind = INT8 if m.gemv > 0 else INT8_ATEN
            return kind, max(m.gemv, 0), 0, m.out_features, m.packed, m.scales
        if m.layout == "nibbles":
            return INT4, m.gemv, m.group_size, m.out_features, m.packed, m.scales
        return INT4_ATEN, 0, m.group_size, m.out_features, m.packed, m.scales
    if isinstance(m, PackedLinear):
        raise Unsupported("oneDNN-prepacked weights")
    if m is not None:
        if not isinstance(m, nn.Linear) or m.bias is not None:
            raise Unsupported(f"a {type(m).__name__} product" + (" with a bias" if getattr(m, "bias", None) is not None else ""))
        weight = m.weight
        options = {"gemv": m.gemv, "decode_tiles": m.decode_tiles} if isinstance(m, CpuLinear) else {}
    options = options or {}
    if weight is None or weight.is_mkldnn or weight.dim() != 2:
        raise Unsupported("a head without a plain weight matrix")
    if options.get("decode_tiles") and weight.dtype == torch.bfloat16:
        raise Unsupported("bf16 tiles for one row")
    gemv = options.get("gemv", -1)
    if gemv > 0:
        if not weight.is_contiguous():
            raise Unsupported("our product on a column-major weight")
        return GEMV, gemv, 0, weight.shape[0], weight, none
    return LINEAR, 0, 0, weight.shape[0], weight, none


def _head(model: nn.Module) -> tuple[int, int, int, int, torch.Tensor, torch.Tensor]:
    """describe() for the head project_head would run."""
    quantized = model._modules.get("quant_head")
    if quantized is not None:
        return describe(quantized)
    found = head_weight(model)
    if found is None:
        raise Unsupported("no head weight")
    product = model.__dict__.get("head_product")
    options = getattr(product, "keywords", None) if product is not None else {}
    if options is None:
        raise Unsupported("a head product of its own")
    return describe(None, found[1], options)


class DenseStep:
    """model.infer for one token through csrc/dense_step.cpp; prompts (more than one token) and anything after a
    failure of the op run eager (one log line), so a reply never dies of the fused step."""

    backend = "fused C++ step"

    def __init__(self, model: nn.Module, layout: DenseLayout, op: Any) -> None:
        self.model, self.layout, self._op = model, layout, op
        self._bound: StateList | None = None
        self.failed: str | None = None

    def _bind(self, state: StateList) -> None:
        layers = list(state)
        if len(layers) != len(self.layout.attention) or not all(isinstance(s, KVState) for s in layers):
            raise Unsupported("a state that is not one KV cache a layer")
        self._op.bind([s.k for s in layers], [s.v for s in layers])
        self._bound = state

    def __call__(self, ids: torch.Tensor, state: StateList, controls: Mapping[str, Any] | None = None,
                 cancel: threading.Event | None = None, last_only: bool = True) -> Forward:
        if self.failed or ids.shape[1] != 1 or ids.shape[0] != 1:
            return self.model.infer(ids, state, controls, cancel, last_only=last_only)
        state.check_room(1)
        length = state.length
        try:
            if state is not self._bound:
                self._bind(state)
            x = self.layout.embed(ids)
            cos, sin = self.layout.rope(length, 1, ids.device)
            logits = self._op.step(x, cos, sin, length)
        except Exception as e:  # noqa: BLE001 - any failure of the op: eager from here on
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            log.warning("the fused decode step failed, running eager from now on (%s)", self.failed)
            roll_back(state, length)
            return self.model.infer(ids, state, controls, cancel, last_only=last_only)
        state.advance(1)
        return Forward(logits)


def build(model: nn.Module, device: torch.device, dtype: torch.dtype) -> tuple[DenseStep | None, str]:
    """The fused step for `model` as loaded (kernel choice and quantization applied), or None and why not."""
    layout_of = getattr(model, "dense_layout", None)
    layout = layout_of() if layout_of is not None else None
    if layout is None:
        return None, NO_LAYOUT
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return None, "the fused step runs bf16 or fp32 on a CPU"
    if not cpu_gemv.load():
        return None, f"our CPU extension is unavailable ({cpu_gemv.error()})"
    try:
        norms = layout.norms
        eps = {n.eps for n in norms}
        if len(eps) != 1 or any(n.zero_centered or n.weight.dtype != dtype for n in norms):
            raise Unsupported("norms with different eps, zero-centred weights or another dtype")
        levels = {a.decode_attention for a in layout.attention}
        if len(levels) != 1:
            raise Unsupported("layers with different decode attentions")
        parts = [describe(m) for m in layout.products] + [_head(model)]
    except Unsupported as e:
        return None, f"not fused: {e}"
    op = torch.classes.smollchat_cpu.DenseStep(
        layout.n_heads, layout.n_kv, layout.head_dim, layout.ffn_dim, float(eps.pop()), int(levels.pop()),
        [n.weight.detach().contiguous() for n in norms], [p[4].detach() for p in parts], [p[5].detach() for p in parts],
        [int(v) for p in parts for v in p[:4]])
    return DenseStep(model, layout, op), "fused"
