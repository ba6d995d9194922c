"""The decode cache of a forgetting-attention layer: compact keys, values and fp32 gate sums.

Layout (README.md): k [B, Hk, max_len, D] at the key head count (not expanded to the query heads),
v [B, Hv, max_len, Dv], c [B, H, max_len] fp32 cumulative log forget gates. Preallocated once;
`update` writes the new tokens in place and returns views of the filled part.
"""
from __future__ import annotations

import torch

from ...state import ContextFull, LayerState


class ForgettingKVCache(LayerState):
    """Grows by (Hk·D + Hv·Dv)·itemsize + 4·H bytes per token; trims like any KV cache."""

    kind = "kv"
    can_trim = True

    def __init__(self, max_len: int, n_heads: int, n_k_heads: int, head_dim: int, n_v_heads: int,
                 v_dim: int, device, dtype, batch: int = 1) -> None:
        super().__init__()
        self.max_len = max_len
        self.k = torch.zeros(batch, n_k_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch, n_v_heads, max_len, v_dim, device=device, dtype=dtype)
        self.c = torch.zeros(batch, n_heads, max_len, device=device, dtype=torch.float32)

    def buffers(self) -> list[torch.Tensor]:
        return [self.k, self.v, self.c]

    def bytes_per_token(self) -> int:
        return sum(b[:, :, 0].numel() * b.element_size() for b in self.buffers())

    def used_nbytes(self) -> int:
        return self.length * self.bytes_per_token()

    def update(self, k: torch.Tensor, v: torch.Tensor, log_f: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append k [B, T, Hk, D], v [B, T, Hv, Dv] and log forget gates [B, T, H] (fp32).

        Returns the filled k, v and cumulative sums c as [B, Hk, L, D], [B, Hv, L, Dv], [B, H, L].
        """
        t = k.shape[1]
        start, end = self.length, self.length + t
        if end > self.max_len:
            raise ContextFull(f"the FoX cache holds {self.max_len} tokens; {end} were asked for")
        self.k[:, :, start:end] = k.transpose(1, 2)
        self.v[:, :, start:end] = v.transpose(1, 2)
        # The running sum continues from the last cached position (0 before the first token).
        c = log_f.float().cumsum(1).transpose(1, 2)
        if start:
            c = c + self.c[:, :, start - 1:start]
        self.c[:, :, start:end] = c
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end], self.c[:, :, :end]

    def snapshot(self) -> object:
        n = self.length
        return (n, [b[:, :, :n].clone() for b in self.buffers()])

    def restore(self, snap) -> None:
        n, saved = snap
        for dst, src in zip(self.buffers(), saved):
            dst[:, :, :n].copy_(src)
        self.length = n

    def reset(self) -> None:
        # Entries past `length` are never read.
        self.length = 0

    def trim(self, n: int) -> None:
        self.length = min(self.length, n)
