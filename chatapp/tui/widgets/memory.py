"""The memory panel: bytes by kind, the model pool's use of its memory budget, context used / limit, and
state bytes over the conversation's tokens drawn next to a "ghost" line of what a same-size dense
transformer's KV cache would hold.

Every figure comes from the engine's `MemoryReport` (updated as tokens stream) and `Engine.info()`
(layer count and hidden size for the ghost: 2 x layers x hidden x 2 bytes per token, bf16 K and V;
the quantization, so quantized weight bytes say what they are).
"""
from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ...contract import MemoryReport
from ...units import human_bytes
from ..figures import bucket_max, ghost_kv_bytes, sparkline

KIND_LABELS = (("kv", "KV cache"), ("recurrent", "recurrent"), ("conv", "conv state"), ("other", "other"))
LABEL_WIDTH = 11


class MemoryPanel(Widget):
    """Always visible while a model is loaded."""

    COMPONENT_CLASSES = {"memory--title", "memory--label", "memory--state", "memory--kv", "memory--ghost",
                         "memory--muted"}
    """
    | Class | Description |
    | :- | :- |
    | `memory--title` | The panel title line. |
    | `memory--label` | Row labels. |
    | `memory--state` | The model's state bytes (sparkline and figure). |
    | `memory--kv` | The context bar. |
    | `memory--ghost` | The same-size transformer's KV cache line. |
    | `memory--muted` | Secondary figures (allocated, allocator). |
    """

    DEFAULT_CSS = """
    MemoryPanel { height: auto; padding: 0 1; border-top: hkey $panel; }
    MemoryPanel > .memory--title { text-style: bold; color: $text; }
    MemoryPanel > .memory--label { color: $text-muted; }
    MemoryPanel > .memory--state { color: $mem-state; }
    MemoryPanel > .memory--kv { color: $mem-kv; }
    MemoryPanel > .memory--ghost { color: $mem-ghost; }
    MemoryPanel > .memory--muted { color: $text-muted; }
    """

    report: reactive[MemoryReport | None] = reactive(None)
    """The latest memory report, or None when no model is loaded."""
    info: reactive[dict] = reactive(dict, layout=True)
    """Engine.info(): n_layers, hidden_size, device, dtype, ... (empty when unknown)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.samples: dict[int, int] = {}
        """State bytes in use by context position, over the current conversation."""
        self._shape: tuple = ()
        self._chat_tokens: int | None = None

    def show_context(self, tokens: int) -> None:
        """Context of the chat on screen (its next prompt), until the engine reports on a new reply:
        after a switch the engine still holds the previous chat, whose figures would mislead."""
        self._chat_tokens = tokens
        self.refresh()

    def watch_report(self, report: MemoryReport | None) -> None:
        self._chat_tokens = None
        if report is None:
            self.samples, self._shape = {}, ()
            self.refresh(layout=True)
            return
        used = sum(report.used.values())
        n = report.context_used
        # A shorter context than already drawn means the state restarted (another chat, or a trim).
        self.samples = {t: b for t, b in self.samples.items() if t < n}
        self.samples[n] = used
        # Streaming changes figures, not the number of lines: only a new kind of state, or the
        # ghost appearing with the first token, needs a layout pass.
        shape = (tuple(k for k, _ in KIND_LABELS if report.allocated.get(k) or report.used.get(k)),
                 bool(n and self.info.get("n_layers") and self.info.get("hidden_size")))
        if shape != self._shape:
            self._shape = shape
            self.refresh(layout=True)

    def reset_series(self) -> None:
        self.samples = {}
        self.refresh(layout=True)

    def _style(self, name: str):
        return self.get_component_rich_style(f"memory--{name}")

    def render(self) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        report = self.report
        text.append("Memory", self._style("title"))
        if report is None:
            text.append("\nno model loaded", self._style("muted"))
            return text
        dtype, quant = self.info.get("dtype"), self.info.get("quantize")
        text.append(f"  {report.device}{' · ' + dtype if dtype else ''}\n", self._style("muted"))
        self._row(text, "weights", human_bytes(report.weights), f" {quant}" if quant and quant != "none" else "")
        pool = getattr(self.app, "pool", None)
        if pool is not None:  # every engine the app holds (the chat's, compare's) against the memory budget
            usage = pool.usage()
            self._row(text, "pool", human_bytes(usage.used), f" of {human_bytes(usage.budget)}")
        for kind, label in KIND_LABELS:
            alloc, used = report.allocated.get(kind, 0), report.used.get(kind, 0)
            if alloc or used:
                extra = f" of {human_bytes(alloc)}" if alloc > used else ""
                self._row(text, label, human_bytes(used), extra)
        limit = max(report.context_limit, 1)
        width = max(8, self.size.width - LABEL_WIDTH - 4)
        used = report.context_used if self._chat_tokens is None else self._chat_tokens
        fill = int(width * min(used, limit) / limit)
        text.append(f"{'context':<{LABEL_WIDTH}}", self._style("label"))
        text.append(f"{used:,} / {report.context_limit:,} tokens\n")
        text.append(" " * LABEL_WIDTH)
        text.append("█" * fill, self._style("kv"))
        text.append("░" * (width - fill) + "\n", self._style("muted"))
        self._series(text, report, width, used)
        return text

    def _row(self, text: Text, label: str, value: str, extra: str = "") -> None:
        text.append(f"{label:<{LABEL_WIDTH}}", self._style("label"))
        text.append(f"{value:>10}")
        text.append(f"{extra}\n", self._style("muted"))

    def _series(self, text: Text, report: MemoryReport, width: int, n: int) -> None:
        """Two sparklines over the conversation's `n` tokens on one scale: state bytes and the ghost."""
        layers, hidden = self.info.get("n_layers"), self.info.get("hidden_size")
        state_now = sum(report.used.values())
        positions = list(range(1, n + 1)) if n <= width else [max(1, (i + 1) * n // width) for i in range(width)]
        state = self._state_at(positions)
        ghost = [ghost_kv_bytes(layers, hidden, p) for p in positions] if layers and hidden else []
        top = max(state + ghost + [1])
        text.append(f"{'state':<{LABEL_WIDTH}}", self._style("label"))
        text.append(f"{human_bytes(state_now)} now\n", self._style("state"))
        text.append(" " * LABEL_WIDTH)
        text.append(f"{sparkline(bucket_max(state, width), width, top) or '·':<{width}}\n", self._style("state"))
        if ghost:
            text.append(f"{'dense KV':<{LABEL_WIDTH}}", self._style("label"))
            text.append(f"{human_bytes(ghost_kv_bytes(layers, hidden, n))} now\n", self._style("ghost"))
            text.append(" " * LABEL_WIDTH)
            text.append(f"{sparkline(ghost, width, top) or '·':<{width}}\n", self._style("ghost"))
            # What the ghost is: a dense transformer of this depth and width, bf16 K and V.
            text.append(f"dense KV: {layers} layers × {hidden}, bf16 K+V", self._style("muted"))

    def _state_at(self, positions: list[int]) -> list[float]:
        """State bytes at each position: the latest sample at or before it (steps between samples)."""
        points = sorted(self.samples.items())
        out, j, last = [], 0, 0
        for p in positions:
            while j < len(points) and points[j][0] <= p:
                last = points[j][1]
                j += 1
            out.append(float(last))
        return out
