"""The per-layer state contract (DESIGN.md "State") and its kinds.

Every layer of every architecture keeps its inference state in one of these objects, allocated once
by `Model.make_state(max_len, device, dtype)`. Buffers never move: `restore` copies into them, so a
captured CUDA graph that points at them stays valid. Recurrent state is always fp32.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class ContextFull(RuntimeError):
    """Raised when a state cannot absorb more tokens (its preallocated context is used up)."""


class LayerState:
    """One layer's inference state. Subclasses allocate their buffers in `__init__`."""

    kind: str = "other"  # "kv" | "recurrent" | "conv" | "other"
    can_trim: bool = False

    def __init__(self) -> None:
        self.length = 0  # tokens absorbed

    def advance(self, t: int) -> None:
        """Count t more absorbed tokens. Every kind is advanced this way, once per forward, by
        StateList.advance; writes (KVState.update) go at `length` and never move it themselves."""
        self.length += t

    def buffers(self) -> list[torch.Tensor]:
        """The tensors that hold this state (what nbytes counts and snapshots copy)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes allocated for this state."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def used_nbytes(self) -> int:
        """Bytes holding information (equal to nbytes except for a partly filled cache)."""
        return self.nbytes()

    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()
        self.length = 0

    def snapshot(self) -> object:
        return (self.length, [b.clone() for b in self.buffers()])

    def restore(self, snap) -> None:
        length, saved = snap
        for dst, src in zip(self.buffers(), saved):
            dst.copy_(src)
        self.length = length

    def trim(self, n: int) -> None:
        """Keep only the first n tokens (KV caches only)."""
        raise NotImplementedError(f"{type(self).__name__} cannot drop tokens")


class KVState(LayerState):
    """A key/value cache preallocated to `max_len` positions.

    Layout: k [B, H_kv, max_len, D] and v [B, H_v, max_len, D_v] (heads before time so a decode step reads
    contiguous rows per head; H_v defaults to H_kv, D_v to D). K is stored after RoPE. Subclasses may add
    buffers with time at dim 2 (`buffers()`); snapshots, trims and byte counts cover them too.
    """

    kind = "kv"
    can_trim = True

    def __init__(self, max_len: int, n_kv_heads: int, head_dim: int, device, dtype,
                 batch: int = 1, v_dim: int | None = None, n_v_heads: int | None = None) -> None:
        super().__init__()
        self.max_len = max_len
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch, n_v_heads or n_kv_heads, max_len, v_dim or head_dim, device=device, dtype=dtype)

    def buffers(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    def bytes_per_token(self) -> int:
        return sum(b[:, :, 0].numel() * b.element_size() for b in self.buffers())

    def used_nbytes(self) -> int:
        return self.length * self.bytes_per_token()

    def check_room(self, t: int) -> None:
        if self.length + t > self.max_len:
            raise ContextFull(f"the KV cache holds {self.max_len} tokens; {self.length + t} were asked for")

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([B, T, H, D]) at positions [length, length + T) and return the cache filled through
        them as [B, H, length + T, D]. `length` moves only when the forward ends (advance)."""
        self.check_room(k.shape[1])
        start, end = self.length, self.length + k.shape[1]
        self.k[:, :, start:end] = k.transpose(1, 2)
        self.v[:, :, start:end] = v.transpose(1, 2)
        return self.k[:, :, :end], self.v[:, :, :end]

    def snapshot(self) -> object:
        # Only the filled part is worth copying.
        n = self.length
        return (n, [b[:, :, :n].clone() for b in self.buffers()])

    def restore(self, snap) -> None:
        n, saved = snap
        for dst, src in zip(self.buffers(), saved):
            dst[:, :, :n].copy_(src)
        self.length = n

    def reset(self) -> None:
        # Stale entries past `length` are never read, so no need to clear the buffers.
        self.length = 0

    def trim(self, n: int) -> None:
        self.length = min(self.length, n)


class RecurrentState(LayerState):
    """A constant-size recurrent state, fp32, e.g. a linear-attention matrix [B, H, K, V]."""

    kind = "recurrent"

    def __init__(self, shape: tuple[int, ...], device, dtype=torch.float32) -> None:
        super().__init__()
        self.state = torch.zeros(shape, device=device, dtype=dtype)

    def buffers(self) -> list[torch.Tensor]:
        return [self.state]


class ConvState(LayerState):
    """The last (kernel - 1) inputs of a short causal convolution, [B, C, W-1]."""

    kind = "conv"

    def __init__(self, channels: int, width: int, device, dtype, batch: int = 1) -> None:
        super().__init__()
        self.state = torch.zeros(batch, channels, width - 1, device=device, dtype=dtype)

    def buffers(self) -> list[torch.Tensor]:
        return [self.state]


class CompositeState(LayerState):
    """A layer that owns several states (e.g. a recurrent matrix plus its conv windows)."""

    def __init__(self, **parts: LayerState) -> None:
        super().__init__()
        self.parts = parts
        for name, part in parts.items():
            setattr(self, name, part)

    @property
    def kind(self) -> str:  # type: ignore[override]
        kinds = {p.kind for p in self.parts.values()}
        return kinds.pop() if len(kinds) == 1 else "mixed"

    @property
    def can_trim(self) -> bool:  # type: ignore[override]
        return all(p.can_trim for p in self.parts.values())

    def buffers(self) -> list[torch.Tensor]:
        return [b for p in self.parts.values() for b in p.buffers()]

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts.values())

    def used_nbytes(self) -> int:
        return sum(p.used_nbytes() for p in self.parts.values())

    def advance(self, t: int) -> None:
        for p in self.parts.values():
            p.advance(t)
        self.length += t

    def reset(self) -> None:
        for p in self.parts.values():
            p.reset()
        self.length = 0

    def snapshot(self) -> object:
        return (self.length, {k: p.snapshot() for k, p in self.parts.items()})

    def restore(self, snap) -> None:
        length, parts = snap
        for k, s in parts.items():
            self.parts[k].restore(s)
        self.length = length

    def trim(self, n: int) -> None:
        for p in self.parts.values():
            p.trim(n)
        self.length = min(self.length, n)


@dataclass(frozen=True)
class StateBytes:
    """Allocated and filled bytes by kind, summed over layers."""

    allocated: dict[str, int]
    used: dict[str, int]


class StateList(list):
    """The states of all layers of a model, plus the position counter shared by them.

    `length` is the number of tokens the model has absorbed; models read it as the position of the
    next token and call `advance(t)` once per forward, which advances every layer's state alike.
    """

    def __init__(self, states=(), max_len: int | None = None) -> None:
        super().__init__(states)
        self.length = 0
        self.max_len = max_len

    @property
    def can_trim(self) -> bool:
        return all(s.can_trim for s in self)

    def check_room(self, t: int) -> None:
        """Raise ContextFull before a forward that would overflow the preallocated context."""
        if self.max_len is not None and self.length + t > self.max_len:
            raise ContextFull(
                f"context is full: {self.length} + {t} tokens exceed the limit of {self.max_len}")

    def advance(self, t: int) -> None:
        for s in self:
            s.advance(t)
        self.length += t

    def reset(self) -> None:
        for s in self:
            s.reset()
        self.length = 0

    def snapshot(self) -> object:
        return (self.length, [s.snapshot() for s in self])

    def restore(self, snap) -> None:
        length, snaps = snap
        for s, x in zip(self, snaps):
            s.restore(x)
        self.length = length

    def trim(self, n: int) -> None:
        if not self.can_trim:
            raise NotImplementedError("this model's state cannot drop tokens")
        for s in self:
            s.trim(n)
        self.length = min(self.length, n)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self)

    def bytes(self) -> StateBytes:
        alloc: dict[str, int] = {}
        used: dict[str, int] = {}
        for s in self:
            parts = s.parts.values() if isinstance(s, CompositeState) else [s]
            for p in parts:
                alloc[p.kind] = alloc.get(p.kind, 0) + p.nbytes()
                used[p.kind] = used.get(p.kind, 0) + p.used_nbytes()
        return StateBytes(alloc, used)
