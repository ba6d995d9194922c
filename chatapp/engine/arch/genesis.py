"""Genesis-152M (guiferrarib): a Gated DeltaNet + FoX hybrid with a µP readout and an optional TTT head.

Spec: shared/specs/genesis.md. Checked against: PyPI genesis-llm==2.0.3 (genesis/model.py,
attention/base.py, attention/forgetting.py, dynamics/ttt.py) through fixtures/genesis: full-forward
logits, cached step logits, greedy ids, and `logits_ttt` through the TTT scoring mode.

Layer i is FoX (softmax attention with a forget gate, no RoPE) when (i + 1) % interval == 0, else GDN:
gated linear attention with one decay per head, partial RoPE and short convolutions. The delta rule the
card describes never runs in the reference's inference paths, so neither does it here (spec §3.2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import PartialRope, RMSNorm, apply_rope_matrices, fuse, rename
from ..quant import project_head
from ..ops.forgetting_attn import forgetting_attn_chunk, forgetting_attn_step
from ..ops.forgetting_attn.cache import ForgettingKVCache
from ..ops.gla import gla_chunk, gla_step
from ..ops.norm import add_rms_norm, rms_norm, rms_norm_gated
from ..state import CompositeState, ConvState, RecurrentState, StateList
from .base import MAX_LAYERS, ArchArgs, ArchModel

#: The reference's fallback when a checkpoint carries no `genesis_config_json` (GenesisConfig.genesis_147m).
GENESIS_147M = dict(vocab_size=50304, n_embd=576, n_layer=30, block_size=2048, n_head=9, n_kv_head=3,
                    gla_expand_k=0.75, gla_expand_v=1.5, ttt_rank=4, use_selective_activation=False, use_mup=True)
#: Mixing weight of the TTT head; a code default the metadata cannot set (spec §1).
TTT_STRENGTH = 0.2


@dataclass
class ModelArgs(ArchArgs):
    # Defaults are GenesisConfig's dataclass defaults: the reference fills keys missing from the metadata with them.
    vocab_size: int = 50304
    n_embd: int = 768
    n_layer: int = 12
    block_size: int = 1024
    n_head: int = 12
    n_kv_head: int = 4
    use_gla: bool = True
    gla_expand_k: float = 1.0
    gla_expand_v: float = 1.0
    gla_use_short_conv: bool = True
    gla_conv_size: int = 4
    gla_qk_norm: str = "l2"
    gla_use_mamba_gate: bool = True
    gla_fuse_norm_gate: bool = True
    use_hybrid_layout: bool = True
    hybrid_full_attn_ratio: float = 0.25
    use_fox: bool = True
    use_fox_pro: bool = True
    use_ttt: bool = True
    ttt_inner_lr: float = 0.01
    ttt_rank: int = 8
    ttt_mode: str = "dual"
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    use_zero_centered_norm: bool = True
    use_selective_activation: bool = True
    selective_k_ratio: float = 0.5
    use_mup: bool = False
    mup_base_width: int = 256
    mup_output_mult: float = 1.0

    CONFIG_RANGES = {"n_layer": (1, MAX_LAYERS)}

    @classmethod
    def from_config(cls, config, **options):
        # No Genesis key at all means no metadata: the reference then builds its genesis_147m preset.
        if not any(f.name in config for f in fields(cls)):
            config = {**GENESIS_147M, **config}
        return super().from_config(config, **options)

    def __post_init__(self) -> None:
        unsupported = [name for name, ok in (
            ("use_gla=false", self.use_gla), ("use_fox=false", self.use_fox),
            ("use_fox_pro=false", self.use_fox_pro), ("gla_qk_norm other than l2", self.gla_qk_norm == "l2"),
            ("gla_use_mamba_gate=false", self.gla_use_mamba_gate), ("gla_use_short_conv=false", self.gla_use_short_conv),
            ("gla_fuse_norm_gate=false", self.gla_fuse_norm_gate),
            ("use_zero_centered_norm=false", self.use_zero_centered_norm),
            ("ttt_mode other than dual", self.ttt_mode == "dual"),
        ) if not ok]
        if unsupported:
            raise ValueError(f"Genesis variants not implemented: {', '.join(unsupported)}")
        # The reference always recomputes head_dim from the width.
        self.head_dim = self.n_embd // self.n_head
        self.groups = self.n_head // self.n_kv_head
        key_dim = int(self.n_head * self.head_dim * self.gla_expand_k)
        value_dim = int(self.n_head * self.head_dim * self.gla_expand_v)
        self.dk, self.dv = key_dim // self.n_head, value_dim // self.n_head
        self.rotary_dim = int(self.dk * 0.5) // 2 * 2
        self.intermediate_size = int(self.n_embd * 2.5)
        self.ffn_keep = (max(1, int(self.intermediate_size * self.selective_k_ratio))
                         if self.use_selective_activation and self.selective_k_ratio < 1.0 else self.intermediate_size)
        ratio = self.hybrid_full_attn_ratio
        interval = int(1 / ratio) if self.use_hybrid_layout and ratio > 0 else self.n_layer + 1
        self.fox_layers = tuple(i for i in range(self.n_layer) if (i + 1) % interval == 0)


def short_conv(x: torch.Tensor, w: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
    """Causal depthwise conv + SiLU. x [B, T, C], w [C, W]; tail [B, C, W-1] (ConvState) holds the inputs
    before x (zeros at the start) and is updated in place; None = a fresh sequence."""
    width = w.shape[-1]
    xt = x.transpose(1, 2)
    xp = F.pad(xt, (width - 1, 0)) if tail is None else torch.cat([tail.to(x.dtype), xt], dim=-1)
    if tail is not None:
        tail.copy_(xp[..., -(width - 1):])
    if x.shape[1] == 1:
        y = (xp.float() * w.float()).sum(-1, keepdim=True).to(x.dtype)
    else:
        y = F.conv1d(xp, w.unsqueeze(1), groups=w.shape[0])
    return F.silu(y.transpose(1, 2))


class GatedDeltaNet(nn.Module):
    """GDN mixer as inference runs it: S_t = e^{g_t} S_{t-1} + k_t v_tᵀ, o_t = q_tᵀ S_t / sqrt(dk)."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.a = a
        h, hkv = a.n_head, a.n_kv_head
        self.splits = [h * a.dk, hkv * a.dk, hkv * a.dv, h * a.dv, h]  # q | k | v | output gate | decay logits
        self.in_proj = nn.Linear(a.n_embd, sum(self.splits), bias=False)
        self.conv_weight = nn.Parameter(torch.empty(sum(self.splits[:3]), a.gla_conv_size))
        nn.init.uniform_(self.conv_weight, -a.gla_conv_size ** -0.5, a.gla_conv_size ** -0.5)
        self.A_log = nn.Parameter(torch.empty(h).uniform_(0.5, 8).log())
        dt = torch.empty(h).uniform_(math.log(1e-3), math.log(0.1)).exp()
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # Per-head output norm: plain weight, eps 1e-5 whatever norm_eps says (spec §3.2).
        self.g_norm_swish_gate = RMSNorm(a.dv, eps=1e-5)
        self.o_proj = nn.Linear(h * a.dv, a.n_embd, bias=False)

    def forward(self, x, rope: torch.Tensor, st: CompositeState | None) -> torch.Tensor:
        a = self.a
        b, t, _ = x.shape
        qkv, gate, gk = self.in_proj(x).split([sum(self.splits[:3]), *self.splits[3:]], dim=-1)
        qkv = short_conv(qkv, self.conv_weight, st.conv.state if st is not None else None)
        q, k, v = qkv.split(self.splits[:3], dim=-1)
        # L2 norm and partial half-split RoPE are per head: apply them to q and the kv heads in one go.
        qk = torch.cat([q.view(b, t, a.n_head, a.dk), k.view(b, t, a.n_kv_head, a.dk)], dim=2).float()
        qk = qk / (qk.norm(dim=-1, keepdim=True) + 1e-6)
        q, k = apply_rope_matrices(qk, rope).split([a.n_head, a.n_kv_head], dim=2)  # rope [T, dk, dk]
        # Query head h reads kv head h % n_kv_head (the reference tiles; FoX layers interleave).
        k = k.unsqueeze(2).expand(b, t, a.groups, a.n_kv_head, a.dk).reshape(b, t, a.n_head, a.dk)
        v = v.reshape(b, t, 1, a.n_kv_head, a.dv).expand(b, t, a.groups, a.n_kv_head, a.dv)
        v = v.reshape(b, t, a.n_head, a.dv)
        g = -self.A_log.float().exp() * F.softplus(gk.float() + self.dt_bias.float())  # [B, T, H] log decay
        scale = a.dk ** -0.5
        if st is None:
            o, _ = gla_chunk(q, k, v, g, scale)
        elif t == 1:
            s = st.recurrent.state
            o, _ = gla_step(q, k, v, g, scale, s, out_state=s)
        else:
            o, s = gla_chunk(q, k, v, g, scale, st.recurrent.state)
            st.recurrent.state.copy_(s)
        o = rms_norm_gated(o, self.g_norm_swish_gate.weight, gate.view(b, t, a.n_head, a.dv), 1e-5)
        return self.o_proj(o.reshape(b, t, -1))


class ForgettingAttention(nn.Module):
    """FoX "Pro": softmax attention biased by summed log forget gates, qk-norm, k/v convs, gated output norm."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.a = a
        h, hkv, d = a.n_head, a.n_kv_head, a.head_dim
        self.splits = [h * d, hkv * d, h * d, h * d, h]  # q | k | v | output gate | forget logits
        self.in_proj = nn.Linear(a.n_embd, sum(self.splits), bias=False)
        self.fgate_bias = nn.Parameter(torch.full((h,), 2.0))
        self.conv_weight = nn.Parameter(torch.empty(sum(self.splits[1:3]), a.gla_conv_size))
        nn.init.uniform_(self.conv_weight, -a.gla_conv_size ** -0.5, a.gla_conv_size ** -0.5)
        self.q_norm = RMSNorm(h * d)
        self.k_norm = RMSNorm(hkv * d)
        self.output_norm = RMSNorm(d)
        self.o_proj = nn.Linear(h * d, a.n_embd, bias=False)

    def forward(self, x, st: CompositeState | None) -> torch.Tensor:
        a = self.a
        b, t, _ = x.shape
        h, hkv, d = a.n_head, a.n_kv_head, a.head_dim
        q, kv, gate, f = self.in_proj(x).split([self.splits[0], sum(self.splits[1:3]), *self.splits[3:]], dim=-1)
        kv = short_conv(kv, self.conv_weight, st.conv.state if st is not None else None)
        k, v = kv.split(self.splits[1:3], dim=-1)
        # Per-head RMS norm, each head with its own slice of the [H * D] weight (one kernel on CUDA: ops/norm).
        q = rms_norm(q.view(b, t, h, d), self.q_norm.weight.view(h, d), 1e-6)
        k = rms_norm(k.view(b, t, hkv, d), self.k_norm.weight.view(hkv, d), 1e-6)
        v = v.view(b, t, h, d)
        log_f = F.logsigmoid(f.float() + self.fgate_bias.float())  # [B, T, H]
        if st is None:
            o = forgetting_attn_chunk(q, k.transpose(1, 2), v.transpose(1, 2), log_f.cumsum(1).transpose(1, 2))
        else:
            k_all, v_all, c_all = st.kv.update(k, v, log_f)
            o = (forgetting_attn_step if t == 1 else forgetting_attn_chunk)(q, k_all, v_all, c_all)
        o = rms_norm_gated(o, self.output_norm.weight, gate.view(b, t, h, d), 1e-6)
        return self.o_proj(o.reshape(b, t, -1))


class FeedForward(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.width, self.keep = a.intermediate_size, a.ffn_keep
        self.gate_up_proj = nn.Linear(a.n_embd, 2 * a.intermediate_size, bias=False)
        self.down_proj = nn.Linear(a.intermediate_size, a.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.width, dim=-1)
        hid = F.silu(gate) * up
        if self.keep < self.width:
            # Selective activation runs at inference only: zero all but the `keep` largest |h| per token.
            drop = hid.float().abs().topk(self.width - self.keep, dim=-1, largest=False).indices
            hid = hid.scatter(-1, drop, 0.0)
        return self.down_proj(hid)


class Block(nn.Module):
    def __init__(self, a: ModelArgs, fox: bool) -> None:
        super().__init__()
        self.fox = fox
        # Zero-centred norms: sanitize folds the stored omega into weight = 1 + omega.
        self.attn_norm = RMSNorm(a.n_embd, a.norm_eps)
        self.attn = ForgettingAttention(a) if fox else GatedDeltaNet(a)
        self.ffn_norm = RMSNorm(a.n_embd, a.norm_eps)
        self.ffn = FeedForward(a)

    def forward(self, x, rope, st):
        h = self.attn_norm(x)
        n = self.ffn_norm  # the residual add and the FFN's norm: one fused kernel on CUDA (ops/norm)
        x, h = add_rms_norm(x, self.attn(h, st) if self.fox else self.attn(h, rope, st), n.weight, n.eps)
        return x + self.ffn(h)


class _Scale(nn.Module):
    def __init__(self, dim: int, value: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.full((dim,), value))


class TTTLayer(nn.Module):
    """Dual-form test-time training with the inference fast path (Q = K = V = LayerNorm(x)), spec §3.5."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        d = a.n_embd
        self.lr_cap = a.ttt_inner_lr
        self.W0 = nn.Parameter(torch.eye(d) * 0.1)
        self.A_init = nn.Parameter(torch.randn(d, a.ttt_rank) * 0.01)
        self.B_init = nn.Parameter(torch.zeros(a.ttt_rank, d))
        self.log_lr = nn.Parameter(torch.full((d,), math.log(a.ttt_inner_lr)))
        self.out_proj = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.output_gate = nn.Linear(d, d, bias=False)
        self.layer_scale = _Scale(d, 1e-4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).float()
        lr = self.log_lr.float().exp().clamp(max=self.lr_cap)
        y0 = h @ self.W0.float() + (h @ self.A_init.float()) @ self.B_init.float()
        # Gradient of each token's reconstruction loss, summed over the tokens strictly before it.
        grad = h * (y0 - h)
        before = grad.cumsum(1) - grad
        pos = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32)
        out = y0 - h * lr * before / (1.0 + 0.1 * pos.log())[:, None]
        out = out.to(x.dtype) * torch.sigmoid(self.output_gate(x))
        return x + self.out_proj(out) * self.layer_scale.scale


class Metacognition(nn.Module):
    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        d = a.n_embd
        self.self_model = nn.Linear(d, d, bias=False)
        self.ttt = TTTLayer(a)
        self.confidence = nn.Sequential(nn.Linear(2 * d, d // 2), nn.SiLU(), nn.Linear(d // 2, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapted = self.ttt(x)
        conf = self.confidence(torch.cat([self.self_model(x), adapted], dim=-1))
        # One confidence for the whole batch and sequence: every position depends on every other (non-causal).
        w = TTT_STRENGTH * conf.float().mean()
        return (w * adapted + (1.0 - w) * x).to(x.dtype)


class Model(ArchModel):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_emb = nn.Embedding(args.vocab_size, args.n_embd)
        self.blocks = nn.ModuleList(Block(args, i in args.fox_layers) for i in range(args.n_layer))
        self.metacognition = Metacognition(args) if args.use_ttt else None
        self.ln_f = RMSNorm(args.n_embd, args.norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.n_embd, args.vocab_size, bias=False)
        # µP readout: the final hidden state is scaled by output_mult / (width / base_width) before the head.
        self.readout_scale = args.mup_output_mult * args.mup_base_width / args.n_embd if args.use_mup else 1.0
        # Partial RoPE on the first rotary_dim dims of each GDN head, base 10000 (the reference's constant).
        self._rope = PartialRope(args.dk, args.rotary_dim, 10000.0, args.block_size)
        # Gate parameters stay fp32 (the reference computes every gate in fp32); names as stored.
        self.FP32_TENSORS = {f"blocks.{i}.attn.{n}" for i in range(args.n_layer)
                             for n in ("A_log", "dt_bias", "fgate_proj.bias", "fgate_bias")}

    @property
    def max_context(self) -> int:
        # Trained on block_size windows; the reference crops prompts to it (spec §5).
        return self.args.block_size

    def forward(self, ids: torch.Tensor, state: StateList | None = None, last_only: bool = False,
                ttt: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (fp32). `ttt=True` is the reference's scoring forward with the TTT head: its
        sequence-mean confidence makes every position depend on later tokens, so it is NON-CAUSAL, has no
        cached form, and never runs in generation (as in the reference)."""
        if ttt and state is not None:
            raise ValueError("the TTT scoring mode is non-causal and cannot run on a decode state")
        t = ids.shape[1]
        start = 0
        if state is not None:
            state.check_room(t)
            start = state.length
        rope = self._rope.matrices(start, t, ids.device)  # once per forward for every GDN layer
        x = self.tok_emb(ids)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, state[i] if state is not None else None)
        if state is not None:
            state.advance(t)
        if ttt and self.metacognition is not None:
            x = self.metacognition(x)
        if last_only:
            x = x[:, -1:]
        x = self.ln_f(x) * self.readout_scale
        head = self.lm_head.weight if self.lm_head is not None else self.tok_emb.weight
        return project_head(self, x, head)

    def make_state(self, max_len: int, device, dtype) -> StateList:
        """GDN layers: fp32 S [1, H, dk, dv] + conv tails of raw q|k|v; FoX layers: compact KV cache + k|v tails."""
        a = self.args
        width = a.gla_conv_size
        states = []
        for i in range(a.n_layer):
            if i in a.fox_layers:
                kv = ForgettingKVCache(max_len, a.n_head, a.n_kv_head, a.head_dim, a.n_head, a.head_dim, device, dtype)
                states.append(CompositeState(kv=kv, conv=ConvState((a.n_kv_head + a.n_head) * a.head_dim, width,
                                                                   device, dtype)))
            else:
                rec = RecurrentState((1, a.n_head, a.dk, a.dv), device)
                states.append(CompositeState(recurrent=rec, conv=ConvState(
                    (a.n_head + a.n_kv_head) * a.dk + a.n_kv_head * a.dv, width, device, dtype)))
        return StateList(states, max_len=max_len)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a = self.args
        # Buffers the reference saves with state_dict(): RoPE tables (recomputed here) and TTT bookkeeping.
        for key in [k for k in weights if ".rope." in k or k.startswith("metacognition.evolution_")]:
            del weights[key]
        # Tied head stored as tok_emb, lm_head or both; when tied the reference's load leaves lm_head's copy.
        head = weights.pop("lm_head.weight", None)
        if head is not None:
            tied = a.tie_word_embeddings or "tok_emb.weight" not in weights
            weights["tok_emb.weight" if tied else "lm_head.weight"] = head
        for key in [k for k in weights if k.endswith(".omega")]:
            # Zero-centred norms store omega and scale by (1 + omega): fold the +1 into the weight.
            omega = weights.pop(key)
            weights[key.removesuffix("omega") + "weight"] = (omega.float() + 1.0).to(omega.dtype)
        for i in range(a.n_layer):
            p = f"blocks.{i}.attn."
            if i in a.fox_layers:
                # q | k | v | output gate | forget-gate logits fused into one matmul.
                fuse(weights, p + "in_proj.weight", [p + f"{n}_proj.weight" for n in ("q", "k", "v", "ogate", "fgate")])
                # The forget gate's bias stays separate (no other projection has one).
                rename(weights, p + "fgate_proj.bias", p + "fgate_bias")
                # The k and v depthwise convs fused along channels, [C, 1, W] -> [C, W].
                fuse(weights, p + "conv_weight", [p + "k_conv.conv.weight", p + "v_conv.conv.weight"], squeeze=True)
            else:
                # q | k | v | output gate | decay logits fused into one matmul.
                fuse(weights, p + "in_proj.weight", [p + n + "_proj.weight" for n in ("q", "k", "v", "g", "gk")])
                # beta (b_proj) feeds only the training-time delta rule (spec §3.2).
                weights.pop(p + "b_proj.weight", None)
                weights.pop(p + "b_proj.bias", None)
                # The q, k and v depthwise convs fused along channels, [C, 1, W] -> [C, W].
                fuse(weights, p + "conv_weight", [p + f"conv_{n}.conv.weight" for n in "qkv"], squeeze=True)
            # SwiGLU gate | up fused into one matmul.
            f = f"blocks.{i}.ffn."
            fuse(weights, f + "gate_up_proj.weight", [f + "gate_proj.weight", f + "up_proj.weight"])
        # The TTT fast path never uses its q/k/v projections; the reflection head never reaches the logits.
        for name in ("ttt.q_proj", "ttt.k_proj", "ttt.v_proj", "reflection"):
            weights.pop(f"metacognition.{name}.weight", None)
        return weights

    def init_demo_weights(self) -> None:
        """The reference's initialisation (Genesis._init_weights) for the random demo checkpoint: with
        PyTorch's default N(0, 1) embedding the tied head only echoes the last input token."""
        a = self.args
        width = a.n_embd / a.mup_base_width if a.use_mup else 1.0
        std = 0.02 / math.sqrt(width) if width > 1 else 0.02
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, std=std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        for block in self.blocks:
            if block.fox:
                # The reference's model-wide init zeroes every Linear bias, the forget gate's included.
                nn.init.zeros_(block.attn.fgate_bias)

    def fit_checkpoint(self, weights: dict[str, torch.Tensor]) -> None:
        super().fit_checkpoint(weights)
        # The vocabulary is the embedding's row count, whatever the config says (spec §1).
        emb = weights.get("tok_emb.weight")
        if emb is not None and emb.shape[0] != self.args.vocab_size:
            self._resize_vocab(emb.shape[0])

    def _resize_vocab(self, rows: int) -> None:
        dev = self.tok_emb.weight.device
        self.args.vocab_size = rows
        self.tok_emb = nn.Embedding(rows, self.args.n_embd, device=dev)
        if self.lm_head is not None:
            self.lm_head = nn.Linear(self.args.n_embd, rows, bias=False, device=dev)
