"""Plain formatting and arithmetic behind the panels (no Textual), unit-tested on their own."""
from __future__ import annotations

from typing import Any, Sequence

BARS = "▁▂▃▄▅▆▇█"


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 90:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


STOP_LABELS = {"eos": "end of turn", "stop_string": "stop string", "max_tokens": "token limit",
               "cancelled": "stopped by you", "context_full": "context full", "error": "error",
               # Set by the store for a reply that was streaming when smollchat was killed or crashed.
               "interrupted": "cut off: smollchat closed while it streamed · c continues it"}


def run_line(run: dict[str, Any]) -> str:
    """The figures under a reply: tokens, time to first token, prefill and decode speed, stop reason."""
    if not run:
        return ""
    timings = run.get("timings", {}) or {}
    # A reply cut off by a crash has no count (its run card was never finished).
    parts = [f"{run['new_tokens']} tokens"] if "new_tokens" in run else []
    if timings.get("ttft_s") is not None:
        parts.append(f"TTFT {human_duration(timings['ttft_s'])}")
    if timings.get("prefill_tok_s"):
        parts.append(f"prefill {timings['prefill_tok_s']:.0f} tok/s")
    if timings.get("decode_tok_s"):
        parts.append(f"decode {timings['decode_tok_s']:.1f} tok/s")
    reason = run.get("stop_reason")
    if reason:
        parts.append(STOP_LABELS.get(reason, reason))
    reused = run.get("reused_tokens")
    if reused:
        parts.append(f"prefill skipped {reused} tok")
    dropped = (run.get("context") or {}).get("dropped_turns")
    if dropped:
        parts.append(f"{dropped} oldest turn{'s' if dropped > 1 else ''} left out to fit the context")
    return " · ".join(parts)


def ghost_kv_bytes(n_layers: int, hidden_size: int, tokens: int) -> int:
    """KV bytes a dense multi-head transformer of the same depth and width holds at `tokens`:
    K and V (2) x layers x hidden x 2 bytes (bf16) per token."""
    return 2 * n_layers * hidden_size * 2 * tokens


def steps_summary(steps: Sequence[int | None], budget: int | None) -> tuple[float, int, float | None]:
    """(mean, max, saving) of per-token recurrence steps; saving is the share of the budget
    (steps every token would use without early exit) that was not spent."""
    used = [s for s in steps if s is not None]
    if not used:
        return 0.0, 0, None
    mean = sum(used) / len(used)
    saving = None
    if budget:
        saving = max(0.0, 1.0 - sum(used) / (budget * len(used)))
    return mean, max(used), saving


def sparkline(values: Sequence[float], width: int, top: float | None = None) -> str:
    """Values resampled to `width` columns (each column the max of its bucket) as bar glyphs,
    scaled to `top` so two lines drawn with the same top compare by eye."""
    if not values or width <= 0:
        return ""
    top = top if top is not None else max(values)
    cols = bucket_max(values, width)
    if top <= 0:
        return BARS[0] * len(cols)
    return "".join(BARS[min(len(BARS) - 1, int(v / top * (len(BARS) - 1) + 0.5))] if v > 0 else " " for v in cols)


def bucket_max(values: Sequence[float], width: int) -> list[float]:
    """At most `width` columns: the values themselves, or the max of equal buckets."""
    n = len(values)
    if n <= width:
        return list(values)
    return [max(values[i * n // width:max(i * n // width + 1, (i + 1) * n // width)]) for i in range(width)]


def steps_strip(steps: Sequence[int | None], width: int, top: int | None) -> str:
    """The per-token steps of the last `width` tokens as bars (a token without steps is blank)."""
    tail = [s or 0 for s in steps[-width:]]
    return sparkline(tail, width, float(top) if top else None)
