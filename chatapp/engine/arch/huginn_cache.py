"""Huginn's state: the decode-time KV cache, with one key/value buffer per attention "slot" (a layer at
one recurrence step), the reference's lookup strategies and compression remaps (spec §5), and the
seeded like-init initial latent.

Checked against: HuginnDynamicCache in github seal-rg/recurrent-pretraining @ 59e0b69
recpre/raven_modeling_minimal.py (fixtures/huginn: greedy ids under "full", "compress-s8" and the
adaptive runs under "latest-m4").

Slots: prelude layer i -> i; core layer j at step i -> P + C*i + j; coda layer i -> -(i + 1), with
P prelude and C core layers (2 and 4 for the real model). A compression remap folds the logical core
slots onto fewer physical ones. The reference keeps a dict {slot: {position: K}}; here each physical
slot is a dense [B, H, capacity, D] buffer that grows in blocks, and which positions a slot holds is
derived from one integer per position: how many logical core slots it has written (`n4`). Tokens run
steps 0..n-1 without gaps, so for every remap the set of physical slots a position wrote is a prefix
that this count determines. A lookup strategy then picks, per position, which physical slot to read.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..state import LayerState, StateList

LOOKUPS = ("full", "skip", "latest-m4", "available-m4", "always-last-m4")
#: Positions added to a slot's buffer at a time: memory follows the context in steps, not its limit.
BLOCK = 256


@dataclass(frozen=True)
class CacheStrategy:
    """A parsed `cache_strategy` control: a lookup rule and an optional compression remap."""

    lookup: str = "full"
    compress: str = ""  # "" | "s" (ring of n) | "r" (n calls share a slot) | "anchor"
    n: int = 0
    prelude: int = 2
    core: int = 4

    @classmethod
    def parse(cls, text: str, prelude: int = 2, core: int = 4) -> "CacheStrategy":
        """`full`, `skip`, `latest-m4`, `available-m4`, `always-last-m4`, `compress-sN`, `compress-rN`,
        `compress-anchor`, or `<lookup>-compress-...`; raise ValueError on anything else."""
        lookup, sep, comp = text.partition("compress-")
        lookup = lookup.removesuffix("-") or "full"
        if lookup not in LOOKUPS:
            raise ValueError(f"cache_strategy {text!r}: unknown lookup {lookup!r} (one of {', '.join(LOOKUPS)})")
        if not sep:
            return cls(lookup, prelude=prelude, core=core)
        if comp == "anchor":
            return cls(lookup, "anchor", 0, prelude, core)
        if comp[:1] in ("s", "r") and comp[1:].isdigit() and int(comp[1:]) > 0:
            return cls(lookup, comp[0], int(comp[1:]), prelude, core)
        raise ValueError(f"cache_strategy {text!r}: compression must be sN, rN (N >= 1) or anchor")

    @property
    def remap_key(self) -> tuple[str, int]:
        """What fixes the physical layout: a state built under one remap cannot be read under another."""
        return self.compress, self.n

    def physical(self, slot: int) -> int:
        """The physical slot a logical slot writes to (prelude and coda slots are never remapped)."""
        p, c = self.prelude, self.core
        if slot < p:
            return slot
        m = slot - p
        if self.compress == "s":
            return p + m % self.n
        if self.compress == "r":
            return p + m // self.n
        if self.compress == "anchor" and m >= 8 * c:
            # The first 8 iterations keep their own slots; every later one shares iteration 8's.
            return p + 8 * c + (m - 8 * c) % c
        return slot

    def core_slots(self, steps: int) -> int:
        """Physical core slots that `steps` recurrence steps occupy (spec §5's memory formulas)."""
        m = steps * self.core
        if self.compress == "s":
            return min(m, self.n)
        if self.compress == "r":
            return -(-m // self.n)
        if self.compress == "anchor":
            return min(m, 9 * self.core)
        return m

    def top(self, n4: np.ndarray) -> np.ndarray:
        """Highest physical core index (slot - P) each position wrote, -1 for none."""
        if self.compress == "s":
            return np.minimum(n4, self.n) - 1
        if self.compress == "r":
            return np.where(n4 > 0, (n4 - 1) // max(self.n, 1), -1)
        if self.compress == "anchor":
            return np.minimum(n4, 9 * self.core) - 1
        return n4 - 1

    def holds(self, q: int, n4) -> np.ndarray | bool:
        """Whether positions with these write counts hold physical core index q."""
        return (q * self.n < n4) if self.compress == "r" else (q < n4)

    def sources(self, q: int, n4: np.ndarray) -> np.ndarray:
        """Per position, the physical core index to read when attending at index q (-1: left out)."""
        if self.lookup in ("full", "skip"):
            # The reference stacks only the entries present (full and skip agree once one is missing).
            return np.where(self.holds(q, n4), q, -1)
        top = self.top(n4)
        if self.lookup != "always-last-m4":
            top = np.minimum(top, q)
        # The latest slot of the same core layer: same index modulo the core block's layer count.
        src = top - (top - q) % self.core
        return np.where(src >= 0, src, -1)


class SlotKV(LayerState):
    """Keys and values of one physical slot, [B, H, capacity, D], capacity grown in blocks."""

    kind = "kv"
    can_trim = True

    def __init__(self, owner: "HuginnState", slot: int) -> None:
        super().__init__()
        self.owner, self.slot = owner, slot
        o = owner
        self.k = torch.zeros(o.batch, o.n_heads, 0, o.head_dim, device=o.device, dtype=o.dtype)
        self.v = torch.zeros_like(self.k)

    def buffers(self) -> list[torch.Tensor]:
        return [self.k, self.v]

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def grow(self, need: int) -> None:
        if need <= self.capacity:
            return
        cap = -(-need // self.owner.block) * self.owner.block
        if self.owner.max_len is not None:
            cap = min(cap, max(self.owner.max_len, need))
        # Zero-filled: a position a lookup leaves out must still hold finite numbers for the masked SDPA.
        k = self.k.new_zeros(*self.k.shape[:2], cap, self.k.shape[3])
        v = self.v.new_zeros(*self.v.shape[:2], cap, self.v.shape[3])
        k[:, :, :self.capacity] = self.k
        v[:, :, :self.capacity] = self.v
        self.k, self.v = k, v

    def bytes_per_token(self) -> int:
        return 2 * self.k[:, :, :1].numel() * self.k.element_size()

    def used_nbytes(self) -> int:
        return self.owner.positions_held(self.slot) * self.bytes_per_token()

    def reset(self) -> None:
        self.length = 0


class LastLatent(LayerState):
    """The final core state of the last absorbed token (continuous compute's warm start), fp32."""

    kind = "recurrent"

    def __init__(self, batch: int, hidden: int, device) -> None:
        super().__init__()
        self.x = torch.zeros(batch, 1, hidden, device=device, dtype=torch.float32)
        self.position = -1  # the position it belongs to; -1 when none is stored

    def buffers(self) -> list[torch.Tensor]:
        return [self.x]

    def snapshot(self) -> object:
        return (self.position, self.x.clone())

    def restore(self, snap) -> None:
        self.position, x = snap
        self.x.copy_(x)

    def reset(self) -> None:
        self.position = -1


class HuginnState(StateList):
    """All KV slots of a Huginn model, the per-position write counts, and the warm-start latent.

    Forward protocol (called by the model): `begin(ids)` once per chunk, `attend_kv(slot, k, v)` per
    attention call, `finish(steps)` at the end. `length` is the number of absorbed positions.
    """

    def __init__(self, max_len: int | None, n_heads: int, head_dim: int, hidden: int, device, dtype,
                 prelude: int = 2, core: int = 4, block: int = BLOCK, batch: int = 1) -> None:
        self.latent = LastLatent(batch, hidden, device)
        super().__init__([self.latent], max_len)
        self.n_heads, self.head_dim, self.device, self.dtype = n_heads, head_dim, torch.device(device), dtype
        self.prelude, self.core, self.block, self.batch = prelude, core, block, batch
        self.strategy = CacheStrategy(prelude=prelude, core=core)
        self.slots: dict[int, SlotKV] = {}
        self.n4 = np.zeros(0, dtype=np.int64)  # logical core slots written, per position
        self._start = self._end = 0

    # Forward protocol.
    def begin(self, ids: torch.Tensor, strategy: CacheStrategy) -> None:
        """Open a chunk of new positions [length, length + T) under `strategy` (same remap as the state's)."""
        t = ids.shape[1]
        self.check_room(t)
        if self.length == 0:
            self.strategy = strategy
        elif strategy.remap_key != self.strategy.remap_key:
            raise ValueError("the cache was built under another compression; reset it first")
        self.strategy = strategy
        self._start, self._end = self.length, self.length + t
        if self.n4.shape[0] < self._end:
            self.n4 = np.concatenate([self.n4, np.zeros(self._cap(self._end) - self.n4.shape[0], np.int64)])
        self.n4[self._start:self._end] = 0

    def attend_kv(self, slot: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v ([B, T, H, D]) of the open chunk at a logical slot; return what its queries attend
        to: (keys [B, H, L, D], values, key mask [L] bool or None when every position is kept)."""
        s = self.strategy
        phys = s.physical(slot)
        buf = self.slots.get(phys)
        if buf is None:
            buf = self.slots[phys] = SlotKV(self, phys)
            buf.length = self.length  # then advanced with every other state when the chunk closes
            self.append(buf)
        buf.grow(self._end)
        buf.k[:, :, self._start:self._end] = k.transpose(1, 2)
        buf.v[:, :, self._start:self._end] = v.transpose(1, 2)
        end = self._end
        if slot < self.prelude:
            # Prelude and coda (negative) slots: every position writes them, so they are read as they are.
            return buf.k[:, :, :end], buf.v[:, :, :end], None
        self.n4[self._start:end] = slot - self.prelude + 1
        q = phys - self.prelude
        n4 = self.n4[:end]
        if s.holds(q, n4[:self._start].min(initial=1 << 40)):
            # Every earlier position holds this slot: read it as is (the common, uniform-steps case).
            return buf.k[:, :, :end], buf.v[:, :, :end], None
        return self._gather(s.sources(q, n4), end)

    def finish(self) -> None:
        """Close the open chunk: its positions are absorbed."""
        self.advance(self._end - self._start)
        self._start = self._end

    def _gather(self, src: np.ndarray, end: int):
        """Keys/values assembled position by position from the physical core slots in `src`."""
        p = self.prelude
        kept = src >= 0
        used = np.unique(src[kept])
        if kept.all() and used.size == 1:
            buf = self.slots[p + int(used[0])]
            return buf.k[:, :, :end], buf.v[:, :, :end], None
        any_buf = self.slots[p + int(used[0])]
        k = any_buf.k.new_zeros(*any_buf.k.shape[:2], end, any_buf.k.shape[3])
        v = torch.zeros_like(k)
        for q in used:
            idx = torch.from_numpy(np.nonzero(src == q)[0]).to(self.device)
            buf = self.slots[p + int(q)]
            k.index_copy_(2, idx, buf.k.index_select(2, idx))
            v.index_copy_(2, idx, buf.v.index_select(2, idx))
        mask = None if kept.all() else torch.from_numpy(kept).to(self.device)
        return k, v, mask

    def _cap(self, need: int) -> int:
        cap = -(-need // self.block) * self.block
        return cap if self.max_len is None else min(cap, max(self.max_len, need))

    # Introspection.
    def positions_held(self, slot: int) -> int:
        """Absorbed positions whose entry this physical slot holds."""
        if slot < self.prelude:
            return self.length
        return int(np.count_nonzero(self.strategy.holds(slot - self.prelude, self.n4[:self.length])))

    def steps_per_position(self) -> list[int]:
        """Recurrence steps each absorbed position ran."""
        return (self.n4[:self.length] // self.core).tolist()

    def kv_report(self) -> dict[str, int]:
        """KV bytes allocated by slot kind (prelude, core, coda) and in total."""
        out = {"prelude": 0, "core": 0, "coda": 0}
        for slot, buf in self.slots.items():
            kind = "coda" if slot < 0 else "prelude" if slot < self.prelude else "core"
            out[kind] += buf.nbytes()
        out["total"] = sum(out.values())
        return out

    # The StateList contract.
    @property
    def can_trim(self) -> bool:
        return True

    def trim(self, n: int) -> None:
        self.length = min(self.length, n)
        self._start = self._end = self.length
        for buf in self.slots.values():
            buf.length = min(buf.length, self.length)
        if self.latent.position >= self.length:
            self.latent.reset()

    def reset(self) -> None:
        # Dropping the buffers returns their memory: the next turn may run fewer steps or another remap.
        for buf in self.slots.values():
            self.remove(buf)
        self.slots.clear()
        self.latent.reset()
        self.n4 = np.zeros(0, dtype=np.int64)
        self.length = self._start = self._end = 0

    def snapshot(self) -> object:
        n = self.length
        kv = {s: (b.k[:, :, :n].clone(), b.v[:, :, :n].clone()) for s, b in self.slots.items()}
        return (n, self.strategy, self.n4[:n].copy(), kv, self.latent.snapshot())

    def restore(self, snap) -> None:
        n, strategy, n4, kv, latent = snap
        if strategy.remap_key != self.strategy.remap_key:
            self.reset()
        self.strategy = strategy
        self.length = self._start = self._end = n
        self.n4 = np.concatenate([n4, np.zeros(self._cap(n) - n, np.int64)]) if n else np.zeros(0, np.int64)
        for slot, (k, v) in kv.items():
            buf = self.slots.get(slot)
            if buf is None:
                buf = self.slots[slot] = SlotKV(self, slot)
                self.append(buf)
            buf.grow(n)
            buf.k[:, :, :n].copy_(k)
            buf.v[:, :, :n].copy_(v)
            buf.length = n
        self.latent.restore(latent)


def like_init(shape, start: int, seed: int, std: float, scale: float) -> torch.Tensor:
    """The reference's "like-init" s0: truncated normal (±3σ, σ = sqrt(2/(5h))) times sqrt(h), fp32 on CPU.

    Each position draws from its own generator seeded by (seed, position): a token gets the same
    noise whether it arrives in a prefill chunk or a decode step, so runs reproduce and prefill
    equals step-by-step decoding (the reference draws fresh noise per call).
    """
    b, t, h = shape
    out = torch.empty(b, t, h)
    g = torch.Generator()
    for i in range(t):
        g.manual_seed(seed * 1_000_003 + start + i)
        torch.nn.init.trunc_normal_(out[:, i], std=std, a=-3 * std, b=3 * std, generator=g)
    return out * scale
