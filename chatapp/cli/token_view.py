"""How the one-shot answer is written: plain text, tokens coloured by probability (--show-probs, on a
terminal), or one JSON object per token (--json, for scripts).

Model output is untrusted: text written to a terminal passes `textsafe.strip_controls`; JSON escapes
every control character itself. Probabilities are the model's raw ones (the engine's default; see
contract.TokenDetail).
"""
from __future__ import annotations

import json
import math
from typing import Any, TextIO

from ..contract import Done, StepEvent
from ..textsafe import strip_controls

#: (lowest probability, 256-colour foreground) from sure to unsure; the legend prints the same scale.
SCALE = ((0.9, 34), (0.6, 148), (0.3, 214), (0.1, 202), (0.0, 196))
_RESET = "\x1b[0m"


def legend() -> str:
    """One line naming the colours (written to stderr, so the answer on stdout stays clean)."""
    labels = [f">={lo:g}" for lo, _ in SCALE[:-1]] + [f"<{SCALE[-2][0]:g}"]
    return "token probability: " + " ".join(f"\x1b[38;5;{c}m{label}{_RESET}" for label, (_, c) in zip(labels, SCALE))


class TokenWriter:
    """Writes the stream of one answer in one of three modes: "plain", "probs" or "json"."""

    def __init__(self, mode: str, out: TextIO, tokenizer: Any = None) -> None:
        if mode not in ("plain", "probs", "json"):
            raise ValueError(f"unknown output mode {mode!r}")
        tty = _is_tty(out)
        # Colours only where a person reads them; a pipe gets the plain answer.
        self.mode = "plain" if mode == "probs" and not tty else mode
        # Model text never drives a terminal: escape sequences are stripped on a TTY; a pipe gets the bytes.
        self.strip = tty
        self.out = out
        self.tokenizer = tokenizer

    def write(self, ev: StepEvent | Done) -> None:
        if self.mode == "json":
            line = self._json_token(ev) if isinstance(ev, StepEvent) else self._json_done(ev)
            self.out.write(json.dumps(line, ensure_ascii=False) + "\n")
        elif isinstance(ev, StepEvent) and self.mode == "probs" and ev.text and ev.logprob is not None:
            colour = next(c for lo, c in SCALE if math.exp(ev.logprob) >= lo)
            self.out.write(f"\x1b[38;5;{colour}m{strip_controls(ev.text)}{_RESET}")
        else:
            self.out.write(strip_controls(ev.text) if self.strip else ev.text)
        self.out.flush()

    def end(self) -> None:
        if self.mode != "json":
            self.out.write("\n")

    def _json_token(self, ev: StepEvent) -> dict[str, Any]:
        alts = None
        if ev.alternatives is not None:
            alts = [{"id": i, "text": self._piece(i), "prob": math.exp(lp)} for i, lp in ev.alternatives]
        return {"text": ev.text, "id": ev.token_id, "prob": None if ev.logprob is None else math.exp(ev.logprob),
                "entropy": ev.entropy, "alternatives": alts, "steps": ev.steps}

    @staticmethod
    def _json_done(done: Done) -> dict[str, Any]:
        return {"done": True, "text": done.text, "stop_reason": done.stop_reason, "prompt_tokens": done.prompt_tokens,
                "new_tokens": done.new_tokens, "reused_tokens": done.reused_tokens,
                "decode_tok_s": done.decode_tok_s, "ttft_s": done.ttft_s}

    def _piece(self, token_id: int) -> str:
        # One token alone may be part of a UTF-8 sequence: the tokenizer shows it with replacement signs.
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else ""


def _is_tty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False
