"""Weight-only int8/int4 linears on PyTorch's packed CPU kernels or ours, and their on-disk cache.

int8: one symmetric scale per output row, `aten._weight_int8pack_mm` (or our one-row products on the same rows,
cpu_gemv.py). int4: asymmetric groups of 128 (64 or 32 where the input width does not divide) along the input,
w = (q - 8) * scale + zero, in one of two layouts the kernel choice races on the running machine (kernels.py):
packed for `aten._weight_int4pack_mm_for_cpu` ("aten"), or our "nibbles" (quantize_int4), each row its own bytes,
multiplied by csrc/gemv.cpp's gemv_int4 (nibbles by x rounded to int8: on a Zen 4 it read Axiom-380M's int4
matrices at 27-36 GB/s where aten's product read 17-20) and, for many rows (prefill past UNPACK_ROWS; int8 rows
too), unpacked to bf16 a block of rows at a time for F.linear. aten's kernels take bf16 activations:
with fp32 ones they fall to a scalar path 4-13x slower on an AVX2 CPU (measured: 2048 x 1024 GEMV
int8 0.41 ms bf16 against 2.4 ms fp32), so a QuantLinear casts its input to bf16 and its output back.
Scales and zero points are rounded to bf16 before the weights are rounded to the grid, so the stored
grid is the one the kernel applies. Linears whose weights an architecture reads directly
(`QUANT_SKIP`) and layers too small to gain stay float, each with its reason in the report; the output
head (tied or not) is swapped through `ArchModel.project_head` where the architecture calls it. Token
embeddings become row lookups in an int8 table with one bf16 scale per row (`QuantEmbedding`), their float
table released: with a tied head in int8 the table *is* the head's packed weight (the same parameters, held
once); otherwise (int4, whose packed layout permutes each row, or an untied head) it is its own int8 copy.
In int8 mode the lookup adds a 4-bit residual (half a byte a value) so that it stays below the linears'
error: the golden fixtures' random-weight models amplify input noise ~10-20x, and a plain int8 lookup alone
moved Genesis's logits by 5 % (past its int8 bound); with the residual a looked-up value is within 1/32 of a
grid step (1/16 where a row's extreme value clamps). int4's own error is ten times larger, so there the plain
int8 rows suffice. The lookup thus holds 0.5 (tied int8), 1.5 (untied int8) or 1 (int4) bytes a value where
bf16 held 2. Embeddings an architecture reads directly (`QUANT_SKIP`) stay float.

The packed tensors are cached under smollchat's cache folder (never beside a checkpoint) keyed by the
checkpoint's sha256, the mode, the int4 layouts, the torch version and the CPU capability, so a second load skips
the rounding and packing.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int4")
#: Kernel activation dtype (see the module docstring).
ACT = torch.bfloat16
#: int4 group sizes tried in order; the first that divides the input width wins.
GROUPS = (128, 64, 32)
#: Layers with fewer weights stay float: the kernel call costs more than the bytes it saves.
MIN_WEIGHTS = 4096
#: Bumped when the packed layout, the rounding or what is cached changes, so old cache entries are not reused
#: (2: int8 row tables of the token embeddings; 3: the int4 layout recorded per layer).
FORMAT = 3
#: int4 layouts: aten's packed one, or our nibbles (quantize_int4).
INT4_LAYOUTS = ("aten", "nibbles")
#: Up to `QuantLinear.unpack_rows` rows of x, our nibbles are multiplied by gemv_int4 itself (every row of x against
#: each block of weight rows read once), and int8 rows by aten's int8 product; more rows unpack the weights to bf16
#: for F.linear, at most UNPACK_BYTES at a time (where our extension runs). The kernel choice measures where the two
#: meet on the running machine, per class of matrix (kernels.py, a path's "unpackN" prefill); UNPACK_ROWS is the
#: crossing used where it was not measured (a choice recorded before, a forced one). Measured on a Zen 4 (2
#: threads): int4, the two met at 32-64 rows on Axiom's and Huginn's shapes (5632 x 1024 at 64 rows: 3.6 ms either
#: way; 17920 x 5280 at 16 rows: 29 ms against 64); int8 at 128 rows, aten's product 10.8 ms against 4.7 (5632 x
#: 1024), 4.8 against 2.1 (1024 x 2816). A CPU whose bf16 F.linear is slow (no bf16 instructions) meets later.
UNPACK_ROWS = 48
UNPACK_BYTES = 8 * 2**20
HEAD = "<head>"


class QuantError(ValueError):
    """A quantization request that cannot be met; the message says what to do instead."""


class QuantLinear(nn.Module):
    """y = x W^T (+ b) with W stored int8 per row or int4 per group, on aten's packed CPU kernels or ours.

    The packed weight and its scales are frozen parameters, so `weight_bytes()` counts what is held.
    int4 in aten's layout pads the output rows to a multiple of 16 (the packer's rule) and slices the padding off;
    in ours (`layout` "nibbles") up to `unpack_rows` rows take gemv_int4 at level `gemv` (0: dequantized in fp32,
    portable), more rows F.linear on blocks of unpacked bf16 rows. An int8 layer's one-row calls take our own product
    at level `gemv` where the kernel choice measured it faster (kernels.apply_quantized; cpu_gemv.py), on the same
    int8 rows and scales, and then more than `unpack_rows` rows the unpacked bf16 blocks too.
    """

    gemv = -1
    #: Calls of more rows than this unpack the weights for F.linear (where our extension runs them: UNPACK_ROWS).
    unpack_rows = UNPACK_ROWS

    def __init__(self, mode: str, in_features: int, out_features: int, packed: torch.Tensor,
                 scales: torch.Tensor, group_size: int = 0, bias: torch.Tensor | None = None,
                 layout: str = "aten") -> None:
        super().__init__()
        self.mode, self.in_features, self.out_features, self.group_size = mode, in_features, out_features, group_size
        self.layout = layout if mode == "int4" else "aten"
        if self.layout == "nibbles":
            self.gemv = 0
        self.packed = nn.Parameter(packed, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def kind(self) -> str:
        if self.mode == "int8":
            return "int8"
        return f"int4/g{self.group_size}" + (" nibbles" if self.layout == "nibbles" else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(ACT).contiguous()
        if self.mode == "int8" and self.gemv > 0 and x2.shape[0] == 1:
            y = torch.ops.smollchat_cpu.gemv_int8(x2, self.packed, self.scales, self.gemv)
        elif self.mode == "int8" and self.in_features % 16:
            # torch 2.13's AVX-512 int8 kernel dies (SIGSEGV) on widths that are not a multiple of 16 (seen for
            # 2 and 4-34 rows on a Zen 4); such widths are the small test models', so they take the same
            # product in fp32 on every machine.
            y = F.linear(x2.float(), self.packed.float() * self.scales.float()[:, None]).to(ACT)
        elif self.mode == "int8" and self.gemv > 0 and x2.shape[0] > self.unpack_rows:
            y = self._unpacked_product(x2)
        elif self.mode == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.packed, self.scales)
        elif self.layout == "nibbles" and x2.shape[0] <= self.unpack_rows:
            y = torch.ops.smollchat_cpu.gemv_int4(x2, self.packed, self.scales, self.group_size, self.gemv)
        elif self.layout == "nibbles":
            y = self._unpacked_product(x2)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales)
            y = y[:, :self.out_features]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def _unpacked_product(self, x2: torch.Tensor) -> torch.Tensor:
        """Many rows of x: F.linear on bf16 blocks of the weight's rows (int4 nibbles or int8 rows), unpacked one block
        at a time (at most UNPACK_BYTES), so the full bf16 matrix is never held."""
        k = self.in_features
        step = max(16, UNPACK_BYTES // (2 * k))

        def block(n: int) -> torch.Tensor:
            if self.mode == "int8":
                return torch.ops.smollchat_cpu.int8_unpack(self.packed[n:n + step], self.scales[n:n + step], self.gemv)
            return torch.ops.smollchat_cpu.int4_unpack(self.packed[n:n + step], self.scales[n:n + step],
                                                       self.group_size, k, self.gemv)
        parts = [F.linear(x2, block(n)) for n in range(0, self.out_features, step)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind}"


class QuantEmbedding(nn.Module):
    """Token embedding read from an int8 table: row i is (packed[i] + r[i] / 16) * scales[i], returned in the
    float embedding's dtype. `packed` int8 [V, D] and `scales` bf16 [V] are quantize_int8's (the int8
    QuantLinear layout), so a tied int8 head and this lookup can hold the same two parameters; the optional
    `residual` uint8 [V, ceil(D/2)] holds r + 8 two to a byte, r in [-8, 7] (quantize_residual; r = 0 without).

    `weight` is an empty tensor of the float table's dtype: code that asks the embedding for its dtype still
    works, and anything that still reads the released float values fails loudly on its shape.
    """

    def __init__(self, packed: nn.Parameter, scales: nn.Parameter, residual: torch.Tensor | None,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.shape
        self.packed, self.scales = packed, scales
        self.residual = None if residual is None else nn.Parameter(residual, requires_grad=False)
        self.register_buffer("weight", torch.empty(0, dtype=dtype, device=packed.device), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.packed).float()
        if self.residual is not None:
            nib = F.embedding(ids, self.residual)
            rows += (torch.stack((nib & 15, nib >> 4), -1).flatten(-2)[..., :self.embedding_dim].float() - 8.0) / 16
        return (rows * self.scales[ids].float().unsqueeze(-1)).to(self.weight.dtype)

    def extra_repr(self) -> str:
        extra = " + 4-bit residual" if self.residual is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows{extra}"


def project_head(model: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An architecture's output projection, fp32 logits: its float head (F.linear, or the product the kernel
    choice installed as `model.head_product`), or the quantized copy `quantize_model` installed as
    `model.quant_head`."""
    q = model._modules.get("quant_head")
    if q is not None:
        return q(x).float()
    return model.__dict__.get("head_product", F.linear)(x, weight).float()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (int8 [N, K], bf16 scales [N]) with w ~= q * scale per row."""
    w = w.detach().float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-12).to(ACT)
    q = (w / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def quantize_residual(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What int8 rows (q, scale) leave of w, in sixteenths of a grid step: uint8 [N, ceil(K/2)], two 4-bit
    values r + 8 a byte (even columns in the low nibble), r = round(16 (w - q scale) / scale) in [-8, 7]."""
    s = scale.float()[:, None]
    r = ((w.detach().float() - q.float() * s) * 16 / s).round_().clamp_(-8, 7).to(torch.uint8) + 8
    if r.shape[1] % 2:
        r = torch.cat([r, torch.full_like(r[:, :1], 8)], 1)
    return (r[:, 0::2] | (r[:, 1::2] << 4)).contiguous()


def int4_grid(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int32 [N, K] in [0, 15], bf16 scale and zero [N, K/group]) with
    w ~= (q - 8) * scale + zero: asymmetric groups along the input, the scale and zero rounded to bf16 first so
    that q is the grid the kernels apply (both int4 layouts hold these same values)."""
    w = w.detach().float()
    n, k = w.shape
    g = w.reshape(n, k // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-12).to(ACT)
    zero = (lo + 8 * scale.float()).to(ACT)  # the kernels' zero point: w = (q - 8) * scale + zero
    q = ((g - (zero.float() - 8 * scale.float())[..., None]) / scale.float()[..., None]).round_().clamp_(0, 15)
    return q.to(torch.int32).reshape(n, k), scale, zero


def quantize_int4(w: torch.Tensor, group: int, layout: str = "aten") -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (packed, bf16 scale/zero) in `layout`:

    - "aten": packed uint8 [N16, K/2] for `aten._weight_int4pack_mm_for_cpu`, scale/zero [K/group, N16, 2],
      N16 = N rounded up to 16 (padding rows dequantize to 0);
    - "nibbles" (ours, csrc/gemv.cpp's gemv_int4): each row its own K128/2 bytes (K128 = K rounded up to 128), in
      every 64 bytes weight j of that span of 128 in the low nibble of byte j and weight 64 + j in the high one;
      scale/zero [N, K128/group, 2], one row's groups together. Padding weights and groups are zeros.
    """
    if layout not in INT4_LAYOUTS:
        raise QuantError(f"unknown int4 layout {layout!r}: one of {', '.join(INT4_LAYOUTS)}")
    q, scale, zero = int4_grid(w, group)
    n, k = q.shape
    if layout == "nibbles":
        k128 = -(-k // 128) * 128
        grid = torch.zeros(n, k128, dtype=torch.uint8)
        grid[:, :k] = q
        spans = grid.view(n, k128 // 128, 2, 64)
        packed = (spans[:, :, 0] | (spans[:, :, 1] << 4)).reshape(n, k128 // 2).contiguous()
        sz = torch.zeros(n, k128 // group, 2, dtype=ACT)
        sz[:, :k // group, 0], sz[:, :k // group, 1] = scale, zero
        return packed, sz
    n16 = -(-n // 16) * 16
    q = torch.cat([q, torch.full((n16 - n, k), 8, dtype=torch.int32)])  # padding rows dequantize to 0
    sz = torch.stack([scale, zero], -1).float()
    sz = torch.cat([sz, torch.zeros(n16 - n, k // group, 2)]).transpose(0, 1).contiguous().to(ACT)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), sz


def dequantize(layer: QuantLinear) -> torch.Tensor:
    """The float [N, K] weight a QuantLinear applies (tests and error reports)."""
    if layer.layout == "nibbles":
        return torch.ops.smollchat_cpu.int4_unpack(layer.packed, layer.scales, layer.group_size, layer.in_features,
                                                   layer.gemv).float()
    eye = torch.eye(layer.in_features, dtype=ACT)
    bias, layer.bias = layer.bias, None
    try:
        return layer(eye).float().t().contiguous()
    finally:
        layer.bias = bias


@dataclass
class QuantReport:
    """What a quantization did: per layer its kind ("int8", "int4/g128") or why it stayed float."""

    mode: str
    layers: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)
    cache: str = "none"  # "hit", "written", "miss" (not written), or "none" (no checkpoint to key it by)
    cache_path: str = ""

    def summary(self) -> str:
        kinds: dict[str, int] = {}
        for k in self.layers.values():
            kinds[k] = kinds.get(k, 0) + 1
        made = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
        return f"{self.mode}: {made or 'nothing'} quantized; {len(self.kept)} kept float; cache {self.cache}"


def _targets(model: nn.Module, kind: type = nn.Linear) -> tuple[list[tuple[str, nn.Module, str, nn.Module]],
                                                                 dict[str, str]]:
    """The linears (or embeddings: `kind`) to swap as (name, parent, attribute, module), and the ones kept with
    their reasons."""
    skip = tuple(getattr(model, "QUANT_SKIP", ()))
    out, kept = [], {}
    for pname, parent in model.named_modules():
        for attr, child in parent.named_children():
            name = f"{pname}.{attr}" if pname else attr
            if not isinstance(child, kind) or name == "lm_head":
                continue
            if name.startswith(skip):
                kept[name] = "the architecture reads this weight directly (QUANT_SKIP)"
            elif child.weight.numel() < MIN_WEIGHTS:
                kept[name] = f"{child.weight.numel()} weights: too small to gain from a packed kernel"
            else:
                out.append((name, parent, attr, child))
    return out, kept


def head_weight(model: nn.Module) -> tuple[str, torch.Tensor] | None:
    """The output head's weight: an untied `lm_head`, else the one embedding with a row per vocabulary id."""
    lm = getattr(model, "lm_head", None)
    if isinstance(lm, nn.Linear):
        return "lm_head", lm.weight
    vocab = getattr(model, "vocab_size", None)
    embeds = [(n, m.weight) for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab]
    return embeds[0] if len(embeds) == 1 else None


def _calls_project_head(model: nn.Module) -> bool:
    # The quantized head only replaces the float one where the architecture's code routes its logits
    # through ArchModel.project_head; any method of the architecture's own classes may do so.
    for cls in type(model).__mro__:
        if cls.__module__.startswith("torch.") or cls.__name__ == "ArchModel":
            continue
        for fn in vars(cls).values():
            code = getattr(fn, "__code__", None)
            if code is not None and "project_head" in code.co_names:
                return True
    return False


def _pack(mode: str, w: torch.Tensor, group_size: int | None,
          layout: str = "aten") -> tuple[str, torch.Tensor, torch.Tensor, int, str]:
    """(mode used, packed, scales, group, reason for a fallback to int8 or ""); int4 in `layout`."""
    if mode == "int4":
        k = w.shape[1]
        groups = (group_size,) if group_size else GROUPS
        group = next((g for g in groups if k % g == 0), 0)
        if group:
            packed, sz = quantize_int4(w, group, layout)
            return "int4", packed, sz, group, ""
        reason = f"int8: input width {k} is not a multiple of {' or '.join(map(str, groups))} (int4 groups)"
        q, s = quantize_int8(w)
        return "int8", q, s, 0, reason
    q, s = quantize_int8(w)
    return "int8", q, s, 0, ""


def quantize_model(model: nn.Module, mode: str, files: list[Path] | None = None,
                   group_size: int | None = None, choice: Any = None) -> QuantReport:
    """Swap the model's linears (and its head) for QuantLinear, in place; CPU only.

    `files` are the checkpoint's safetensors files: with them the packed tensors come from (or go to) the
    cache. Each float weight is released as its layer is swapped, so the peak is the float model plus one
    layer's working copies. `choice` (kernels.KernelChoice) names each class of matrix's int4 layout: a path
    whose layout is "nibbles" packs ours, any other aten's.
    """
    if mode not in MODES:
        raise QuantError(f"unknown quantization {mode!r}; use one of: {', '.join(MODES)} (or none)")
    if group_size is not None and group_size not in GROUPS:
        raise QuantError(f"int4 group size must be one of {GROUPS}; got {group_size}")
    dev = next((p.device for p in model.parameters()), torch.device("cpu"))
    if dev.type != "cpu":
        raise QuantError(f"--quantize {mode} runs on PyTorch's packed CPU kernels; load with --device cpu, "
                         "or drop --quantize on this device")
    report = QuantReport(mode)
    targets, report.kept = _targets(model)
    head = head_weight(model) if _calls_project_head(model) else None
    if head is None:
        report.kept["<head>"] = ("the architecture computes its logits without project_head" if not _calls_project_head(model)
                                 else "no single embedding or lm_head to take the head from")
    def layout(shape: tuple[int, int]) -> str:
        ours = mode == "int4" and choice is not None and choice.path_for(shape).layout == "nibbles"
        return "nibbles" if ours else "aten"

    layouts = {c: layout(shape) for c, shape in (("widening", (2, 1)), ("narrowing", (1, 2)))}
    path = cache_path(files, mode, group_size, layouts) if files else None
    cached = _read_cache(path) if path is not None else {}
    report.cache = "hit" if cached else ("miss" if path is not None else "none")
    fresh: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}

    def make(name: str, w: torch.Tensor, bias: torch.Tensor | None, mode: str = mode) -> QuantLinear:
        n, k = w.shape
        want = layout((n, k)) if mode == "int4" else "aten"
        hit = _from_cache(cached, name, n, k, want)
        if hit is not None:
            used, packed, scales, group, reason = hit
        else:
            used, packed, scales, group, reason = _pack(mode, w, group_size, want)
            fresh[name + ".packed"], fresh[name + ".scales"] = packed, scales
            meta[name] = json.dumps({"mode": used, "group": group, "n": n, "k": k, "reason": reason, "layout": want})
        if reason:
            report.kept[name] = reason
        layer = QuantLinear(used, k, n, packed, scales, group, bias, want)
        report.layers[name] = layer.kind
        return layer

    while targets:  # popped, so each float weight is freed once its layer is swapped
        name, parent, attr, lin = targets.pop(0)
        setattr(parent, attr, make(name, lin.weight, lin.bias))
        del lin
    if head is not None:
        hname, w = head
        model.quant_head = make(HEAD, w, None)
        report.layers[HEAD] = f"{model.quant_head.kind} (from {hname})"
        if hname == "lm_head":
            # The float head is no longer read: release it (a zero-size weight fails loudly if anything does).
            model.lm_head.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
        release = getattr(model, "release_float_head", None)
        if release is not None:
            release()  # a derived float copy of the head the architecture keeps (Byrne's bf16 tied head)
    embeds, kept = _targets(model, nn.Embedding)
    report.kept.update(kept)
    for name, parent, attr, emb in embeds:
        shared = model._modules.get("quant_head")
        if head is not None and head[1] is emb.weight and shared.mode == "int8":
            packed, scales = shared.packed, shared.scales  # the tied int8 head's table: no second copy
            report.layers[name] = f"int8 rows (the {HEAD} table) + 4-bit residual"
        else:
            table = make(name, emb.weight, None, "int8")
            packed, scales = table.packed, table.scales
            report.layers[name] = "int8 rows" + (" + 4-bit residual" if mode == "int8" else "")
            if mode != "int8":
                report.kept[name] = "int8 rows: a lookup reads whole rows, which the int4 packed layout permutes"
        key = name + ":residual"
        hit = cached.get(key)
        if mode != "int8":
            residual = None
        elif hit is not None and hit[1].shape[0] == emb.num_embeddings and torch.equal(hit[2], scales):
            residual = hit[1]
        else:
            residual = quantize_residual(emb.weight, packed, scales)
            # The scales it was made against (a copy: safetensors stores no tensor twice), checked on a hit.
            fresh[key + ".packed"], fresh[key + ".scales"] = residual, scales.detach().clone()
            meta[key] = json.dumps({"mode": "residual4", "n": emb.num_embeddings, "k": emb.embedding_dim})
        setattr(parent, attr, QuantEmbedding(packed, scales, residual, emb.weight.dtype))
        del emb
    if path is not None and fresh and not cached:
        _write_cache(path, fresh, meta)
        report.cache = "written"
    report.cache_path = str(path) if path else ""
    model.quant_report = report
    return report


# The cache.

def _hash_file(path: Path) -> str:
    """sha256 of a checkpoint file: a Hub blob's name is its sha256 already; other files are hashed once and
    remembered by path, size and mtime."""
    real = path.resolve()
    if re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    st = real.stat()
    memo_file = _cache_root() / "sha256.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    if key not in memo:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
        memo[key] = h.hexdigest()
        _atomic_write(memo_file, json.dumps(memo, indent=0).encode())
    return memo[key]


def _cache_root() -> Path:
    from ..locations import cache_dir

    d = cache_dir() / "quant"
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_path(files: list[Path], mode: str, group_size: int | None, layouts: dict[str, str] | None = None) -> Path:
    """Where the packed tensors of this checkpoint + quantization (+ int4 layout per class of matrix) + torch build
    live."""
    ident = {"sha256": sorted(_hash_file(Path(f)) for f in files), "mode": mode, "group": group_size,
             "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(), "format": FORMAT}
    if mode == "int4" and layouts and set(layouts.values()) != {"aten"}:
        ident["layouts"] = dict(sorted(layouts.items()))
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return _cache_root() / f"{key}.safetensors"


def _read_cache(path: Path) -> dict[str, tuple[dict, torch.Tensor, torch.Tensor]]:
    if not path.exists():
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            return {name: (json.loads(info), f.get_tensor(name + ".packed"), f.get_tensor(name + ".scales"))
                    for name, info in meta.items()}
    except Exception:  # a damaged entry is rebuilt, never trusted
        return {}


def _from_cache(cached: dict, name: str, n: int, k: int, layout: str = "aten"):
    entry = cached.get(name)
    if entry is None:
        return None
    info, packed, scales = entry
    other_layout = info.get("mode") == "int4" and info.get("layout", "aten") != layout
    if (info.get("n"), info.get("k")) != (n, k) or other_layout:
        return None
    return info["mode"], packed, scales, int(info["group"]), info.get("reason", "")


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save

    _atomic_write(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
