"""Huginn-0125 (tomg-group-umd): a recurrent-depth transformer. A 2-block prelude embeds the tokens, a
4-block core is iterated `num_steps` times on a latent state with the prelude output injected through
an adapter at every step, and a 2-block coda decodes. Sandwich-normed blocks, interleaved-pair RoPE
with a q/k bias, embedding scaled by sqrt(n_embd), final norm applied before and after the coda.

Spec: shared/specs/huginn.md. Checked against: github seal-rg/recurrent-pretraining @ 59e0b69
recpre/raven_modeling_minimal.py (fixtures/huginn: logits at 0/4/8 steps, explicit initial state,
latents, greedy ids under full and compress-s8 caches, continuous compute, adaptive kl /
argmax-stability / latent-diff runs). The KV slots live in huginn_cache.py, exit rules in huginn_exit.py.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import CachedAttention, RMSNorm, RopeTable, apply_rope_interleaved, causal_attention
from ..ops.norm import add_rms_norm
from ..quant import project_head
from ...contract import resolve_controls
from .base import MAX_LAYERS, ArchArgs, ArchModel, ControlSpec, Forward, Interrupted, check_cancel
from .huginn_cache import LOOKUPS, CacheStrategy, HuginnState, like_init
from .huginn_exit import CRITERIA, ExitRule

@dataclass
class ModelArgs(ArchArgs):
    # Defaults are RavenConfig's: the real config.json is written in diff mode and omits them (spec §2).
    n_embd: int = 5280
    n_heads: int = 55
    num_key_value_heads: int | None = None
    n_layers_in_prelude: int = 2
    n_layers_in_recurrent_block: int = 4
    n_layers_in_coda: int = 2
    mean_recurrence: int = 32
    block_size: int = 4096
    vocab_size: int = 65536
    padded_vocab_size: int | None = None
    intermediate_size: int = 17920
    bias: bool = False
    qk_bias: bool = True
    norm_eps: float = 1e-6
    rope_base: float = 50000.0
    tie_embeddings: bool = True
    injection_type: str = "linear"

    CONFIG_RANGES = {k: (1, MAX_LAYERS) for k in ("n_layers_in_prelude", "n_layers_in_recurrent_block", "n_layers_in_coda")}

    def __post_init__(self) -> None:
        if self.injection_type != "linear":
            raise ValueError(f"injection_type {self.injection_type!r}: only 'linear' is implemented (spec §2)")
        self.head_dim = self.n_embd // self.n_heads
        self.n_kv_heads = self.num_key_value_heads or self.n_heads
        self.padded_vocab_size = self.padded_vocab_size or self.vocab_size
        self.n_layers = self.n_layers_in_prelude + self.n_layers_in_recurrent_block + self.n_layers_in_coda
        # Recomputed from n_embd as the reference does; config.json's init_values are not read back.
        self.emb_scale = math.sqrt(self.n_embd)
        self.init_std = math.sqrt(2 / (5 * self.n_embd))


class CausalSelfAttention(CachedAttention, nn.Module):
    def attention_heads(self) -> tuple[int, int, int, int]:
        return self.n_heads, self.n_kv, self.head_dim, self.head_dim

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = a.n_heads, a.n_kv_heads, a.head_dim
        self.Wqkv = nn.Linear(a.n_embd, (a.n_heads + 2 * a.n_kv_heads) * a.head_dim, bias=False)
        self.qk_bias = nn.Parameter(torch.zeros(2, 1, a.n_heads, a.head_dim)) if a.qk_bias else None
        self.proj = nn.Linear(a.n_embd, a.n_embd, bias=False)

    def forward(self, x, cos, sin, cache: HuginnState | None, slot: int) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.Wqkv(x).split([self.n_heads * hd, self.n_kv * hd, self.n_kv * hd], dim=-1)
        q, k, v = q.view(b, t, self.n_heads, hd), k.view(b, t, self.n_kv, hd), v.view(b, t, self.n_kv, hd)
        if self.qk_bias is not None:
            # The bias goes in before the rotation (spec §4).
            q, k = q + self.qk_bias[0], k + self.qk_bias[1]
        q, k = apply_rope_interleaved(q, cos, sin), apply_rope_interleaved(k, cos, sin)  # [B, T, H, D]
        if cache is None:
            y = causal_attention(q, k.transpose(1, 2), v.transpose(1, 2))
        else:
            k_all, v_all, keep = cache.attend_kv(slot, k, v)  # [B, Hkv, L, D], keep [L] or None
            y = causal_attention(q, k_all, v_all, keep=keep, product=self.decode_attention)
        return self.proj(y.reshape(b, t, -1))


class GatedMLP(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.fc = nn.Linear(a.n_embd, 2 * a.intermediate_size, bias=False)  # gate | up, as stored
        self.proj = nn.Linear(a.intermediate_size, a.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc(x).chunk(2, dim=-1)
        return self.proj(F.silu(gate) * up)


class SandwichBlock(nn.Module):
    """Pre- and post-norm around each sublayer: the residual stream is re-normalised twice per block."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.norm_1 = RMSNorm(a.n_embd, a.norm_eps)
        self.attn = CausalSelfAttention(a)
        self.norm_2 = RMSNorm(a.n_embd, a.norm_eps)
        self.mlp = GatedMLP(a)
        self.norm_3 = RMSNorm(a.n_embd, a.norm_eps)
        self.norm_4 = RMSNorm(a.n_embd, a.norm_eps)

    def forward(self, x, cos, sin, cache, slot):
        # norm(sublayer + x): the add and the norm are one fused kernel on CUDA (ops/norm); only the norm is kept.
        n2, n4 = self.norm_2, self.norm_4
        x = add_rms_norm(x, self.attn(self.norm_1(x), cos, sin, cache, slot), n2.weight, n2.eps)[1]
        return add_rms_norm(x, self.mlp(self.norm_3(x)), n4.weight, n4.eps)[1]


_STRATEGIES = (*LOOKUPS, "compress-s*", "compress-r*", "compress-anchor", *(f"{lk}-compress-*" for lk in LOOKUPS))


class Model(ArchModel):
    CONTROLS = (
        ControlSpec("num_steps", "recurrence steps", "int", 32, 1, 128,
                    help="core iterations per token; the card: <4 is coarse, gains up to ~64 (each ~1.6B params read)"),
        ControlSpec("exit_criterion", "early exit", "choice", "none", choices=CRITERIA,
                    help="stop iterating a token once this rule says it has settled (num_steps is the cap)"),
        ControlSpec("exit_threshold", "exit threshold", "float", "auto", min=0.0,
                    help="auto = the reference's default for the rule (kl 1e-3, argmax-stability 5, ...)"),
        ControlSpec("min_steps", "min steps", "int", 0, 0, 128, help="no exit test before this many steps"),
        ControlSpec("check_every", "check every", "int", 1, 1, 128, help="test the exit rule every n steps"),
        ControlSpec("state_init", "initial state", "choice", "like-init", choices=("like-init", "zero"),
                    help="like-init: the reference's scaled truncated-normal noise (seeded); zero: deterministic"),
        ControlSpec("state_seed", "state seed", "int", 0, 0, 2**31 - 1,
                    help="seed of the like-init noise (per position, so runs and prefill/decode agree)"),
        ControlSpec("continuous_compute", "warm start", "bool", False,
                    help="start each new token from the previous token's final state"),
        ControlSpec("cache_strategy", "KV cache", "choice", "full", choices=_STRATEGIES, check=CacheStrategy.parse,
                    live=False,
                    help="full / latest-m4 (early exit) / compress-sN (ring of N core slots) / <lookup>-compress-..."),
        ControlSpec("draft_steps", "speculative draft", "int", 0, 0, 128,
                    help="greedy only: draft tokens with this many steps, verify at num_steps (0 = off)",
                    changes_state=False),
        ControlSpec("draft_tokens", "draft length", "int", 4, 1, 16, help="tokens drafted per verification",
                    changes_state=False),
    )

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = a = args
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(a.padded_vocab_size, a.n_embd),
            prelude=nn.ModuleList(SandwichBlock(a) for _ in range(a.n_layers_in_prelude)),
            adapter=nn.Linear(2 * a.n_embd, a.n_embd, bias=a.bias),
            core_block=nn.ModuleList(SandwichBlock(a) for _ in range(a.n_layers_in_recurrent_block)),
            coda=nn.ModuleList(SandwichBlock(a) for _ in range(a.n_layers_in_coda)),
            ln_f=RMSNorm(a.n_embd, a.norm_eps),
        ))
        self.lm_head = None if a.tie_embeddings else nn.Linear(a.n_embd, a.padded_vocab_size, bias=False)
        self._rope = RopeTable(a.head_dim, a.rope_base, a.block_size)
        # The config's mean_recurrence is this checkpoint's default depth.
        self._specs = tuple(replace(c, default=a.mean_recurrence) if c.name == "num_steps" else c
                            for c in self.CONTROLS)
        #: Speculative decoding counters since load (statistics only): verifications, tokens drafted, drafts
        #: accepted, plain steps taken.
        self.spec_stats = {"calls": 0, "drafted": 0, "accepted": 0, "plain": 0}

    @property
    def max_context(self) -> int:
        # RoPE positions were trained up to block_size (spec §2).
        return self.args.block_size

    def control_specs(self) -> tuple[ControlSpec, ...]:
        return self._specs

    def _controls(self, values: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
        """Complete control values: `values` over this checkpoint's defaults (validated by the contract;
        an engine call's Controls pass as they are)."""
        return resolve_controls(self._specs, call=values)

    def repeated_modules(self, controls: Mapping[str, Any]) -> list[tuple[nn.Module, int]]:
        # The core block runs num_steps times a token (at most that many under an exit rule).
        return [(self.transformer.core_block, int(self._controls(controls)["num_steps"]))]

    def speculator(self, controls: Mapping[str, Any], cancel: threading.Event | None = None) -> "Speculator | None":
        """Self-speculative greedy decoding for one call, where it applies: a draft depth is set and no
        per-token state couples the tokens (early exit, warm start)."""
        c = self._controls(controls)
        if c["draft_steps"] > 0 and c["exit_criterion"] == "none" and not c["continuous_compute"]:
            return Speculator(self, c, cancel)
        return None

    def infer(self, ids, state, controls=None, cancel=None, last_only=False) -> Forward:
        r = self.run(ids, state, last_only, controls=controls, cancel=cancel)
        return Forward(r.logits, r.steps)

    def forward(self, ids: torch.Tensor, state: HuginnState | None = None, last_only: bool = False,
                num_steps: int | None = None, input_states: torch.Tensor | None = None,
                controls: Mapping[str, Any] | None = None) -> torch.Tensor:
        """fp32 logits [B, T, V] ([B, 1, V] with last_only); see `run`."""
        return self.run(ids, state, last_only, num_steps, input_states, controls).logits

    def run(self, ids, state=None, last_only=False, num_steps=None, input_states=None, controls=None,
            cancel: threading.Event | None = None) -> "Run":
        """Forward a chunk under `controls` (missing ones take their defaults).

        Args:
            ids: [B, T] token ids; with a state they follow the `state.length` tokens it holds.
            num_steps: overrides the control (0 is allowed: the coda then reads ln_f(s0)).
            input_states: an explicit initial state s0 [B, T, h] (the reference's `input_states`).
            cancel: polled before every recurrence step; raises Interrupted with the state as it was.
        """
        c = self._controls(controls)
        steps = c["num_steps"] if num_steps is None else num_steps
        values: list[float] = []
        rule = None if c["exit_criterion"] == "none" else ExitRule(c["exit_criterion"], c["exit_threshold"],
                                                                   self.args.padded_vocab_size)
        if rule is not None and state is None:
            # Adaptive exit is defined on a cache (the reference's generate path); give it a private one.
            state = self.make_state(ids.shape[1], ids.device, self.transformer.wte.weight.dtype)
        start = 0
        if state is not None:
            strategy = CacheStrategy.parse(c["cache_strategy"], self.args.n_layers_in_prelude,
                                           self.args.n_layers_in_recurrent_block)
            state.begin(ids, strategy)
            start = state.length
        t = ids.shape[1]
        cos, sin = self._angles(start, t, ids.device)
        e = self.transformer.wte(ids) * self.args.emb_scale
        for i, block in enumerate(self.transformer.prelude):
            e = block(e, cos, sin, state, i)
        x = input_states.to(e.dtype) if input_states is not None else self._initial_state(e, start, state, rule, c)
        try:
            if rule is None:
                for i in range(steps):
                    x = self._step(x, e, i, cos, sin, state, cancel)
                logits, z = self._coda(x, cos, sin, state, last_only)
                used = steps
            else:
                x, logits, z, used = self._adaptive(x, e, steps, rule, c, (cos, sin), state, last_only, cancel,
                                                    values)
        except Interrupted:
            if state is not None:
                state.trim(state.length)  # drop the open chunk's entries: the state is as before this call
            raise
        if state is not None:
            state.latent.x.copy_(x[:, -1:])
            state.latent.position = start + t - 1
            state.finish()
        return Run(logits, z, used, values)

    def _step(self, x, e, i: int, cos, sin, state, cancel=None) -> torch.Tensor:
        """One recurrence: inject the prelude output through the adapter (state first), run the core."""
        check_cancel(cancel)
        x = self.transformer.adapter(torch.cat([x, e], dim=-1))
        base = self.args.n_layers_in_prelude + self.args.n_layers_in_recurrent_block * i
        for j, block in enumerate(self.transformer.core_block):
            x = block(x, cos, sin, state, base + j)
        return x

    def _coda(self, x, cos, sin, state, last_only: bool):
        """ln_f -> coda (every position: later tokens attend to its KV) -> ln_f -> head (fp32)."""
        z = self.transformer.ln_f(x)
        h = z
        for i, block in enumerate(self.transformer.coda):
            h = block(h, cos, sin, state, -(i + 1))
        h = self.transformer.ln_f(h[:, -1:] if last_only else h)
        head = self.lm_head.weight if self.lm_head is not None else self.transformer.wte.weight
        return project_head(self, h, head), z

    def _adaptive(self, x, e, max_steps: int, rule: ExitRule, c, rope, state, last_only: bool, cancel, values):
        """Iterate until the exit rule fires (checked between steps, on the host), at most max_steps;
        `values` receives the rule's value at each check."""
        cos, sin = rope
        rule.start(x)
        out, out_step, used = None, -1, max_steps
        for i in range(max_steps):
            x = self._step(x, e, i, cos, sin, state, cancel)
            if i < c["min_steps"] or (i - c["min_steps"]) % c["check_every"]:
                continue
            if rule.needs_logits:
                # The coda rewrites this chunk's coda KV at every check; the entries of the exit step remain.
                out, out_step = self._coda(x, cos, sin, state, last_only), i
            value = float(rule.value(x, out[0][:, -1] if out is not None else None))
            values.append(value)
            if rule.exits(value):
                used = i + 1
                break
        if out is None or out_step != used - 1:
            out = self._coda(x, cos, sin, state, last_only)
        return x, out[0], out[1], used

    def _initial_state(self, e: torch.Tensor, start: int, state: HuginnState | None, rule, c) -> torch.Tensor:
        t = e.shape[1]
        if (c["continuous_compute"] and state is not None and t == 1 and start > 0
                and state.latent.position == start - 1):
            # Warm start from the previous token's final state: ln_f'd on the plain path, raw under
            # adaptive exit, as the reference's generate_minimal / generate_with_adaptive_compute do.
            prev = state.latent.x.to(e.dtype)
            return prev if rule is not None else self.transformer.ln_f(prev)
        if c["state_init"] == "zero":
            return torch.zeros_like(e)
        return like_init(e.shape, start, c["state_seed"], self.args.init_std, self.args.emb_scale).to(e)

    def _angles(self, start: int, t: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if start + t > self.args.block_size:
            raise ValueError(f"position {start + t} is beyond the RoPE table of {self.args.block_size}")
        return self._rope(start, t, device)

    def make_state(self, max_len: int, device, dtype) -> HuginnState:
        a = self.args
        return HuginnState(max_len, a.n_kv_heads, a.head_dim, a.n_embd, device, dtype,
                           a.n_layers_in_prelude, a.n_layers_in_recurrent_block)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The RoPE table is stored as a persistent buffer; it is recomputed, never trusted.
        weights.pop("freqs_cis", None)
        if self.lm_head is None:
            # The card: the tied embedding was uploaded twice. One copy is kept unless they really differ.
            self.keep_one_head(weights, "transformer.wte.weight")
        return weights

    def init_demo_weights(self) -> None:
        """The reference's init (RavenPreTrainedModel._init_weights): truncated normals at ±3σ, output
        projections scaled down by the expected depth, norms at one."""
        a = self.args
        std = a.init_std
        out_std = std / math.sqrt(2 * (a.n_layers_in_prelude + a.n_layers_in_coda
                                       + a.n_layers_in_recurrent_block * a.mean_recurrence))

        def tn(w: torch.Tensor, s: float) -> None:
            nn.init.trunc_normal_(w, std=s, a=-3 * s, b=3 * s)

        tn(self.transformer.wte.weight, std)
        tn(self.transformer.adapter.weight, std)
        for block in (*self.transformer.prelude, *self.transformer.core_block, *self.transformer.coda):
            tn(block.attn.Wqkv.weight, std)
            tn(block.attn.proj.weight, out_std)
            gate, up = block.mlp.fc.weight.chunk(2)
            tn(gate, std)
            tn(up, out_std)
            tn(block.mlp.proj.weight, out_std)
        if self.lm_head is not None:
            tn(self.lm_head.weight, std)


@dataclass
class Run:
    """What one Huginn forward did: fp32 logits, latents ln_f(x_r) [B, T, h], the steps it ran, and the
    exit rule's value at each check (adaptive exit only)."""

    logits: torch.Tensor
    latents: torch.Tensor
    steps: int
    exit_values: list[float] = field(default_factory=list)


class Speculator:
    """Self-speculative greedy decoding over one call: the draft length adapts to what is accepted."""

    def __init__(self, model: Model, controls: Mapping[str, Any], cancel: threading.Event | None) -> None:
        self.model, self.c, self.cancel = model, controls, cancel
        self.k, self.skip, self.wait = 0, 0, 1

    def _forward(self, ids: list[int], state: HuginnState, num_steps: int, last_only: bool) -> torch.Tensor:
        return self.model.run(torch.tensor([ids], device=state.device), state, last_only, num_steps,
                              controls=self.c, cancel=self.cancel).logits

    @torch.inference_mode()
    def step(self, state: HuginnState, token_id: int) -> list[tuple[int, torch.Tensor, int]]:
        """The state holds everything before `token_id` (chosen, not yet absorbed). Draft `draft_tokens`
        tokens at `draft_steps`, drop them from the cache, run token_id + drafts as one chunk at
        `num_steps`, keep the drafts the full depth agrees with.

        Returns (token, logits [V] it is the argmax of, steps) for the next 1..draft_tokens+1 tokens,
        exactly what plain greedy decoding at `num_steps` gives. Afterwards the state has absorbed
        token_id and every returned token but the last (which, like token_id, is chosen, not absorbed).
        """
        c, stats, full = self.c, self.model.spec_stats, self.c["num_steps"]
        room = (state.max_len - state.length) if state.max_len is not None else c["draft_tokens"] + 1
        k = min(self.k or c["draft_tokens"], c["draft_tokens"], room - 1)
        if k < 1 or self.skip > 0:
            self.skip = max(0, self.skip - 1)
            stats["plain"] += 1
            logits = self._forward([token_id], state, full, True)[0, -1]
            return [(int(logits.argmax()), logits, full)]
        base, drafts, tok = state.length, [], token_id
        for _ in range(k):
            tok = int(self._forward([tok], state, c["draft_steps"], True)[0, -1].argmax())
            drafts.append(tok)
        state.trim(base)
        logits = self._forward([token_id, *drafts], state, full, False)[0]  # [k+1, V]
        best = logits.argmax(-1).tolist()
        m = 0
        while m < k and best[m] == drafts[m]:
            m += 1
        # Positions past the first disagreement were computed from a wrong token: drop them.
        state.trim(base + m + 1)
        # Draft length follows the acceptance: one more after a full hit, what was accepted after a miss.
        # A miss at length 1 pauses drafting for `wait` tokens (doubling up to 64), so drafts that keep
        # failing cost a bounded fraction over plain decoding instead of a verification per token.
        if m == k:
            self.k, self.wait = k + 1, 1
        elif m == 0 and k == 1:
            self.skip, self.wait = self.wait, min(2 * self.wait, 64)
        else:
            self.k = max(1, m)
        stats["calls"], stats["drafted"], stats["accepted"] = stats["calls"] + 1, stats["drafted"] + k, stats["accepted"] + m
        return [(best[i], logits[i], full) for i in range(m + 1)]
