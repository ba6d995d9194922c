"""The engine's one prompt cache: the live state plus snapshots of earlier states, keyed by token prefix.

A key is (what the state was computed under: dtype, quantization, the state-changing controls) plus
the token ids it absorbed. At the start of a call `begin` brings the live state to the longest prefix
of the new prompt that it, or a snapshot, already holds. It asks the state how it may get there: a state
that can drop tokens (a KV cache, Huginn's slots) is trimmed back to the common prefix; one that cannot
(a recurrent matrix, a convolution window) continues only a prompt that extends what it holds, or is
restored from a snapshot that the prompt extends. Snapshots are taken where the state passes points a
later prompt returns to: for states that cannot drop tokens at every prompt end (with the logits, so a
regenerate skips the whole prompt) and reply end (an edit or a branch switch resumes there); a state
that can drop tokens is snapshotted only as it is about to lose tokens no snapshot holds (another
branch or chat). A state that cannot drop tokens is also snapshotted inside a reply, every `every`
tokens (`inside_reply`), so that a branch at token k of that reply (Session.branch_at) resumes at most
`every` tokens before k instead of at the prompt's end; those snapshots may hold at most MID_SHARE of
the budget (the oldest of them go first), so a long reply cannot push out the prompt and reply ends.
Snapshots live on the state's device within a byte budget, least recently used out first. The idea
follows mlx-lm's LRUPromptCache (nearest prefix, trimmable or not, LRU by bytes).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

from .arch.base import Forward
from .state import StateList

#: Bytes of snapshots kept by default (on the engine's device).
DEFAULT_BUDGET = 256 * 2**20
#: Tokens between snapshots inside a reply, for a state that cannot drop tokens (0: none).
SNAPSHOT_EVERY = 32
#: The share of the budget that snapshots taken inside replies may hold together.
MID_SHARE = 0.5


@dataclass
class Snapshot:
    snap: object
    nbytes: int
    first: Forward | None  # the next-token logits at a prompt end; None where the state ran on
    mid: bool = False  # taken inside a reply (inside_reply)


class PromptCache:
    """The live state's contents and the snapshots of earlier ones.

    `held` lists the ids the live state absorbed, in order; `key` is what it was computed under.
    """

    def __init__(self, state: StateList, budget: int = DEFAULT_BUDGET, every: int = SNAPSHOT_EVERY) -> None:
        self.state = state
        self.budget = budget
        self.every = every
        self.key: Hashable = None
        self.held: list[int] = []
        self._snaps: OrderedDict[tuple[Hashable, tuple[int, ...]], Snapshot] = OrderedDict()

    @property
    def nbytes(self) -> int:
        """Bytes held by the snapshots."""
        return sum(s.nbytes for s in self._snaps.values())

    def __len__(self) -> int:
        return len(self._snaps)

    def begin(self, key: Hashable, ids: list[int]) -> tuple[int, Forward | None]:
        """Bring the live state to the longest prefix of `ids` held under `key`.

        Returns (tokens of `ids` the state now holds, the prompt's last logits when it holds them all).
        Unless the whole prompt was cached, at least its last token is left to run.
        """
        trim = self.state.can_trim
        if key != self.key:
            self._leave()
            self.state.reset()
            self.key, self.held = key, []
        last = len(ids) - 1
        live = _common(self.held, ids)
        # The live state serves a trimmed prefix, or (when it cannot drop tokens) all it holds if the prompt
        # goes on past it: at least one token must run to give the next-token logits.
        best, reach = None, min(live, last) if trim else (live if live == len(self.held) and live < len(ids) else 0)
        for (k, got), snap in self._snaps.items():
            if k != key:
                continue
            if got == tuple(ids) and snap.first is not None:
                best, reach = (k, got), len(ids)
                break
            n = len(got) if len(got) < len(ids) and _common(got, ids) == len(got) else (
                min(_common(got, ids), last) if trim else 0)
            if n > reach:
                best, reach = (k, got), n
        if best is None:
            self._cut(reach)
            return reach, None
        self._leave()
        snap = self._snaps[best]
        self._snaps.move_to_end(best)
        self.state.restore(snap.snap)
        self.held = list(best[1])
        if reach == len(ids):
            return reach, Forward(snap.first.logits.clone(), snap.first.steps)
        if len(self.held) > reach:
            self.state.trim(reach)
            del self.held[reach:]
        return reach, None

    def prompt_done(self, ids: list[int], first: Forward) -> None:
        """The live state absorbed the whole prompt; `first` is what its last forward returned."""
        self.held = list(ids)
        if not self.state.can_trim:
            self._save(Forward(first.logits.clone(), first.steps))

    def absorbed(self, ids: list[int]) -> None:
        """The live state absorbed `ids` after the prompt (a reply, fed back token by token)."""
        self.held.extend(ids)
        if ids and not self.state.can_trim:
            self._save(None)

    def inside_reply(self, ids: list[int]) -> None:
        """The live state holds `ids` (a prompt and part of its reply) while the reply goes on: keep a
        snapshot of it. `held` still names the prompt; `absorbed` brings it up to date at the end."""
        if not self.state.can_trim:
            self._save(None, tuple(ids), mid=True)

    def interrupted(self, ids: list[int]) -> None:
        """A prefill stopped part way: the live state holds the first `state.length` ids of the prompt."""
        self.held = list(ids[:self.state.length])

    def lost(self) -> None:
        """A call failed half way: what the live state holds is unknown, so it starts over."""
        self.state.reset()
        self.held = []

    def clear(self) -> None:
        """Forget the live state and every snapshot."""
        self.lost()
        self._snaps.clear()

    # Internals.
    def _cut(self, n: int) -> None:
        """Keep the live state's first n tokens (trim, or start over where it cannot drop tokens)."""
        if n == len(self.held):
            return
        self._leave(keep_prefix=n)
        if self.state.can_trim:
            self.state.trim(n)
            del self.held[n:]
        else:
            self.state.reset()
            self.held = []

    def _leave(self, keep_prefix: int = 0) -> None:
        """Before a trimmable live state loses tokens past `keep_prefix`, keep them in a snapshot unless
        one already holds them (states that cannot trim were saved where they passed)."""
        if not self.state.can_trim or len(self.held) <= keep_prefix or self.key is None:
            return
        held = tuple(self.held)
        for k, got in self._snaps:
            if k == self.key and got[:len(held)] == held:
                return
        self._save(None)

    def _save(self, first: Forward | None, held: tuple[int, ...] | None = None, mid: bool = False) -> None:
        size = sum(self.state.bytes().used.values())
        cap = self.budget * MID_SHARE if mid else self.budget
        if size > cap:
            return
        name = (self.key, tuple(self.held) if held is None else held)
        if mid:
            # Within their share: the oldest snapshots taken inside replies make room first.
            mids = [k for k, s in self._snaps.items() if s.mid and k != name]
            while mids and sum(self._snaps[k].nbytes for k in mids) + size > cap:
                del self._snaps[mids.pop(0)]
        self._snaps[name] = Snapshot(self.state.snapshot(), size, first, mid)
        self._snaps.move_to_end(name)
        if self.state.can_trim:
            # A longer snapshot serves every prefix of it: drop the ones it covers.
            for k in [k for k in self._snaps if k != name and k[0] == self.key and name[1][:len(k[1])] == k[1]]:
                del self._snaps[k]
        while self.nbytes > self.budget:
            self._snaps.popitem(last=False)


def _common(a, b) -> int:
    """Length of the common prefix of two id sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
