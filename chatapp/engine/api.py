"""Moved to `chatapp.contract`; kept only until the CLI package's one-shot path imports it from there."""
from ..contract import ControlSpec, Done, MemoryReport, SamplingSettings, StepEvent  # noqa: F401
