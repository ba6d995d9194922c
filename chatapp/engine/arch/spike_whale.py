"""SpikeWhaleLM (Quazim0t0 Byrne-86M / Escarda-86M): MLA-style MQA attention with QK-norm, partial RoPE and
XSA, an engram n-gram memory on the embeddings, hyper-connection residual streams, HRM refinement.

Spec: shared/specs/byrne.md. The attention, block and model wiring, HRM refinement, tied head and KV layout
follow quoted lines of the reference `model_v2.py` (Escarda-86M-Base @ cf953b46). The RMSNorm body, RoPE
layout, engram, hyper-connections, HCOutputMix and dense FFN were never seen: they follow the card stand-in
that made fixtures/byrne, and every uncertain fact is a named reading option (`OPTIONS`, set by the catalog's
[options]) so a real checkpoint can be matched without rewriting. Checked against fixtures/byrne (full-forward
logits, cached greedy steps, greedy ids); the engram and hyper-connections live in spike_whale_parts.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import CachedAttention, PartialRope, RMSNorm, apply_rope_matrices, causal_attention, fuse, init_demo_normal
from ..quant import project_head
from ..state import KVState, StateList
from .base import MAX_LAYERS, ArchArgs, ArchModel, check_options
from .spike_whale_parts import EngramMemory, EngramWindow, HCOutputMix, HyperConnection

#: Reading options: name -> choices, the stand-in fixture's reading first (spec §4.3, §4.6-4.9).
OPTIONS: dict[str, tuple[Any, ...]] = {
    "rope_layout": ("half_split", "interleaved"),
    "rms_norm": ("standard", "zero_centered"),
    "hc_form": ("static", "dynamic"),
    "engram_key_order": ("newest_first", "oldest_first"),
    "engram_lookup_layout": ("head_major", "order_major"),
    "engram_bit_order": ("lsb_first", "msb_first"),
    "engram_reduce": ("mean", "sum"),
    "engram_gate": ("sigmoid", "erf"),
    "ffn_act": ("silu", "gelu"),
}

# Stored rotary tables are buffers, never weights (spec §3.1).
_ROTARY_BUFFER = re.compile(r"(inv_freq|cos_cached|sin_cached|_cos|_sin)$")
# Training-only heads: multi-token prediction and JEPA never touch the logits (spec §4.5).
_TRAINING_ONLY = ("mtp_heads.", "jepa.", "model.jepa.")


@dataclass
class ModelArgs(ArchArgs):
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    nope_head_dim: int
    qk_rope_head_dim: int
    q_lora_rank: int
    o_lora_rank: int
    num_key_value_heads: int = 1
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    use_qk_norm: bool = True
    use_xsa: bool = True
    use_derf: bool = False
    use_moe: bool = False
    use_value_embed: bool = False
    # The real config.json has no intermediate_size; the stand-in reads moe_intermediate_size (spec §2.1),
    # and sanitize takes the width from the checkpoint's FFN tensors when they disagree.
    intermediate_size: int | None = None
    moe_intermediate_size: int = 2000
    use_engram: bool = True
    engram_table_size: int = 4096
    engram_max_ngram: int = 3
    engram_num_heads: int = 2
    engram_compress_dim: int = 32
    use_hyper_connections: bool = True
    hc_mult: int = 2
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    use_hrm_refine: bool = True
    hrm_refine_dim: int = 128
    hrm_refine_steps: int = 1
    rope_layout: str = "half_split"
    rms_norm: str = "standard"
    hc_form: str = "static"
    engram_key_order: str = "newest_first"
    engram_lookup_layout: str = "head_major"
    engram_bit_order: str = "lsb_first"
    engram_reduce: str = "mean"
    engram_gate: str = "sigmoid"
    ffn_act: str = "silu"

    CONFIG_RANGES = {"num_hidden_layers": (1, MAX_LAYERS)}

    def __post_init__(self) -> None:
        check_options("spike_whale", OPTIONS, {k: getattr(self, k) for k in OPTIONS})
        unsupported = [k for k in ("use_derf", "use_moe", "use_value_embed") if getattr(self, k)]
        if unsupported:
            # Their tensors were never seen (spec §1): refuse rather than guess a second time.
            raise ValueError(f"spike_whale: {', '.join(unsupported)} = true is not implemented")
        if self.nope_head_dim + self.qk_rope_head_dim != self.head_dim:
            raise ValueError(f"nope_head_dim {self.nope_head_dim} + qk_rope_head_dim {self.qk_rope_head_dim} "
                             f"!= head_dim {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.ffn_width = self.intermediate_size or self.moe_intermediate_size


class Norm(RMSNorm):
    """RMSNorm (spec §4.6: x * rsqrt(mean(x^2) + eps) * w) through torch's rms_norm: one call where the
    shared helper issues six small ops, and a decode step runs 82 norms. The weight form is the rms_norm option."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = 1.0 + self.weight if self.zero_centered else self.weight
        return F.rms_norm(x, (x.shape[-1],), w, self.eps)


def _norm(dim: int, a: ModelArgs) -> Norm:
    return Norm(dim, a.rms_norm_eps, zero_centered=a.rms_norm == "zero_centered")


class Attention(CachedAttention, nn.Module):
    """MLADerfXSAAttention without DERF (spec §4.3): low-rank Q, direct MQA K/V, QK-norm on the whole head
    before RoPE on its last qk_rope_head_dim dims, causal SDPA, XSA, low-rank output."""

    def attention_heads(self) -> tuple[int, int, int, int]:
        return self.h, self.hkv, self.d, self.d

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.a = a
        self.h, self.hkv, self.d = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        self.split = [a.q_lora_rank, self.hkv * self.d, self.hkv * self.d]
        self.qkv_a_proj = nn.Linear(a.hidden_size, sum(self.split), bias=False)  # q_a | k | v (sanitize)
        self.q_a_norm = _norm(a.q_lora_rank, a)
        self.q_b_proj = nn.Linear(a.q_lora_rank, self.h * self.d, bias=False)
        if a.use_qk_norm:
            self.q_norm = _norm(self.d, a)
            self.k_norm = _norm(self.d, a)
        self.o_a_proj = nn.Linear(self.h * self.d, a.o_lora_rank, bias=False)
        self.o_b_proj = nn.Linear(a.o_lora_rank, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv: KVState | None) -> torch.Tensor:
        b, t, _ = x.shape
        h, hkv, d = self.h, self.hkv, self.d
        qa, k, v = self.qkv_a_proj(x).split(self.split, dim=-1)
        q = self.q_b_proj(self.q_a_norm(qa)).view(b, t, h, d)
        k, v = k.view(b, t, hkv, d), v.view(b, t, hkv, d)
        if self.a.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope_matrices(q, rope), apply_rope_matrices(k, rope)  # rope [T, D, D]
        if kv is not None:
            k_all, v_all = kv.update(k, v)  # [B, Hkv, L, D]: normalised, rotated k; raw v
        else:
            k_all, v_all = k.transpose(1, 2), v.transpose(1, 2)
        y = causal_attention(q, k_all, v_all, product=self.decode_attention).unflatten(2, (hkv, h // hkv))  # [B, T, Hkv, rep, D]
        if self.a.use_xsa:
            # XSA: remove from each head's output its component along the token's own (normalised) value.
            vn = (v / (torch.linalg.vector_norm(v, dim=-1, keepdim=True) + 1e-8)).unsqueeze(3)  # [B, T, Hkv, 1, D]
            y = torch.addcmul(y, y @ vn.transpose(-1, -2), vn, value=-1.0)
        return self.o_b_proj(self.o_a_proj(y.reshape(b, t, h * d)))


class FeedForward(nn.Module):
    """Dense gated FFN (stand-in: SwiGLU like the quoted ExpertFFN, spec §4.9); gate | up fused by sanitize."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.a, self.width = a, a.ffn_width
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * a.ffn_width, bias=False)
        self.down_proj = nn.Linear(a.ffn_width, a.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.width, dim=-1)
        act = F.silu(gate) if self.a.ffn_act == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(act * up)


class Block(nn.Module):
    """Pre-norm attention and FFN, each behind a hyper-connection site (spec §4.2)."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.attn_norm = _norm(a.hidden_size, a)
        self.attn = Attention(a)
        self.ffn_norm = _norm(a.hidden_size, a)
        self.ffn = FeedForward(a)
        if a.use_hyper_connections:
            self.hc_attn = HyperConnection(a)
            self.hc_ffn = HyperConnection(a)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, kv: KVState | None) -> torch.Tensor:
        if not hasattr(self, "hc_attn"):
            x = x + self.attn(self.attn_norm(x), rope, kv)
            return x + self.ffn(self.ffn_norm(x))
        h, ctx = self.hc_attn.pre_op(x)  # streams [n, B, T, H] -> [B, T, H]
        x = self.hc_attn.post_op(x, self.attn(self.attn_norm(h), rope, kv), ctx)
        h, ctx = self.hc_ffn.pre_op(x)
        return self.hc_ffn.post_op(x, self.ffn(self.ffn_norm(h)), ctx)


class HRMRefine(nn.Module):
    """HRMRefinementBlock (spec §4.4): h += tanh(gate[s]) * up(silu(down([norm(h); anchor]))), before the final norm."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.norm = _norm(a.hidden_size, a)
        self.down = nn.Linear(2 * a.hidden_size, a.hrm_refine_dim, bias=False)
        self.up = nn.Linear(a.hrm_refine_dim, a.hidden_size, bias=False)
        self.gate = nn.Parameter(torch.zeros(a.hrm_refine_steps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for step in range(self.gate.shape[0]):
            h = h + torch.tanh(self.gate[step]) * self.up(F.silu(self.down(torch.cat([self.norm(h), x], dim=-1))))
        return h


class SpikeWhaleModel(nn.Module):
    """The `model.` prefix of the checkpoint: embeddings, engram, blocks, stream mix, HRM, final norm."""

    def __init__(self, a: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.engram = EngramMemory(a) if a.use_engram else None
        self.layers = nn.ModuleList(Block(a) for _ in range(a.num_hidden_layers))
        self.hc_out_mix = HCOutputMix(a.hc_mult) if a.use_hyper_connections else None
        self.hrm_refine = HRMRefine(a) if a.use_hrm_refine else None
        self.norm = _norm(a.hidden_size, a)


class Model(ArchModel):
    OPTIONS = OPTIONS
    #: EngramMemory reads these linears' weights directly: weight-only quantization leaves them float.
    QUANT_SKIP = ("model.engram.",)

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = SpikeWhaleModel(args)
        # Tied to the embedding unless the checkpoint carries a different head (sanitize decides).
        self.lm_head: nn.Linear | None = None
        self._head: torch.Tensor | None = None
        self._rope = self._partial_rope()

    @property
    def FP32_TENSORS(self) -> set[str]:  # noqa: N802 (the loader's attribute name)
        """Checkpoint tensors kept fp32 in a bf16 load: the engram's sign bits come from the embeddings."""
        if self.model.engram is None:
            return set()
        names = {"model.embed_tokens.weight", "lm_head.weight"}
        return names | {f"model.engram.{k}" for k in self.model.engram.state_dict()}

    @property
    def max_context(self) -> int:
        return self.args.max_position_embeddings

    def set_options(self, **values: Any) -> None:
        """Switch reading options on the loaded model (the selftest scores each one this way)."""
        check_options("spike_whale", OPTIONS, values)
        if values.get("hc_form", self.args.hc_form) != self.args.hc_form:
            raise ValueError("hc_form changes the tensor inventory; reload the model to switch it")
        for k, v in values.items():
            setattr(self.args, k, v)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.zero_centered = self.args.rms_norm == "zero_centered"
        self._rope = self._partial_rope()

    def _partial_rope(self) -> PartialRope:
        # RoPE on the last qk_rope_head_dim dims of each head, the NoPE dims first, in the layout option (spec §4.3).
        a = self.args
        return PartialRope(a.head_dim, a.qk_rope_head_dim, a.rope_theta, a.max_position_embeddings,
                           a.nope_head_dim, a.rope_layout)

    def post_load(self, device: torch.device) -> None:
        # A bf16 model keeps fp32 embeddings for the engram; the tied head reads a copy in the model dtype.
        dtype = self.model.norm.weight.dtype
        emb = self.model.embed_tokens.weight
        self._head = emb.detach().to(dtype) if self.lm_head is None and emb.dtype != dtype else None
        if self.lm_head is not None:
            self.lm_head.to(dtype)

    def head_matrix(self) -> torch.Tensor | None:
        # The head reads its model-dtype copy where the embedding stays fp32 for the engram.
        return self._head if self._head is not None else super().head_matrix()

    def release_float_head(self) -> None:
        """quant.quantize_model installed a quantized head: the bf16 copy of the tied head is no longer read."""
        self._head = None

    init_demo_weights = init_demo_normal  # the reference's init was never seen

    def forward(self, ids: torch.Tensor, state: StateList | None = None, last_only: bool = False) -> torch.Tensor:
        a, m = self.args, self.model
        b, t = ids.shape
        start = 0
        if state is not None:
            state.check_room(t)
            start = state.length
        dtype = m.norm.weight.dtype
        x = m.embed_tokens(ids)
        if m.engram is not None:
            window = state[a.num_hidden_layers] if state is not None else None
            x = x.float() + m.engram(x, window, start)
        x = x.to(dtype)
        rope = self._rope.matrices(start, t, ids.device)
        if m.hc_out_mix is not None:
            # n identical copies of the embedding (spec §4.1 step 4), stream-major [n, B, T, H].
            x = x.expand(a.hc_mult, b, t, a.hidden_size)
        for i, layer in enumerate(m.layers):
            x = layer(x, rope, state[i] if state is not None else None)
        if state is not None:
            state.advance(t)
        if m.hc_out_mix is not None:
            x = m.hc_out_mix(x[:, :, -1:] if last_only else x)
        elif last_only:
            x = x[:, -1:]
        if m.hrm_refine is not None:
            x = m.hrm_refine(x)
        x = m.norm(x)
        head = self.lm_head.weight if self.lm_head is not None else self._head
        return project_head(self, x, head if head is not None else m.embed_tokens.weight.to(dtype))

    def make_state(self, max_len: int, device, dtype) -> StateList:
        a = self.args
        states = [KVState(max_len, a.num_key_value_heads, a.head_dim, device, dtype) for _ in range(a.num_hidden_layers)]
        if a.use_engram:
            states.append(EngramWindow(a.engram_max_ngram, a.engram_compress_dim, device))
        return StateList(states, max_len=max_len)

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        a = self.args
        # Training-only heads (MTP, JEPA) are dropped by name.
        weights = {k: v for k, v in weights.items() if not k.startswith(_TRAINING_ONLY)}
        # Rotary tables are recomputed, never trusted.
        weights = {k: v for k, v in weights.items() if not _ROTARY_BUFFER.search(k)}
        # The reference saves the tied head as its own tensor; keep one copy unless they really differ.
        self.keep_one_head(weights, "model.embed_tokens.weight")
        for i in range(a.num_hidden_layers):
            p = f"model.layers.{i}."
            # q_a | k | v read the same input: one matmul.
            fuse(weights, p + "attn.qkv_a_proj.weight",
                 [p + f"attn.{n}.weight" for n in ("q_a_proj", "k_proj", "v_proj")])
            # gate | up read the same input: one matmul.
            fuse(weights, p + "ffn.gate_up_proj.weight", [p + "ffn.gate_proj.weight", p + "ffn.up_proj.weight"])
        return weights

    def fit_checkpoint(self, weights: dict[str, torch.Tensor]) -> None:
        super().fit_checkpoint(weights)
        # The FFN width is not in config.json (spec §2.1): the checkpoint's tensors say it.
        fused = weights.get("model.layers.0.ffn.gate_up_proj.weight")
        if fused is not None and fused.shape[0] // 2 != self.args.ffn_width:
            self._resize_ffn(fused.shape[0] // 2)

    def _resize_ffn(self, width: int) -> None:
        self.args.ffn_width = width
        # Rebuilt where the module lives (meta during a load: nothing is allocated or initialised).
        with torch.device(self.model.layers[0].ffn.down_proj.weight.device):
            for layer in self.model.layers:
                layer.ffn = FeedForward(self.args)
