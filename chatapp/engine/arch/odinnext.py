"""OdinNext-138M (joelhenwang): HGRN2 gated linear recurrence, alternating RoPE, SwiGLU^2 FFN, ZCRMSNorm.

Spec: shared/specs/odinnext.md. No reference code was published: checked against the card-derived fixture
(fixtures/odinnext: full-forward logits, prefill states, cached greedy steps, and one `logits_variant_*` per
alternative reading). The facts the real weights must settle are named reading options (`OPTIONS`), set by
the catalog entry and scored by `smollchat selftest`; the defaults are the spec's primary reading.

Zero-centred norms apply (1 + w) in the forward, not as a +1 in `sanitize`: the convention is itself a
reading option (block_norm, g_norm) that the selftest switches on a loaded model, and sanitize must stay
idempotent on our own state_dict (the demo checkpoints are saved from it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import RopeTable, apply_rope_half, apply_rope_interleaved, fuse, init_demo_normal, rename, rms_norm
from ..quant import project_head
from ..ops.gla import gla_chunk, gla_step
from ..ops.norm import add_rms_norm, rms_norm as fused_rms_norm
from ..state import ContextFull, RecurrentState, StateList
from .base import MAX_LAYERS, ArchArgs, ArchModel, check_options

#: Reading options: name -> choices, the spec's primary reading first (spec §9.1; golden.json hypothesis_space).
OPTIONS: dict[str, tuple[Any, ...]] = {
    "ffn_variant": ("silu_sq_gate", "sq_product", "plain"),
    "rope_layout": ("interleaved", "half_split"),
    "rope_parity": ("even", "odd", "none", "all"),
    "attn_scale": ("inv_sqrt_head_f", "one"),
    "block_norm": ("zero_centered", "standard"),
    "g_norm": ("standard", "zero_centered", "absent"),
    "g_norm_group": ("full", "per_head"),
    "logit_softcap": (0.0, 30.0),
}

# Other spellings of the config keys this file reads (spec §2: the real config.json was not seen).
CONFIG_ALIASES = {
    "d_model": "hidden_size", "dim": "hidden_size", "n_layers": "num_hidden_layers", "num_layers": "num_hidden_layers",
    "n_heads": "num_heads", "num_attention_heads": "num_heads", "head_f_dim": "expand_ratio",
    "ffn_inner": "intermediate_size", "ffn_dim": "intermediate_size", "max_seq_len": "max_position_embeddings",
    "rope_base": "rope_theta", "rms_norm_eps": "norm_eps",
}

# Stored RoPE tables are buffers, never weights: any of these in a tensor's last name component.
_ROPE_TABLE = re.compile(r"(freqs|inv_freq|rope|(^|_)cos($|_)|(^|_)sin($|_))")


@dataclass
class ModelArgs(ArchArgs):
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    # Not derivable from tensor shapes; the card says 6 (spec §2).
    num_heads: int = 6
    expand_ratio: int | None = None
    max_position_embeddings: int = 2048
    rope_theta: float = 100000.0
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    ffn_variant: str = "silu_sq_gate"
    rope_layout: str = "interleaved"
    rope_parity: str = "even"
    attn_scale: str = "inv_sqrt_head_f"
    block_norm: str = "zero_centered"
    g_norm: str = "standard"
    g_norm_group: str = "full"
    logit_softcap: float = 0.0

    CONFIG_RANGES = {"num_hidden_layers": (1, MAX_LAYERS)}

    @classmethod
    def from_config(cls, config: dict[str, Any], **options: Any) -> "ModelArgs":
        config = dict(config)
        for alias, name in CONFIG_ALIASES.items():
            if alias in config and name not in config:
                config[name] = config[alias]
        # FLA's HGRN2Config derives the head count from the expand ratio when it is not given.
        if "num_heads" not in config and config.get("expand_ratio") and "hidden_size" in config:
            config["num_heads"] = config["hidden_size"] // config["expand_ratio"]
        return super().from_config(config, **options)

    def __post_init__(self) -> None:
        check_options("odinnext", OPTIONS, {k: getattr(self, k) for k in OPTIONS})
        # FLA's HGRN2: head_f_dim = expand_ratio, head_i_dim = hidden / heads; the forget width is heads x K.
        self.head_f_dim = self.expand_ratio or self.hidden_size // self.num_heads
        self.head_i_dim = self.hidden_size // self.num_heads


class HGRN2Attention(nn.Module):
    """q = swish(Wq x), g = logsigmoid(Wf x), k = 1 - exp(g), v = Wi x; GLA scan; g_norm; Wo (spec §4)."""

    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.a, self.layer = a, layer
        self.qk_dim = a.num_heads * a.head_f_dim
        self.qfi_proj = nn.Linear(a.hidden_size, 2 * self.qk_dim + a.hidden_size, bias=False)  # q | f | i (sanitize)
        self.g_norm = None if a.g_norm == "absent" else nn.Module()
        if self.g_norm is not None:
            self.g_norm.weight = nn.Parameter(torch.ones(a.hidden_size))
        self.o_proj = nn.Linear(a.hidden_size, a.hidden_size, bias=False)

    def rotates(self) -> bool:
        parity = self.a.rope_parity
        return parity == "all" or (parity == "even" and self.layer % 2 == 0) or (parity == "odd" and self.layer % 2 == 1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, state: RecurrentState | None) -> torch.Tensor:
        a = self.a
        b, t, _ = x.shape
        h, dk, dv = a.num_heads, a.head_f_dim, a.head_i_dim
        q, f, v = self.qfi_proj(x).split([self.qk_dim, self.qk_dim, a.hidden_size], dim=-1)
        q = F.silu(q).view(b, t, h, dk)
        f = f.float().view(b, t, h, dk)
        g = F.logsigmoid(f)  # log forget gate, fp32, unbounded below
        k = torch.sigmoid(-f)  # = 1 - exp(g), without the cancellation
        v = v.view(b, t, h, dv)
        if self.rotates():
            rope = apply_rope_interleaved if a.rope_layout == "interleaved" else apply_rope_half
            # One rotation call for q and k (both in fp32): half the small ops of a decode step.
            q, k = rope(torch.cat([q.float(), k], dim=2), cos, sin).split(h, dim=2)
        scale = dk ** -0.5 if a.attn_scale == "inv_sqrt_head_f" else 1.0
        if state is None:
            o, _ = gla_chunk(q, k, v, g, scale)
        elif t == 1:
            o, _ = gla_step(q, k, v, g, scale, state.state, out_state=state.state)
        else:
            o, s = gla_chunk(q, k, v, g, scale, state.state)
            state.state.copy_(s)
        return self.o_proj(self._norm(o))  # o [B, T, H, V]

    def _norm(self, o: torch.Tensor) -> torch.Tensor:
        a = self.a
        b, t = o.shape[:2]
        if self.g_norm is None:
            return o.reshape(b, t, -1)
        w, zc = self.g_norm.weight, a.g_norm == "zero_centered"
        if a.g_norm_group == "per_head":
            return fused_rms_norm(o, w.view(a.num_heads, a.head_i_dim), a.norm_eps, zc).reshape(b, t, -1)
        return fused_rms_norm(o.reshape(b, t, -1), w, a.norm_eps, zc)  # all heads jointly (FLA)


class MLP(nn.Module):
    """SwiGLU^2: down(silu(gate)^2 * up) in the primary reading (spec §4)."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.a = a
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)  # gate | up (sanitize)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.a.intermediate_size, dim=-1)
        act = F.silu(gate)
        if self.a.ffn_variant == "silu_sq_gate":
            hidden = act * act * up
        elif self.a.ffn_variant == "sq_product":
            hidden = (act * up).square()
        else:
            hidden = act * up
        return self.down_proj(hidden)


class Norm(nn.Module):
    """RMSNorm whose zero-centring (apply 1 + w) follows the `block_norm` reading, switchable at run time."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.a = a
        self.weight = nn.Parameter(torch.zeros(a.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.a.norm_eps, self.a.block_norm == "zero_centered")


class Block(nn.Module):
    def __init__(self, a: ModelArgs, layer: int) -> None:
        super().__init__()
        self.attn_norm = Norm(a)
        self.attn = HGRN2Attention(a, layer)
        self.mlp_norm = Norm(a)
        self.mlp = MLP(a)
        # Scalar residual gates, applied as sigmoid(gate); stored as [] or [1] (sanitize makes them [1]).
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x, cos, sin, state):
        # Scalar gates: sigmoid in fp32, then the activation dtype (spec §4 step 2).
        g_attn, g_ffn = (torch.sigmoid(p.float()).to(x.dtype) for p in (self.gate_attn, self.gate_ffn))
        n = self.mlp_norm  # the gated residual add and the MLP's norm: one fused kernel on CUDA (ops/norm)
        x, h = add_rms_norm(x, self.attn(self.attn_norm(x), cos, sin, state), n.weight, n.a.norm_eps,
                            n.a.block_norm == "zero_centered", gate=g_attn)
        return torch.addcmul(x, g_ffn, self.mlp(h))


class Backbone(nn.Module):
    """Everything under the checkpoint's `model.` prefix."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(a.vocab_size, a.hidden_size)
        self.layers = nn.ModuleList(Block(a, i) for i in range(a.num_hidden_layers))
        self.norm = Norm(a)


class Model(ArchModel):
    OPTIONS = OPTIONS

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = Backbone(args)
        # Tied to the embedding unless the checkpoint carries a different head (sanitize decides).
        self.lm_head: nn.Linear | None = None
        self._rope = RopeTable(args.head_f_dim, args.rope_theta, args.max_position_embeddings)

    @property
    def max_context(self) -> int:
        # The released RoPE cache has 2,048 rows: cumulative positions stop there (spec §6).
        return self.args.max_position_embeddings

    def options(self) -> dict[str, Any]:
        """The reading options in force."""
        return {k: getattr(self.args, k) for k in OPTIONS}

    def set_options(self, **values: Any) -> None:
        """Switch reading options on the loaded model (the selftest scores each one this way)."""
        check_options("odinnext", OPTIONS, values)
        if "g_norm" in values and (values["g_norm"] == "absent") != (self.args.g_norm == "absent"):
            raise ValueError("g_norm 'absent' changes the tensor inventory; reload the model to switch it")
        for k, v in values.items():
            setattr(self.args, k, v)

    init_demo_weights = init_demo_normal  # no reference init was published

    def forward(self, ids: torch.Tensor, state: StateList | None = None, last_only: bool = False) -> torch.Tensor:
        t = ids.shape[1]
        start = 0
        if state is not None:
            state.check_room(t)
            start = state.length
        if start + t > self.args.max_position_embeddings:
            raise ContextFull(f"OdinNext's RoPE table covers {self.args.max_position_embeddings} positions; "
                              f"{start} + {t} tokens go past it (start a new chat or shorten the prompt)")
        cos, sin = self._rope(start, t, ids.device)
        x = self.model.embeddings(ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, state[i] if state is not None else None)
        if state is not None:
            state.advance(t)
        if last_only:
            x = x[:, -1:]
        x = self.model.norm(x)
        head = self.lm_head.weight if self.lm_head is not None else self.model.embeddings.weight
        logits = project_head(self, x, head)
        if self.args.logit_softcap:
            logits = self.args.logit_softcap * torch.tanh(logits / self.args.logit_softcap)
        return logits

    def make_state(self, max_len: int, device, dtype, batch: int = 1) -> StateList:
        """One fp32 [B, H, K, V] matrix per layer, whatever the compute dtype: its size never grows."""
        a = self.args
        shape = (batch, a.num_heads, a.head_f_dim, a.head_i_dim)
        return StateList([RecurrentState(shape, device) for _ in range(a.num_hidden_layers)],
                         max_len=min(max_len, a.max_position_embeddings))

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a = self.args
        # An export without the HF wrapper lacks the "model." prefix.
        if not any(k.startswith("model.") for k in weights):
            weights = {(k if k.startswith("lm_head.") else "model." + k): v for k, v in weights.items()}
        # Other plausible names of the embedding (spec §3.2).
        for alt in ("model.embed_tokens.weight", "model.tok_embeddings.weight", "model.wte.weight"):
            rename(weights, alt, "model.embeddings.weight")
        # Stored RoPE tables are recomputed, never trusted.
        for name in [k for k in weights if _ROPE_TABLE.search(k.rsplit(".", 1)[-1])]:
            weights.pop(name)
        # The tied head may be stored a second time; keep one copy unless they really differ.
        self.keep_one_head(weights, "model.embeddings.weight")
        for i in range(a.num_hidden_layers):
            p = f"model.layers.{i}."
            # q | f | i fused into one matmul.
            fuse(weights, p + "attn.qfi_proj.weight", [p + f"attn.{n}_proj.weight" for n in ("q", "f", "i")])
            # gate | up fused into one matmul.
            fuse(weights, p + "mlp.gate_up_proj.weight", [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"])
            # The author's own fused name (gate = first half, spec §3.2).
            rename(weights, p + "mlp.w_gate_up.weight", p + "mlp.gate_up_proj.weight")
            for gate in ("gate_attn", "gate_ffn"):
                w = weights.get(p + gate)
                # Scalar gates stored 0-dim become [1] (a per-channel [hidden] gate: fit_checkpoint).
                if w is not None and w.dim() == 0:
                    weights[p + gate] = w.reshape(1)
        return weights

    def fit_checkpoint(self, weights: dict[str, torch.Tensor]) -> None:
        super().fit_checkpoint(weights)
        hidden = self.args.hidden_size
        for i, layer in enumerate(self.model.layers):
            for gate in ("gate_attn", "gate_ffn"):
                w = weights.get(f"model.layers.{i}.{gate}")
                if w is not None and w.shape == (hidden,):
                    # A per-channel residual gate instead of the scalar one: the parameter takes its shape.
                    old = getattr(layer, gate)
                    setattr(layer, gate, nn.Parameter(torch.zeros(hidden, device=old.device, dtype=old.dtype)))
