"""A reply's per-token record (issue 15's token inspector): what the model chose at each token, how sure
it was, what it almost said and the compute the token took.

Columnar JSON, the form the store's `token_details` table and the JSON export hold:
{"distribution": "raw" | "final", "ids": [...], "text": [...], "logprob": [...], "entropy": [...],
"alternatives": [[[id, logprob], ...], ...], "steps": [...]}: one entry per generated token in every list;
a figure that was not asked for is null. "raw": probabilities of the model's softmax; "final": after the
sampling settings (contract.TokenDetail.final). Torch-free.
"""
from __future__ import annotations

import math
from typing import Any

from ..contract import StepEvent, TokenDetail

COLUMNS = ("ids", "text", "logprob", "entropy", "alternatives", "steps")
#: Decimals kept of a log-probability or an entropy: a relative error of 1e-5 at most in a probability.
DECIMALS = 5


def new_record(detail: TokenDetail) -> dict[str, Any]:
    """An empty record for a reply generated with `detail`."""
    return {"distribution": "final" if detail.final else "raw", **{c: [] for c in COLUMNS}}


def add(record: dict[str, Any], ev: StepEvent) -> None:
    """Append one token's figures."""
    record["ids"].append(ev.token_id)
    record["text"].append(ev.text)
    record["logprob"].append(_round(ev.logprob))
    record["entropy"].append(_round(ev.entropy))
    record["alternatives"].append(None if ev.alternatives is None
                                  else [[i, _round(lp)] for i, lp in ev.alternatives])
    record["steps"].append(ev.steps)


def branch(record: dict[str, Any], index: int, chosen: list[int], text: str) -> dict[str, Any]:
    """The record of a reply branched at token `index` with the ids `chosen` put there (spelling `text`):
    the tokens before it, then the first chosen one under the same distribution (its log-probability if it
    was an alternative), then any further typed ones with no figures (no forward chose them)."""
    out = {"distribution": record["distribution"], **{c: list(record[c][:index]) for c in COLUMNS}}
    for n, token_id in enumerate(chosen):
        alts = record["alternatives"][index] if n == 0 else None
        out["ids"].append(token_id)
        out["text"].append(text if n == len(chosen) - 1 else "")
        out["logprob"].append(next((lp for i, lp in alts or () if i == token_id), None))
        for c in ("entropy", "alternatives", "steps"):
            out[c].append(record[c][index] if n == 0 else None)
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, DECIMALS)


def check(record: Any, where: str) -> dict[str, Any]:
    """The record if well formed; ValueError naming `where` and the first fault otherwise (an import)."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{where}: the per-token record {why}")

    if not isinstance(record, dict) or record.get("distribution") not in ("raw", "final"):
        raise bad('must be an object with "distribution": "raw" or "final"')
    lists = [record.get(c) for c in COLUMNS]
    if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists}) != 1:
        raise bad(f"needs the lists {', '.join(COLUMNS)}, all of one length")
    ids, text, logprob, entropy, alternatives, steps = lists
    if not all(_int(i) for i in ids) or not all(isinstance(t, str) for t in text):
        raise bad("has a token id that is not an integer or a text that is not a string")
    if not all(x is None or _num(x) and x <= 0 for x in logprob) or not all(x is None or _num(x) and x >= 0
                                                                           for x in entropy):
        raise bad("has a log-probability above 0 or an entropy below 0 (or one that is not a number)")
    for alts in alternatives:
        if alts is not None and not (isinstance(alts, list) and all(
                isinstance(a, list) and len(a) == 2 and _int(a[0]) and _num(a[1]) and a[1] <= 0 for a in alts)):
            raise bad("has alternatives that are not [token id, log-probability <= 0] pairs")
    if not all(s is None or _int(s) and s >= 0 for s in steps):
        raise bad("has a step count that is not a whole number >= 0")
    return {"distribution": record["distribution"], **{c: list(v) for c, v in zip(COLUMNS, lists)}}


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
