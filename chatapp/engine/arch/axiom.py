"""Axiom-Dense (user-anto): pre-norm GQA transformer with interleaved RoPE and a SwiGLU FFN.

Spec: shared/specs/axiom.md. Checked against: github user-anto/Axiom-Dense-380M model.py @ b21f4004
(fixtures/axiom: full-forward logits, cached step logits, greedy ids).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import CachedAttention, RMSNorm, RopeTable, apply_rope_interleaved, causal_attention, fuse
from ..ops.norm import add_rms_norm
from ..quant import project_head
from ..state import KVState, StateList
from .base import MAX_LAYERS, ArchArgs, ArchModel


@dataclass
class ModelArgs(ArchArgs):
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim_multiplier: float = 2.6667
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    CONFIG_RANGES = {"n_layers": (1, MAX_LAYERS)}

    def __post_init__(self) -> None:
        self.head_dim = self.dim // self.n_heads
        # The authors truncate, then round the FFN width up to a multiple of 256 (spec §2.2).
        self.ffn_dim = (int(self.dim * self.ffn_dim_multiplier) + 255) // 256 * 256


class Attention(CachedAttention, nn.Module):
    def attention_heads(self) -> tuple[int, int, int, int]:
        return self.n_heads, self.n_kv, self.head_dim, self.head_dim

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.wqkv = nn.Linear(a.dim, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=False)
        self.wo = nn.Linear(a.n_heads * a.head_dim, a.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVState | None) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        q = apply_rope_interleaved(q.view(b, t, self.n_heads, hd), cos, sin)  # [B, T, H, D]
        k = apply_rope_interleaved(k.view(b, t, self.n_kv, hd), cos, sin)  # [B, T, Hkv, D]
        v = v.view(b, t, self.n_kv, hd)
        if kv is not None:
            k_all, v_all = kv.update(k, v)  # [B, Hkv, L, D]
        else:
            k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)
        return self.wo(causal_attention(q, k_all, v_all, product=self.decode_attention).reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.ffn_dim = a.ffn_dim
        self.w13 = nn.Linear(a.dim, 2 * a.ffn_dim, bias=False)  # gate | up, fused by sanitize
        self.w2 = nn.Linear(a.ffn_dim, a.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.ffn_dim, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(a.dim, a.norm_eps)
        self.attn = Attention(a)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.ffn = FeedForward(a)

    def forward(self, x, cos, sin, kv):
        n = self.ffn_norm  # the residual add and the FFN's norm: one fused kernel on CUDA (ops/norm)
        h, hn = add_rms_norm(x, self.attn(self.attn_norm(x), cos, sin, kv), n.weight, n.eps, n.zero_centered)
        return h + self.ffn(hn)


class Model(ArchModel):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        # Tied to embed unless the checkpoint carries a different head (sanitize decides).
        self.lm_head: nn.Linear | None = None
        self._rope = RopeTable(args.head_dim, args.rope_theta, args.max_seq_len)

    @property
    def max_context(self) -> int:
        # Trained on 1,024-token windows; positions beyond were never seen (spec §4).
        return self.args.max_seq_len

    def forward(self, ids: torch.Tensor, state: StateList | None = None, last_only: bool = False) -> torch.Tensor:
        t = ids.shape[1]
        start = 0
        if state is not None:
            state.check_room(t)
            start = state.length
        cos, sin = self._rope(start, t, ids.device)
        x = self.embed(ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, state[i] if state is not None else None)
        if state is not None:
            state.advance(t)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        head = self.lm_head.weight if self.lm_head is not None else self.embed.weight
        return project_head(self, x, head)

    def dense_layout(self):
        from ..dense_step import DenseLayout

        a, layers = self.args, self.layers
        return DenseLayout(a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim,
                           norms=[n for b in layers for n in (b.attn_norm, b.ffn_norm)] + [self.norm],
                           products=[m for b in layers for m in (b.attn.wqkv, b.attn.wo, b.ffn.w13, b.ffn.w2)],
                           attention=[b.attn for b in layers], rope=self._rope, embed=self.embed)

    def make_state(self, max_len: int, device, dtype) -> StateList:
        a = self.args
        return StateList([KVState(max_len, a.n_kv_heads, a.head_dim, device, dtype) for _ in range(a.n_layers)],
                         max_len=max_len)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # A save_pretrained export would prefix every key with "model." (spec §2.3).
        weights = {k.removeprefix("model."): v for k, v in weights.items()}
        # Stored RoPE tables are recomputed, never trusted.
        weights.pop("rope_cos", None)
        weights.pop("rope_sin", None)
        # The export stores the tied head twice; keep one copy unless they really differ.
        self.keep_one_head(weights, "embed.weight")
        for i in range(self.args.n_layers):
            p = f"layers.{i}."
            # q | k | v fused into one matmul.
            fuse(weights, p + "attn.wqkv.weight", [p + f"attn.{n}.weight" for n in ("wq", "wk", "wv")])
            # gate (w1) | up (w3) fused into one matmul.
            fuse(weights, p + "ffn.w13.weight", [p + "ffn.w1.weight", p + "ffn.w3.weight"])
        return weights
