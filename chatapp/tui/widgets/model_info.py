"""The loaded model at a glance: name, architecture, parameters, device and dtype, a random-weights
label for demo checkpoints, or the stage of a load in progress."""
from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ...textsafe import displayable
from ...units import human_count


class ModelInfo(Widget):
    COMPONENT_CLASSES = {"model-info--name", "model-info--muted", "model-info--demo"}
    """
    | Class | Description |
    | :- | :- |
    | `model-info--name` | The model's name. |
    | `model-info--muted` | Architecture, size, device. |
    | `model-info--demo` | The random-weights warning. |
    """

    DEFAULT_CSS = """
    ModelInfo { height: auto; padding: 0 1; }
    ModelInfo > .model-info--name { text-style: bold; color: $primary; }
    ModelInfo > .model-info--muted { color: $text-muted; }
    ModelInfo > .model-info--demo { color: $warning; text-style: bold; }
    """

    info: reactive[dict] = reactive(dict, layout=True)
    """Engine.info() of the loaded model; empty when none is loaded."""
    stage: reactive[str] = reactive("", layout=True)
    """What a model load in progress is doing ("" when idle)."""
    error: reactive[str] = reactive("", layout=True)
    """Why the last load failed ("" when it did not)."""

    def _style(self, name: str):
        return self.get_component_rich_style(f"model-info--{name}")

    def render(self) -> Text:
        text = Text()
        info: dict[str, Any] = self.info
        if self.stage:
            # A local model's name is its folder's path: text from outside, like the load error.
            text.append(displayable(f"Loading {info.get('name') or ''}\n"), self._style("name"))
            text.append(displayable(f"{self.stage}…"), self._style("muted"))
            return text
        if not info:
            text.append("No model loaded\n", self._style("name"))
            text.append(displayable(self.error or "Ctrl+O opens the models screen"), self._style("muted"))
            return text
        text.append(displayable(f"{info.get('name') or info.get('model_id', '?')}\n"), self._style("name"))
        parts = [info.get("architecture", "")]
        if info.get("params"):
            parts.append(f"{human_count(info['params'])} params")
        parts.append(f"{info.get('device', '?')} · {info.get('dtype', '?')}")
        text.append(" · ".join(p for p in parts if p), self._style("muted"))
        if info.get("demo"):
            text.append("\nrandom weights: output is noise", self._style("demo"))
        return text
