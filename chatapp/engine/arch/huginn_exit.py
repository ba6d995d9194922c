"""Huginn's per-token adaptive exit: the rules that stop the recurrence early (spec §6).

Checked against: the PerIterationExitEvaluator classes of github seal-rg/recurrent-pretraining @ 59e0b69
recpre/raven_modeling_minimal.py (fixtures/huginn adaptive_{kl,argmax_stability,latent_diff}_*).
Each rule reduces a chunk to one value per check (the last position's next-token distribution, or
the mean over the chunk's positions for the latent rules) and exits when it crosses the threshold.
Values are computed in fp32 whatever the activation dtype.
"""
from __future__ import annotations

import math

import torch

#: criterion -> (auto threshold, needs the coda's logits at every check, exits when value >= threshold).
RULES: dict[str, tuple[float, bool, bool]] = {
    "entropy-diff": (1e-3, True, False),
    "latent-diff": (0.03, False, False),
    "kl": (1e-3, True, False),
    "minp-kl": (1e-5, True, False),
    "argmax-stability": (5, True, True),
    "cosine": (1e-3, False, False),
}
CRITERIA = ("none", *RULES)


class ExitRule:
    """Stateful for one token (one chunk): `start(x0)`, then `value(x, logits)` after each checked step."""

    def __init__(self, criterion: str, threshold: float | str, vocab: int) -> None:
        if criterion not in RULES:
            raise ValueError(f"unknown exit criterion {criterion!r}; one of {', '.join(CRITERIA)}")
        auto, self.needs_logits, self.at_least = RULES[criterion]
        self.criterion = criterion
        self.threshold = auto if threshold == "auto" else float(threshold)
        if criterion == "argmax-stability":
            self.threshold = int(self.threshold)
        self.vocab = vocab

    def start(self, x0: torch.Tensor) -> None:
        self.prev_x = x0.float()
        # The reference starts the entropy at 100 and the previous distribution at uniform over the head.
        self.prev_entropy = torch.tensor(100.0, device=x0.device)
        self.prev_logp = torch.full((x0.shape[0], self.vocab), -math.log(self.vocab), device=x0.device)
        self.prev_argmax = torch.full((x0.shape[0],), -1, device=x0.device, dtype=torch.long)
        self.stable = torch.zeros(x0.shape[0], device=x0.device, dtype=torch.long)

    def value(self, x: torch.Tensor, logits: torch.Tensor | None) -> torch.Tensor:
        """The rule's value for batch row 0 (adaptive exit runs at batch 1, as the reference advises).

        x: the raw core output [B, T, h]; logits: the chunk's last-position logits [B, V] (or None).
        """
        c = self.criterion
        if c in ("latent-diff", "cosine"):
            xf = x.float()
            if c == "latent-diff":
                v = ((xf - self.prev_x).norm(dim=-1) / xf.norm(dim=-1)).mean(dim=-1)
            else:
                cos = (xf * self.prev_x).sum(-1) / xf.norm(dim=-1) / self.prev_x.norm(dim=-1)
                v = 1 - cos.mean(dim=-1)
            self.prev_x = xf
            return v[0]
        assert logits is not None
        lf = logits.float()
        if c == "entropy-diff":
            p = lf.softmax(-1)
            h = -(p * torch.log(p + 1e-10)).sum(-1)
            v, self.prev_entropy = (h - self.prev_entropy).abs(), h
            return v[0]
        if c == "argmax-stability":
            top = lf.argmax(-1)
            self.stable = torch.where(top == self.prev_argmax, self.stable + 1, torch.zeros_like(self.stable))
            self.prev_argmax = top
            return self.stable[0]
        if c == "minp-kl":
            p = lf.softmax(-1)
            # Probabilities under a tenth of the top one are flattened to 1/V, then renormalised.
            p = torch.where(p < 0.1 * p.max(-1, keepdim=True).values, torch.full_like(p, 1.0 / self.vocab), p)
            logp = (p / p.sum(-1, keepdim=True)).log()
        else:
            logp = lf.log_softmax(-1)
        # KL(previous || current), as torch's kl_div(input=current, target=previous, log_target=True).
        v = (self.prev_logp.exp() * (self.prev_logp - logp)).sum(-1)
        self.prev_logp = logp
        return v[0]

    def exits(self, value: float) -> bool:
        return value >= self.threshold if self.at_least else value < self.threshold

    def margin(self, value: float) -> float:
        """Distance of a value from the threshold (how close a decision came to flipping)."""
        return abs(value - self.threshold)
