"""What the token inspector shows of a reply's per-token record (chat/token_record.py), without Textual.

A reply is cut into groups, the cells the token cursor steps over. A group is one token, except where
tokens split a character: a byte tokenizer, or a BPE byte fallback, spends several tokens on one UTF-8
sequence, and none of them alone is text. Those tokens form one group with the token that completes the
character (the stream showed nothing for the first ones: their recorded text is ""), so the inspector
never draws half a character; the panel lists the tokens inside. Bytes that are no UTF-8 at all (random
demo weights emit them) show as hex, ⟨e2⟩, never as a replacement sign. A special token the model
emitted is a group of its own, shown by name. Each group gets a colour level 0 (sure, cheap) .. 4 (unsure, costly)
under one of three measures: the chosen token's probability, the entropy of the distribution, or the
recurrence steps the token took (Huginn); a group takes the level of its least sure token.
"""
from __future__ import annotations

import codecs
import math
from dataclasses import dataclass
from typing import Any, Sequence

from ..textsafe import displayable

MODES = ("prob", "entropy", "steps")
MODE_LABELS = {"prob": "probability", "entropy": "entropy", "steps": "recurrence steps"}
LEVELS = 5
#: Probability at or above which a token gets level 0, 1, 2, 3 (below the last: 4); as `--show-probs`.
PROB_EDGES = (0.9, 0.6, 0.3, 0.1)
#: Entropy (nats) under which a token gets level 0, 1, 2, 3 (at or above the last: 4).
ENTROPY_EDGES = (0.5, 1.5, 3.0, 5.0)
#: Levels the "next low-confidence token" key stops at (probability under 0.3, entropy of 3 nats or
#: more, or the costliest steps).
LOW = 3


@dataclass(frozen=True)
class Group:
    """Tokens start..end-1 of the record shown as one cell; `kind`: "text", "split" (a character spread
    over several tokens), "special" (a special token, by name) or "end" (the end-of-turn token)."""

    start: int
    end: int
    text: str
    kind: str = "text"

    @property
    def size(self) -> int:
        return self.end - self.start


def _hex(error: UnicodeDecodeError) -> tuple[str, int]:
    """Bytes that are not UTF-8 (random demo weights emit them) as hex, never as a replacement sign."""
    return "⟨" + " ".join(f"{b:02x}" for b in error.object[error.start:error.end]) + "⟩", error.end


HEX = "smollchat-hex"
codecs.register_error(HEX, _hex)


def groups(record: dict[str, Any], tokenizer: Any = None) -> list[Group]:
    """The record's tokens as display groups. With the reply's tokenizer, token bytes decide where
    characters end (a BPE token can hold the first bytes of a character and still show text) and bytes
    that are no UTF-8 show as hex; without it, the recorded texts do (a token that streamed "" waits)."""
    ids, texts = record["ids"], record["text"]
    specials = getattr(tokenizer, "special_ids", {}) or {}
    stops = set(_stop_ids(tokenizer))
    by_bytes = tokenizer is not None and hasattr(tokenizer, "token_bytes")
    decoder = codecs.getincrementaldecoder("utf-8")(errors=HEX)
    out: list[Group] = []
    start, shown = 0, ""
    for i, (token_id, text) in enumerate(zip(ids, texts)):
        if token_id in specials and not text:
            if start < i:  # bytes that never completed a character
                out.append(Group(start, i, shown + decoder.decode(b"", final=True) or "⟨?⟩", "split"))
                decoder.reset()
            name = specials[token_id]
            out.append(Group(i, i + 1, "⏎" if token_id in stops else f"⟨{name}⟩",
                             "end" if token_id in stops else "special"))
            start, shown = i + 1, ""
            continue
        if by_bytes:
            shown += decoder.decode(tokenizer.token_bytes(token_id))
            complete = not decoder.getstate()[0]
        else:
            shown += text
            complete = True
        if shown and complete:
            out.append(Group(start, i + 1, shown, "split" if i > start else "text"))
            start, shown = i + 1, ""
    if start < len(ids):
        tail = decoder.decode(b"", final=True) if by_bytes else ""
        out.append(Group(start, len(ids), shown + tail or "⟨?⟩", "split"))
    return out


def _stop_ids(tokenizer: Any) -> tuple[int, ...]:
    try:
        return tuple(tokenizer.stop_ids) if tokenizer is not None else ()
    except Exception:  # a tokenizer without a chat format
        return ()


def available(record: dict[str, Any], mode: str) -> bool:
    """Whether the record holds the figure `mode` colours by."""
    column = {"prob": "logprob", "entropy": "entropy", "steps": "steps"}[mode]
    return any(v is not None for v in record[column])


def token_level(record: dict[str, Any], i: int, mode: str, max_steps: int) -> int | None:
    """Level 0..4 of token i under `mode`, None where the record has no figure for it."""
    if mode == "prob":
        lp = record["logprob"][i]
        return None if lp is None else next((k for k, edge in enumerate(PROB_EDGES) if math.exp(lp) >= edge), 4)
    if mode == "entropy":
        h = record["entropy"][i]
        return None if h is None else next((k for k, edge in enumerate(ENTROPY_EDGES) if h < edge), 4)
    s = record["steps"][i]
    if s is None or max_steps <= 0:
        return None
    return min(LEVELS - 1, int(LEVELS * s / (max_steps + 1)))


def group_level(record: dict[str, Any], group: Group, mode: str, max_steps: int) -> int | None:
    levels = [v for v in (token_level(record, i, mode, max_steps) for i in range(group.start, group.end))
              if v is not None]
    return max(levels) if levels else None


def max_steps(record: dict[str, Any]) -> int:
    return max((s for s in record["steps"] if s is not None), default=0)


def legend(mode: str, most: int, distribution: str) -> tuple[str, list[str]]:
    """(title, a label per level) for the legend line."""
    if mode == "prob":
        which = "raw" if distribution == "raw" else "after the sampling settings"
        return f"probability ({which})", [f"≥{e:.0%}" for e in PROB_EDGES] + [f"<{PROB_EDGES[-1]:.0%}"]
    if mode == "entropy":
        return "entropy (nats)", [f"<{e:g}" for e in ENTROPY_EDGES] + [f"≥{ENTROPY_EDGES[-1]:g}"]
    bounds = [math.ceil(k * (most + 1) / LEVELS) for k in range(LEVELS + 1)]
    labels = [f"{lo}-{max(lo, hi - 1)}" if hi - 1 > lo else f"{lo}" for lo, hi in zip(bounds, bounds[1:])]
    return f"steps (of {most})", labels


def find_low(record: dict[str, Any], gs: Sequence[Group], at: int, mode: str, step: int = 1) -> int | None:
    """Index of the next group after `at` (step -1: before) whose level is LOW or more; None if none."""
    most = max_steps(record)
    i = at + step
    while 0 <= i < len(gs):
        level = group_level(record, gs[i], mode, most)
        if level is not None and level >= LOW:
            return i
        i += step
    return None


def piece(tokenizer: Any, token_id: int) -> str:
    """One token as the panel shows it: visible whitespace, specials by name, bytes that are not a whole
    character as hex (never a replacement sign); the id alone when no tokenizer of that model is loaded."""
    if tokenizer is None:
        return f"id {token_id}"
    specials = getattr(tokenizer, "special_ids", {}) or {}
    if token_id in specials:
        return f"⟨{specials[token_id]}⟩"
    try:
        raw = tokenizer.token_bytes(token_id)
    except Exception:
        return f"id {token_id}"
    text = raw.decode("utf-8", errors=HEX)
    return visible(text) if text else "⟨empty⟩"


def visible(text: str) -> str:
    """Whitespace a reader must see in a token: spaces, newlines, tabs; controls as symbols."""
    return displayable(text).replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥")


def body_text(group: Group) -> str:
    """A group's text in the reply's body: newlines keep breaking the line, after a visible ↵."""
    return displayable(group.text).replace("\n", "↵\n")


def percent(logprob: float | None) -> str:
    if logprob is None:
        return "—"
    p = math.exp(logprob)
    return f"{p:.1%}" if p >= 0.001 else f"{p:.0e}"
