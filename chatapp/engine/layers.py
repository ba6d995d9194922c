"""Pieces shared by two or more architectures: RMSNorm, RoPE tables and layouts, masked attention, the
CPU Linear (bf16 tiles, our GEMV), the oneDNN-prepacked Linear, and the sanitize and demo-init helpers.

Layout is [B, T, H, D] throughout.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = w * cast(x * rsqrt(mean(x^2) + eps)), normalised in fp32.

    `zero_centered=True` stores w around 0 and applies (1 + w) (Gemma/Genesis/OdinNext style).
    """

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self.zero_centered)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """RMSNorm over the last dim; the weight multiplies after the cast back (Llama/Axiom order)."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if weight is None:
        return y
    return y * (1.0 + weight) if zero_centered else y * weight


class RopeTable:
    """cos and sin of position x inverse frequency, fp32 [P, dim/2], for every architecture that rotates.

    One precision policy: angles are computed in fp64 and the table stored in fp32; the rotation itself runs
    in fp32 and casts back (apply_rope_*). A product position x inv_freq rounded to fp32 is off by up to
    6e-8 of the angle (1.2e-4 rad at position 2,047, 2.4e-4 at 4,095), an error every later token would
    carry; in fp64 only the final cos/sin are rounded, which costs nothing since the table is built once per
    device (and grown in blocks when a forward runs past it). Not a module buffer: it is never saved.
    """

    def __init__(self, dim: int, theta: float, n_pos: int = 0) -> None:
        self.dim, self.theta, self.n_pos = dim, theta, n_pos
        self.cos = self.sin = None

    def __call__(self, start: int, t: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [t, dim/2] for positions start .. start + t - 1."""
        device = torch.device(device)
        if self.cos is None or self.cos.device != device or self.cos.shape[0] < start + t:
            n = max(self.n_pos, -(-(start + t) // 256) * 256)
            inv = 1.0 / self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float64) / self.dim)
            ang = torch.outer(torch.arange(n, dtype=torch.float64), inv)
            self.cos, self.sin = ang.cos().float().to(device), ang.sin().float().to(device)
        return self.cos[start:start + t], self.sin[start:start + t]


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2j], x[2j+1]) by the angles; x [B, T, H, D], cos/sin [T, D/2]. Computed in fp32."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[j], x[j + D/2]) (HF-Llama "rotate_half" layout); shapes as above."""
    xf = x.float()
    half = xf.shape[-1] // 2
    x0, x1 = xf[..., :half], xf[..., half:]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).to(x.dtype)


class PartialRope:
    """RoPE on `rotated` of a head's `dim` dims, starting at `offset`, as one right-multiplication per position:
    rope(x) = x @ M_p with M_p = diag(cos_p) + R diag(sin_p), where cos is 1 and sin 0 on the dims that pass
    through and R is the signed pair permutation of the layout ("half_split": pairs (i, i + r/2);
    "interleaved": (2i, 2i + 1)). One batched matmul per tensor instead of slicing, rotating and concatenating
    (Genesis and Byrne rotate part of each head). Angles from a RopeTable; the product runs in fp32.
    """

    def __init__(self, dim: int, rotated: int, theta: float, n_pos: int = 0, offset: int = 0,
                 layout: str = "half_split") -> None:
        if layout not in ("half_split", "interleaved"):
            raise ValueError(f"unknown RoPE layout {layout!r}; use half_split or interleaved")
        self.table = RopeTable(rotated, theta, n_pos)
        self.dim, self.offset, self.layout = dim, offset, layout
        self._full: tuple[torch.Tensor, ...] | None = None  # (table.cos it came from, cos, sin [P, dim], R)

    def matrices(self, start: int, t: int, device) -> torch.Tensor:
        """M [t, dim, dim] (fp32) for positions start .. start + t - 1."""
        self.table(start, t, device)
        if self._full is None or self._full[0] is not self.table.cos:
            self._full = (self.table.cos, *self._widen(self.table.cos, self.table.sin))
        _, cos, sin, rot = self._full
        cos, sin = cos[start:start + t], sin[start:start + t]
        return torch.diag_embed(cos) + rot * sin[:, None, :]

    def _widen(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Full-width cos/sin tables [P, dim] in the layout, and R [dim, dim]."""
        half, off = cos.shape[-1], self.offset
        idx = torch.arange(half, device=cos.device)
        if self.layout == "half_split":
            cos, sin, first, second = cos.repeat(1, 2), sin.repeat(1, 2), idx, idx + half
        else:
            cos, sin = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
            first, second = 2 * idx, 2 * idx + 1
        after = self.dim - off - 2 * half
        rot = torch.zeros(self.dim, self.dim, device=cos.device)
        # (x @ R)[first] = -x[second], (x @ R)[second] = x[first]
        rot[off + second, off + first] = -1.0
        rot[off + first, off + second] = 1.0
        return F.pad(cos, (off, after), value=1.0), F.pad(sin, (off, after)), rot


def apply_rope_matrices(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] times its position's M [T, D, D] (PartialRope.matrices), in fp32, back in x's dtype."""
    return torch.matmul(x.float(), m).to(x.dtype)


class CachedAttention:
    """What kernels.py needs of an attention module that calls causal_attention over a KV cache: its head shape
    (query heads, kv heads, key and value widths), and `decode_attention`, the level of our decode attention its
    one-token calls take (0: PyTorch's SDPA; set by kernels.apply from the kernel choice)."""

    decode_attention = 0

    def attention_heads(self) -> tuple[int, int, int, int]:
        raise NotImplementedError


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     keep: torch.Tensor | None = None, product: int = 0) -> torch.Tensor:
    """Attention of T new queries over L cached keys (the last T of which are the queries' own).

    q [B, T, H, D]; k, v [B, H_kv, L, D] (v may have its own last dim) with H a multiple of H_kv: query head h
    uses kv head h // (H / H_kv). The causal mask is aligned bottom-right (query i sits at position L - T + i),
    so a chunk appended to a cache sees the whole prefix. `keep` [L] bool, when given, also hides the keys it
    marks False (Huginn's cache lookups). Returns [B, T, H, Dv]. `product` > 0: one unmasked query on a CPU
    takes our own decode attention at that level (cpu_gemv.ATTENTION, where the kernel choice measured it faster
    than SDPA: on a Zen 4, ~50-220 us a call for SDPA at 64-1,024 cached tokens).
    """
    b, t, h, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    rep = h // hkv
    mask = None
    if t > 1 and (t != length or keep is not None):
        rows = torch.arange(length - t, length, device=q.device)[:, None]
        mask = torch.arange(length, device=q.device)[None, :] <= rows
    if keep is not None:
        mask = keep[None, :] if mask is None else mask & keep[None, :]
    if t == 1:
        # One query sees every cached key: fold the rep query heads of each kv head into query rows (a view)
        # instead of copying the whole cache rep times (repeat_interleave: ~2 ms a token for Axiom on CPU).
        if product > 0 and mask is None and q.device.type == "cpu":
            o = torch.ops.smollchat_cpu.decode_attention(q.view(b, hkv, rep, d), k, v,
                                                         d ** -0.5 if scale is None else scale, product)
        else:
            o = F.scaled_dot_product_attention(q.view(b, hkv, rep, d), k, v, attn_mask=mask, scale=scale)
        return o.view(b, 1, h, v.shape[-1])
    # enable_gqa broadcasts K/V to the query heads inside SDPA: no repeated copy (same values, measured no slower).
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask, is_causal=mask is None,
                                       scale=scale, enable_gqa=rep > 1)
    return o.transpose(1, 2)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), where oneDNN's bf16 GEMM beats any
    upcast: 128 x 1024 x 5632 takes 4.1 ms in bf16 against 16.6 ms upcast on a Zen 4 (avx512_bf16)."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers; without them assume no
        return False


def cpu_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, tile: int = 128,
               decode_tiles: bool = False, prefill_tiles: bool = True, gemv: int = -1) -> torch.Tensor:
    """F.linear on a CPU by the product the kernel choice picked (kernels.py, per machine): for one row, our
    own GEMV at instruction level `gemv` where it is 1 or 2 (cpu_gemv.py); for a bf16 weight, fp32 tiles of the
    weight (`prefill_tiles` for calls of more than two rows, `decode_tiles` for one or two).

    On a CPU without bf16 instructions bf16 F.linear costs about one GEMV per row (35840 x 5280, 2-core AVX2:
    35 ms for 1-2 rows, 88 ms for 5, 282 ms for 16; 128 x 1024 x 3072: 39 ms), so the tiled path converts
    128-row tiles of the weight to fp32 while they are hot in cache and multiplies in fp32: 69 ms for 5 rows,
    96 for 16, 245 for 64 on the first shape, without the whole-weight fp32 copy (600 ms and the weight's
    size again per call). The product is rounded to bf16 as F.linear's is.
    """
    rows = x.numel() // x.shape[-1]
    if gemv > 0 and rows == 1:
        y = torch.ops.smollchat_cpu.gemv(x, w, gemv)
        return y if bias is None else y + bias
    tiled = prefill_tiles if rows > 2 else decode_tiles
    if not tiled or w.dtype != torch.bfloat16 or w.device.type != "cpu":
        return F.linear(x, w, bias)
    xf = x.reshape(rows, -1).float()
    out = torch.empty(rows, w.shape[0], device=x.device)
    for i in range(0, w.shape[0], tile):
        torch.mm(xf, w[i:i + tile].float().t(), out=out[:, i:i + tile])
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], w.shape[0])


class CpuLinear(nn.Linear):
    """nn.Linear through cpu_linear (same parameters); kernels.apply sets which calls take which product."""

    decode_tiles = False
    prefill_tiles = True
    gemv = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear(x, self.weight, self.bias, decode_tiles=self.decode_tiles,
                          prefill_tiles=self.prefill_tiles, gemv=self.gemv)


# oneDNN-prepacked weights (kernels.py measures them against the plain layouts per machine).
#
# A prepacked weight is an opaque oneDNN tensor (layout torch._mkldnn, no storage): inductor cannot lower a
# product by one that a module holds, nor fake one, so the product is a custom op that names its weight by a
# string key and finds it in `_PACKED`. The key is "<slot>/<module name>", slot the lowest number no other
# live model holds: the same on every load of one model, so the compiled step's on-disk cache (whose graphs
# hold the key as a constant) is reused. The registry holds weak references; the module holds the weight.
_PACKED: dict[str, weakref.ref] = {}
_SLOTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@functools.lru_cache(maxsize=None)
def packed_available(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU prepack `dtype` weights for oneDNN (torch 2.13 refuses bf16 on a CPU
    without avx512bw/vl/dq or avx_ne_convert) and the product matches F.linear on a small case."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        w = torch.randn(48, 32).to(dtype)
        x = torch.randn(3, 32).to(dtype)
        y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(w, None), None,
                                               "none", [], "")
        return bool(torch.allclose(y.float(), F.linear(x, w).float(), rtol=0.02, atol=0.02))
    except (RuntimeError, AttributeError):
        return False


def prepack(w: torch.Tensor) -> torch.Tensor:
    """A [out, in] CPU weight reordered into oneDNN's blocked layout for linear products."""
    return torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous(), None)


def packed_product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ b) for a prepacked W (`prepack`), any leading shape."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), w, bias, "none", [], "")
    return y.view(*x.shape[:-1], y.shape[-1])


@torch.library.custom_op("smollchat::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, key: str, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`packed_product` by the prepacked weight registered under `key` (register_packed)."""
    ref = _PACKED.get(key)
    w = ref() if ref is not None else None
    if w is None:
        raise RuntimeError(f"no prepacked weight {key!r}: its model was unloaded")
    return packed_product(x, w, bias)


@packed_linear.register_fake
def _packed_linear_fake(x, key, out_features, bias=None):
    return x.new_empty(*x.shape[:-1], out_features)


def model_slot(model: nn.Module) -> int:
    """The lowest slot number no other live model holds (the same model keeps its slot)."""
    for slot, held in list(_SLOTS.items()):
        if held is model:
            return slot
    slot = next(i for i in range(len(_SLOTS) + 1) if i not in _SLOTS)
    _SLOTS[slot] = model
    return slot


def register_packed(key: str, w: torch.Tensor) -> None:
    for k in [k for k, r in _PACKED.items() if r() is None]:
        del _PACKED[k]
    _PACKED[key] = weakref.ref(w)


class PackedLinear(nn.Linear):
    """nn.Linear whose weight parameter is prepacked for oneDNN (same shape and dtype, no storage), multiplied
    through the `packed_linear` op; kernels.apply swaps a Linear into one (`pack_linear`)."""

    key = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.key, self.out_features, self.bias)


def pack_linear(m: nn.Linear, key: str) -> None:
    """Turn `m` into a PackedLinear in place: its weight is replaced by the prepacked copy (the dense one freed)."""
    m.weight = nn.Parameter(prepack(m.weight), requires_grad=False)
    m.__class__ = PackedLinear
    m.key = key
    register_packed(key, m.weight)  # the parameter object: the module holds it, so the weak reference lives


@torch.no_grad()
def init_demo_normal(model: nn.Module, std: float = 0.02) -> None:
    """N(0, std) for every Linear and Embedding weight: the random demo checkpoint of an architecture without a
    reference init (OdinNext, Byrne). With nn's N(0, 1) embedding a tied head would mostly echo the last token
    (the residual stream is then the embedding itself)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.normal_(0.0, std)


def fuse(weights: dict[str, torch.Tensor], dst: str, srcs: list[str], squeeze: bool = False) -> None:
    """sanitize: concatenate the checkpoint tensors `srcs` along dim 0 into `dst` (the rows of a fused matmul,
    or the channels of fused depthwise convs, whose [C, 1, W] weights `squeeze` makes [C, W]). Idempotent:
    a dict without srcs[0] (our own state_dict) is left alone; one that has it but lacks another source
    raises KeyError naming it (the loader reports the missing tensor); sources whose shapes cannot be joined
    raise ValueError naming them."""
    if srcs[0] not in weights:
        return
    parts = [weights.pop(name) for name in srcs]
    parts = [w.squeeze(1) if squeeze else w for w in parts]
    if len({tuple(w.shape[1:]) for w in parts}) > 1:
        shapes = ", ".join(f"{name} {list(w.shape)}" for name, w in zip(srcs, parts))
        raise ValueError(f"cannot fuse {dst} from {shapes}: they differ beyond the first dimension")
    weights[dst] = torch.cat(parts)


def rename(weights: dict[str, torch.Tensor], src: str, dst: str) -> None:
    """sanitize: store the tensor `src` under `dst` when the checkpoint has it (idempotent)."""
    if src in weights and dst not in weights:
        weights[dst] = weights.pop(src)
