"""The decode cache of a forgetting-attention layer: a KVState plus the fp32 cumulative log forget gates.

Layout (README.md): k [B, Hk, max_len, D] at the key head count (not expanded to the query heads),
v [B, Hv, max_len, Dv], c [B, H, max_len] fp32 cumulative log forget gates. Preallocated once;
`update` writes the new tokens in place and returns views of the filled part.
"""
from __future__ import annotations

import torch

from ...state import KVState


class ForgettingKVCache(KVState):
    """Grows by (Hk·D + Hv·Dv)·itemsize + 4·H bytes per token; snapshots, trims and counts like any KV cache."""

    def __init__(self, max_len: int, n_heads: int, n_k_heads: int, head_dim: int, n_v_heads: int,
                 v_dim: int, device, dtype, batch: int = 1) -> None:
        super().__init__(max_len, n_k_heads, head_dim, device, dtype, batch, v_dim=v_dim, n_v_heads=n_v_heads)
        self.c = torch.zeros(batch, n_heads, max_len, device=device, dtype=torch.float32)

    def buffers(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.c]

    def update(self, k: torch.Tensor, v: torch.Tensor, log_f: torch.Tensor  # type: ignore[override]
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write k [B, T, Hk, D], v [B, T, Hv, Dv] and log forget gates [B, T, H] (fp32) at [length, length + T).

        Returns the filled k, v and cumulative sums c as [B, Hk, L, D], [B, Hv, L, Dv], [B, H, L].
        """
        start = self.length
        k_all, v_all = super().update(k, v)
        end = k_all.shape[2]
        # The running sum continues from the last cached position (0 before the first token).
        c = log_f.float().cumsum(1).transpose(1, 2)
        if start:
            c = c + self.c[:, :, start - 1:start]
        self.c[:, :, start:end] = c
        return k_all, v_all, self.c[:, :, :end]
