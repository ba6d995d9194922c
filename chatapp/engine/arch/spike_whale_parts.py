"""SpikeWhaleLM's residual-stream parts: the engram n-gram memory and the hyper-connections.

Spec: shared/specs/byrne.md §4.7-4.8. The bodies of these modules were never seen in the reference
(`model_v2.py`); what is here is the card stand-in's reading (fixtures/byrne) with the uncertain facts
named as reading options (`spike_whale.OPTIONS`). Checked against fixtures/byrne only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..state import LayerState


def param_key(*params: torch.Tensor) -> tuple:
    """Identity of parameter values, for caches derived from them: a reload replaces the tensors, an
    in-place edit bumps their version (inference tensors, from a load under inference_mode, keep none).

    Inside a compiled decode step (graphs.py) the caches are read as they are, unchecked:
    dynamo cannot trace is_inference() or a version counter, and the step only ever runs after an eager
    prefill has filled them, on weights that do not change while the compiled step lives (a reload builds a
    new model and a new step). Same tensors, so the same numerics as eager."""
    return tuple((id(p), p.data_ptr(), p.dtype, p.device, 0 if p.is_inference() else p._version) for p in params)


class EngramWindow(LayerState):
    """The engram's look-back across forwards: compressed features of the last (max_ngram - 1) tokens.

    Layout [B, W - 1, C], fp32 (the bucket bits are hard signs of these values). Constant size, so it
    cannot drop tokens: a model holding it restores snapshots instead of trimming.
    """

    kind = "conv"

    def __init__(self, width: int, channels: int, device, batch: int = 1) -> None:
        super().__init__()
        self.tail = torch.zeros(batch, width - 1, channels, device=device, dtype=torch.float32)

    def buffers(self) -> list[torch.Tensor]:
        return [self.tail]


class EngramMemory(nn.Module):
    """Hash-table n-gram memory injected into the token embeddings (stand-in reading, spec §4.7).

    A frozen linear compressor maps each embedding to C features. For every lookup l (hash head g,
    n-gram order m in 2..max_ngram) the features of the m tokens ending at t are projected to `bits`
    values whose signs form a bucket of table l. The rows found are averaged, projected, and added
    through a scalar gate computed from [x; e]. Everything runs in fp32: a rounding can flip a sign bit.
    """

    def __init__(self, a) -> None:
        super().__init__()
        self.a = a
        self.width = a.engram_max_ngram
        self.orders = list(range(2, a.engram_max_ngram + 1))
        self.n_lookups = a.engram_num_heads * len(self.orders)
        self.bits = int(math.log2(a.engram_table_size))
        if 2 ** self.bits != a.engram_table_size:
            raise ValueError(f"engram_table_size {a.engram_table_size} is not a power of two")
        c, h = a.engram_compress_dim, a.hidden_size
        self.compressor = nn.Linear(h, c, bias=False)
        # proj[l, k]: the projection applied to the k-th token of lookup l's n-gram (order of k: an option).
        self.proj = nn.Parameter(torch.randn(self.n_lookups, self.width, self.bits, c) / math.sqrt(c))
        self.tables = nn.Embedding(self.n_lookups * a.engram_table_size, h)
        self.gate = nn.Linear(2 * h, 1)
        self.out_proj = nn.Linear(h, h, bias=False)
        self._selector: tuple | None = None
        self._weight: tuple | None = None

    def lookup_orders(self) -> list[int]:
        """The n-gram order of each lookup l, in the layout of `proj` and `tables` (an option)."""
        heads = self.a.engram_num_heads
        if self.a.engram_lookup_layout == "head_major":
            return [m for _ in range(heads) for m in self.orders]
        return [m for m in self.orders for _ in range(heads)]

    def _select(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Constant tables (cached per option set): selector [W, L, W] mapping window slot w (oldest
        first) of lookup l to its proj index k, the bit weights and each lookup's first row."""
        key = (self.a.engram_key_order, self.a.engram_lookup_layout, self.a.engram_bit_order, device)
        if self._selector is None or self._selector[0] != key:
            w = self.width
            sel = torch.zeros(w, self.n_lookups, w)
            for l, m in enumerate(self.lookup_orders()):
                for k in range(m):
                    slot = w - 1 - k if self.a.engram_key_order == "newest_first" else w - m + k
                    sel[slot, l, k] = 1.0
            pow2 = 2.0 ** torch.arange(self.bits, dtype=torch.float32)
            if self.a.engram_bit_order == "msb_first":
                pow2 = pow2.flip(0)
            offsets = torch.arange(self.n_lookups) * self.a.engram_table_size
            self._selector = (key, sel.to(device), pow2.to(device), offsets.to(device))
        return self._selector[1:]

    def code_weight(self, device: torch.device) -> torch.Tensor:
        """proj placed on the window slots, [C * W, L * bits]: one GEMM computes every lookup's code.
        Cached: it changes only with the weights or the reading options."""
        if torch.compiler.is_compiling() and self._weight is not None:
            return self._weight[1]  # a compiled step reads the cache as it is (param_key)
        sel, _, _ = self._select(device)
        key = (self._selector[0], param_key(self.proj))
        if self._weight is None or self._weight[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                w = torch.einsum("lkjc,slk->cslj", self.proj.float(), sel)
                self._weight = (key, w.reshape(-1, self.n_lookups * self.bits).contiguous())
        return self._weight[1]

    def forward(self, x: torch.Tensor, window: EngramWindow | None, start: int) -> torch.Tensor:
        """x [B, T, H] embeddings at absolute positions start.. -> the gated delta to add to them (fp32)."""
        b, t, _ = x.shape
        w, nl, bits = self.width, self.n_lookups, self.bits
        xf = x.float()
        # Weights read as fp32 whatever the module was cast to (`.float()` is free when they already are).
        comp = F.linear(xf, self.compressor.weight.float())  # [B, T, C]
        tail = window.tail if window is not None else comp.new_zeros(b, w - 1, comp.shape[-1])
        ctx = torch.cat([tail, comp], dim=1)  # [B, W - 1 + T, C]
        if window is not None:
            window.tail.copy_(ctx[:, -(w - 1):])
        _, pow2, offsets = self._select(x.device)
        # One GEMM for all lookups: the window [B, T, C, W] of each position against proj on its slots.
        codes = ctx.unfold(1, w, 1).reshape(b, t, -1) @ self.code_weight(x.device)  # [B, T, L * bits]
        bucket = ((codes.view(b, t, nl, bits) > 0).float() @ pow2).long()  # [B, T, L]
        if start < w - 1:
            # Positions whose n-gram starts before the sequence read row 0 of their table.
            pos = torch.arange(start, start + t, device=x.device)[:, None]
            need = torch.tensor(self.lookup_orders(), device=x.device) - 1
            bucket = bucket.masked_fill(pos < need, 0)
        e = F.embedding(bucket + offsets, self.tables.weight.float())  # [B, T, L, H]
        e = e.mean(2) if self.a.engram_reduce == "mean" else e.sum(2)
        z = F.linear(torch.cat([xf, e], dim=-1), self.gate.weight.float(), self.gate.bias.float())
        g = torch.sigmoid(z) if self.a.engram_gate == "sigmoid" else 0.5 * (1.0 + torch.erf(z))
        return g * F.linear(e, self.out_proj.weight.float())


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Doubly stochastic matrix from exp(logits) by alternating row and column normalisations."""
    m = logits.exp()
    for _ in range(iters):
        m = m / (m.sum(-1, keepdim=True) + eps)
        m = m / (m.sum(-2, keepdim=True) + eps)
    return m


class HyperConnection(nn.Module):
    """One hyper-connection site (before attention or before the FFN) over n residual streams.

    Streams are stream-major, [n, B, T, H] (the reference's stream axis is dim 1, [B, n, T, H]; putting it
    first makes every mix below a plain 2-D matmul over a contiguous [n, B*T*H] view). `pre_op` reads one
    input [B, T, H] from the streams; `post_op` mixes them and writes the sublayer output back into each.
    Static form (stand-in): mixes are parameters, pre = sigmoid(pre_logits), post = 2 sigmoid(post_logits),
    res = Sinkhorn(exp(res_logits)), X'_s = sum_r res[s, r] X_r + post_s y. Dynamic form (DeepSeek-V4 mHC):
    the three mixes are computed per token from the RMS-normalised flattened streams (fn, base, scale),
    X'_j = sum_i comb[i, j] X_i + post_j y.
    """

    def __init__(self, a) -> None:
        super().__init__()
        n = a.hc_mult
        self.n, self.iters, self.eps, self.norm_eps = n, a.hc_sinkhorn_iters, a.hc_eps, a.rms_norm_eps
        self.dynamic = a.hc_form == "dynamic"
        if self.dynamic:
            self.fn = nn.Parameter(torch.zeros((2 + n) * n, n * a.hidden_size))
            self.base = nn.Parameter(torch.zeros((2 + n) * n))
            self.scale = nn.Parameter(torch.ones(3))
        else:
            self.pre_logits = nn.Parameter(torch.zeros(n))
            self.post_logits = nn.Parameter(torch.zeros(n))
            self.res_logits = nn.Parameter(torch.zeros(n, n))
        self._mix: tuple | None = None

    def static_mixes(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre [n], post [n, 1], res [n, n] in `dtype`, rebuilt only when the parameters change:
        thirty-two Sinkhorn loops per decode step would cost more than the layers' matmuls."""
        if torch.compiler.is_compiling() and self._mix is not None and self._mix[0][0] == dtype:
            return self._mix[1:]  # a compiled step reads the cache as it is (param_key)
        key = (dtype, param_key(self.pre_logits, self.post_logits, self.res_logits))
        if self._mix is None or self._mix[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                pre = torch.sigmoid(self.pre_logits.float())
                post = 2.0 * torch.sigmoid(self.post_logits.float())
                res = sinkhorn(self.res_logits.float(), self.iters, self.eps)
                self._mix = (key, pre.to(dtype), post[:, None].to(dtype), res.to(dtype))
        return self._mix[1:]

    def dynamic_mixes(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pre [B, T, n], post [B, T, n], comb [B, T, n, n] from the streams [n, B, T, H], in fp32."""
        n = self.n
        flat = streams.permute(1, 2, 0, 3).flatten(2).float()  # [B, T, n * H], stream-major per token
        mixes = F.linear(flat, self.fn.float()) * torch.rsqrt(flat.square().mean(-1, keepdim=True) + self.norm_eps)
        scale, base = self.scale.float(), self.base.float()
        pre = torch.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + self.eps
        post = 2.0 * torch.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
        comb = (mixes[..., 2 * n:] * scale[2] + base[2 * n:]).unflatten(-1, (n, n))
        comb = comb.softmax(-1) + self.eps
        comb = comb / (comb.sum(-2, keepdim=True) + self.eps)
        for _ in range(self.iters - 1):
            comb = comb / (comb.sum(-1, keepdim=True) + self.eps)
            comb = comb / (comb.sum(-2, keepdim=True) + self.eps)
        return pre, post, comb

    def pre_op(self, streams: torch.Tensor) -> tuple[torch.Tensor, object]:
        """streams [n, B, T, H] -> (sublayer input [B, T, H], what post_op needs)."""
        n = streams.shape[0]
        if self.dynamic:
            pre, post, comb = self.dynamic_mixes(streams)
            x = torch.einsum("btn,nbth->bth", pre, streams.float()).to(streams.dtype)
            return x, (post, comb)
        pre, post, res = self.static_mixes(streams.dtype)
        return (pre @ streams.reshape(n, -1)).view(streams.shape[1:]), (post, res)

    def post_op(self, streams: torch.Tensor, y: torch.Tensor, ctx: object) -> torch.Tensor:
        """Mix the streams [n, B, T, H] and add the sublayer output y [B, T, H] to each -> new streams."""
        n = streams.shape[0]
        if self.dynamic:
            post, comb = ctx
            mixed = torch.einsum("btij,ibth->jbth", comb, streams.float())
            return (mixed + post.permute(2, 0, 1)[..., None] * y.float()).to(streams.dtype)
        post, res = ctx
        mixed = res @ streams.reshape(n, -1)  # [n, B*T*H]
        return torch.addcmul(mixed, post, y.reshape(1, -1)).view(streams.shape)


class HCOutputMix(nn.Module):
    """Streams [n, B, T, H] -> one: a learned softmax mix over the streams ("init == mean", spec §4.1 step 6)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.weight.float(), dim=0).to(streams.dtype)
        return (w @ streams.reshape(streams.shape[0], -1)).view(streams.shape[1:])
