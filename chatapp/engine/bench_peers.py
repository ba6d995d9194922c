"""The peers of `smollchat bench`: other implementations at the same shape, measured in the same run.

Every peer is optional (the `bench` extra, or a llama.cpp build) and never needed by the tests; a peer
that is missing is named in the record with what it takes. The in-process peers (HF transformers at
Axiom's shape, genesis-llm for Genesis, a plain eager HGRN2 for OdinNext) are built with their own random
weights at the bench config's shape and timed by one greedy loop (`time_greedy`), the same stamps as our
decode loop: a timestamp as each token is chosen, decode tok/s = (n - 1) / (last - first). llama.cpp
runs as a subprocess (`llama-bench`) on a GGUF of *our* random-weight Axiom model, written here with the
`gguf` package and quantized by `llama-quantize` to the type matching the mode (`LLAMA_TYPE`).

GGUF layout (llama.cpp's `llama` architecture): our fused q|k|v and gate|up matrices are split into
llama.cpp's separate tensors. No row permutation is needed: Axiom rotates interleaved pairs
(x[2j], x[2j+1]), which is ggml's "normal" RoPE used by the llama architecture; it is HF checkpoints
(rotate-half) that llama.cpp's converter must permute. tests/engine/test_bench_peers.py checks this by
running a reference forward with llama.cpp's semantics over the tensors `axiom_gguf` returns.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: Environment variable naming the llama-bench binary (the `--llama-bench` option wins).
LLAMA_BENCH_ENV = "SMOLLCHAT_LLAMA_BENCH"
#: The llama.cpp tensor type that matches each of our modes (int4: ours is asymmetric groups of 128,
#: Q4_0 symmetric blocks of 32, the nearest type llama.cpp offers; the record says so).
LLAMA_TYPE = {("float32", "none"): "F32", ("bfloat16", "none"): "BF16", ("float32", "int8"): "Q8_0",
              ("bfloat16", "int8"): "Q8_0", ("float32", "int4"): "Q4_0", ("bfloat16", "int4"): "Q4_0"}
#: A second llama.cpp type decoded in the same run where a mode's target names it: int4 is to beat Q8_0.
LLAMA_ALSO = {"int4": "Q8_0"}


@dataclass
class PeerRun:
    """What our own run measured with, so each peer matches it."""

    architecture: str
    config: dict[str, Any]
    dtype: torch.dtype
    quantize: str
    threads: int
    prompt: list[int]
    n_new: int
    runs: int
    prefill_tokens: list[int]
    #: Rebuilds our float random-weight model (the same weights as the run's, before quantizing).
    rebuild: Callable[[], nn.Module]
    llama_bench: str | None = None
    #: One more decode run of ours (its tok/s), for a peer to interleave its runs with: on a VM whose memory
    #: bandwidth moves by a third from minute to minute, runs minutes apart compare the minutes, not the code.
    ours_decode: Callable[[], float] | None = None


def run_peers(run: PeerRun, say: Callable[[str], None]) -> dict[str, Any]:
    """Each peer of the architecture: its figures, or why it did not run."""
    out: dict[str, Any] = {}
    if run.architecture == "axiom":
        say("peer: llama.cpp llama-bench")
        out["llama.cpp"] = _guard(lambda: llama_cpp(run, say))
        say("peer: HF transformers LlamaForCausalLM (eager attention)")
        out["hf-transformers-llama"] = _optional("transformers", lambda: hf_llama(run))
    elif run.architecture == "genesis":
        say("peer: genesis-llm")
        out["genesis-llm"] = _optional("genesis", lambda: genesis_llm(run), "pip install --no-deps genesis-llm")
    elif run.architecture == "odinnext":
        say("peer: plain eager HGRN2")
        out["plain-hgrn2"] = plain_hgrn2(run)
    return out


def _guard(fn: Callable[[], Any]) -> Any:
    # A peer that fails is reported, not fatal: our own figures are already measured.
    try:
        return fn()
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError) as e:
        return f"failed: {type(e).__name__}: {e}"


def _optional(module: str, fn: Callable[[], Any], how: str = "pip install 'smollchat[bench]'") -> Any:
    try:
        __import__(module)
    except ImportError:
        return f"not installed: {how}"
    return _guard(fn)


def time_greedy(prefill: Callable[[list[int]], tuple[torch.Tensor, Any]],
                step: Callable[[int, Any], tuple[torch.Tensor, Any]], prompt: list[int], n_new: int,
                runs: int) -> dict[str, Any]:
    """A peer's greedy decode timed as ours is: `prefill(ids) -> (logits [V], cache)`, `step(token, cache) ->
    (logits, cache)`; one warm-up, then the median of `runs` (decode tok/s, and the prompt's prefill tok/s)."""
    def one(n: int) -> tuple[float, float]:
        t = time.perf_counter()
        logits, cache = prefill(prompt)
        stamps = []
        for i in range(n):
            tok = int(logits.argmax())
            stamps.append(time.perf_counter())
            if i + 1 < n:
                logits, cache = step(tok, cache)
        return (n - 1) / (stamps[-1] - stamps[0]), len(prompt) / (stamps[0] - t)

    with torch.inference_mode():
        one(8)
        got = [one(n_new) for _ in range(runs)]
    rates = [r for r, _ in got]
    return {"decode_tok_s": round(statistics.median(rates), 3), "decode_tok_s_all": [round(r, 3) for r in rates],
            "prefill_tok_s": round(statistics.median(p for _, p in got), 2), "prefill_tokens": len(prompt)}


@contextmanager
def seeded(dtype: torch.dtype, seed: int = 0) -> Iterator[None]:
    """Random init in `dtype` from `seed`, without touching the caller's RNG or default dtype."""
    with torch.random.fork_rng(devices=[]):
        before = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_default_dtype(before)


# --- HF transformers at Axiom's shape -----------------------------------------------------------------

def hf_llama(run: PeerRun) -> dict[str, Any]:
    """HF's LlamaForCausalLM at Axiom's shape (rotate-half RoPE instead of interleaved: the same work), its
    own random weights in the run's dtype, eager attention, greedy through its KV cache."""
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from .arch.axiom import ModelArgs

    a = ModelArgs.from_config(run.config)
    conf = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_dim,
                       num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                       max_position_embeddings=a.max_seq_len, rope_theta=a.rope_theta, rms_norm_eps=a.norm_eps,
                       tie_word_embeddings=True, attn_implementation="eager")
    with seeded(run.dtype):
        hf = LlamaForCausalLM(conf).eval()

    def prefill(ids):
        out = hf(torch.tensor([ids]), use_cache=True)
        return out.logits[0, -1], out.past_key_values

    def step(tok, past):
        out = hf(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        return out.logits[0, -1], out.past_key_values

    rec = {"impl": f"transformers {transformers.__version__} LlamaForCausalLM, eager attention",
           "dtype": str(run.dtype).removeprefix("torch.")}
    rec.update(time_greedy(prefill, step, run.prompt, run.n_new, run.runs))
    return rec


# --- genesis-llm for Genesis ----------------------------------------------------------------------------

def genesis_config(config: dict[str, Any]):
    """genesis-llm's own 147M config (the architecture Genesis-152M was trained as) with every field our
    bench config also names taken from ours (vocabulary, widths, depth, heads, expansions, TTT rank)."""
    from genesis.config import GenesisConfig

    cfg = GenesisConfig.genesis_147m()
    for key, value in config.items():
        if hasattr(cfg, key) and key != "model_type":
            setattr(cfg, key, value)
    return cfg


def genesis_llm(run: PeerRun) -> dict[str, Any]:
    """genesis-llm's `Genesis` at our bench config, random init, greedy through its own cache. fp32 always:
    the package computes in fp32 (the issue's target compares with its fp32)."""
    from importlib.metadata import version

    from genesis.model import Genesis

    with seeded(torch.float32), redirect_stdout(io.StringIO()):  # the package prints a banner on build
        m = Genesis(genesis_config(run.config)).eval()

    def prefill(ids):
        out = m(torch.tensor([ids]), use_cache=True)
        return out[0][0, -1], out[3]

    def step(tok, past):
        out = m(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        return out[0][0, -1], out[3]

    rec = {"impl": f"genesis-llm {version('genesis-llm')} Genesis (forward with its cache)", "dtype": "float32"}
    rec.update(time_greedy(prefill, step, run.prompt, run.n_new, run.runs))
    return rec


# --- a plain eager HGRN2 for OdinNext ------------------------------------------------------------------

class PlainHGRN2:
    """HGRN2 written the straightforward way at OdinNext's shape: per layer a zero-centred RMSNorm, q = silu(Wq x),
    forget logits f = Wf x with decay exp(logsigmoid f) and key 1 - decay, v = Wi x, interleaved RoPE on q and k in
    even layers, the state S [H, K, Dv] updated token by token (S = decay * S + k v^T, o = q S / sqrt K), an RMSNorm
    over the heads, Wo, a sigmoid-gated residual, then a SwiGLU^2 FFN with its own gate. Random weights,
    separate matrices (nothing fused), no kernels of ours: what a first port of the model would be."""

    def __init__(self, config: dict[str, Any], dtype: torch.dtype, seed: int = 0) -> None:
        from .arch.odinnext import ModelArgs

        a = ModelArgs.from_config(config)
        self.d, self.h, self.k, self.dv = a.hidden_size, a.num_heads, a.head_f_dim, a.head_i_dim
        self.eps, self.dtype = a.norm_eps, dtype
        g = torch.Generator().manual_seed(seed)

        def mat(o: int, i: int) -> torch.Tensor:
            return (torch.randn(o, i, generator=g) / math.sqrt(i)).to(dtype)

        qk, inner = self.h * self.k, a.intermediate_size
        self.layers = [dict(norm1=torch.zeros(self.d, dtype=dtype), wq=mat(qk, self.d), wf=mat(qk, self.d),
                            wi=mat(self.d, self.d), gnorm=torch.ones(self.d, dtype=dtype), wo=mat(self.d, self.d),
                            gate1=torch.zeros(()), norm2=torch.zeros(self.d, dtype=dtype), wg=mat(inner, self.d),
                            wu=mat(inner, self.d), wd=mat(self.d, inner), gate2=torch.zeros(()))
                       for _ in range(a.num_hidden_layers)]
        self.embed = (torch.randn(a.vocab_size, self.d, generator=g) * 0.02).to(dtype)
        self.final_norm = torch.zeros(self.d, dtype=dtype)
        inv = 1.0 / a.rope_theta ** (torch.arange(0, self.k, 2, dtype=torch.float64) / self.k)
        ang = torch.outer(torch.arange(a.max_position_embeddings, dtype=torch.float64), inv)
        self.cos, self.sin = ang.cos().float(), ang.sin().float()

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for p in self.layers for t in p.values()) + self.embed.nbytes

    def _norm(self, x: torch.Tensor, w: torch.Tensor, centred: bool = True) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * ((1 + w.float()) if centred else w.float())).to(self.dtype)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        c, s = self.cos[pos][:, None], self.sin[pos][:, None]
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((even * c - odd * s, even * s + odd * c), -1).flatten(-2)

    def new_state(self) -> list[torch.Tensor]:
        return [torch.zeros(self.h, self.k, self.dv) for _ in self.layers]

    def forward(self, ids: torch.Tensor, state: list[torch.Tensor], start: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """ids [T] -> the last position's logits [V] (fp32) and the new per-layer states."""
        t = ids.shape[0]
        pos = torch.arange(start, start + t)
        x = self.embed[ids]
        new = []
        for i, p in enumerate(self.layers):
            hn = self._norm(x, p["norm1"])
            q = F.silu(F.linear(hn, p["wq"])).float().view(t, self.h, self.k)
            f = F.linear(hn, p["wf"]).float().view(t, self.h, self.k)
            v = F.linear(hn, p["wi"]).float().view(t, self.h, self.dv)
            decay, key = F.logsigmoid(f).exp(), torch.sigmoid(-f)
            if i % 2 == 0:
                q, key = self._rope(q, pos), self._rope(key, pos)
            s, outs = state[i], []
            for j in range(t):
                s = decay[j].unsqueeze(-1) * s + key[j].unsqueeze(-1) * v[j].unsqueeze(-2)
                outs.append(torch.einsum("hk,hkv->hv", q[j], s))
            new.append(s)
            o = self._norm(torch.stack(outs).reshape(t, self.d) * self.k ** -0.5, p["gnorm"], centred=False)
            x = x + torch.sigmoid(p["gate1"]).to(self.dtype) * F.linear(o, p["wo"])
            m = self._norm(x, p["norm2"])
            act = F.silu(F.linear(m, p["wg"]))
            x = x + torch.sigmoid(p["gate2"]).to(self.dtype) * F.linear(act * act * F.linear(m, p["wu"]), p["wd"])
        return F.linear(self._norm(x[-1], self.final_norm), self.embed).float(), new


def plain_hgrn2(run: PeerRun) -> dict[str, Any]:
    peer = PlainHGRN2(run.config, run.dtype)

    def prefill(ids):
        logits, state = peer.forward(torch.tensor(ids), peer.new_state(), 0)
        return logits, (state, len(ids))

    def step(tok, cache):
        state, pos = cache
        logits, state = peer.forward(torch.tensor([tok]), state, pos)
        return logits, (state, pos + 1)

    rec = {"impl": "plain eager PyTorch HGRN2 (bench_peers.PlainHGRN2: per-token recurrence, nothing fused)",
           "dtype": str(run.dtype).removeprefix("torch."), "weight_bytes": peer.weight_bytes()}
    rec.update(time_greedy(prefill, step, run.prompt, run.n_new, run.runs))
    return rec


# --- llama.cpp on a GGUF of our Axiom model ----------------------------------------------------------

def axiom_gguf(model: nn.Module) -> tuple[dict[str, int | float | str], dict[str, np.ndarray]]:
    """Our Axiom model as llama.cpp's `llama` architecture: GGUF metadata (key -> value) and fp32 tensors
    by GGUF name, in llama.cpp's order ([out, in] rows as stored; the file reverses the dims itself)."""
    a = model.args
    hd, ffn = a.head_dim, a.ffn_dim
    meta: dict[str, int | float | str] = {
        "general.name": "smollchat-axiom-random", "llama.context_length": a.max_seq_len,
        "llama.embedding_length": a.dim, "llama.block_count": a.n_layers, "llama.feed_forward_length": ffn,
        "llama.rope.dimension_count": hd, "llama.attention.head_count": a.n_heads,
        "llama.attention.head_count_kv": a.n_kv_heads, "llama.attention.layer_norm_rms_epsilon": a.norm_eps,
        "llama.rope.freq_base": a.rope_theta, "llama.vocab_size": a.vocab_size,
        # No tokenizer: llama-bench feeds token ids and llama.cpp fills a dummy vocabulary of this size.
        "tokenizer.ggml.model": "none", "general.file_type": 0}  # 0: all F32

    def f32(t: torch.Tensor) -> np.ndarray:
        return t.detach().float().contiguous().numpy()

    tensors = {"token_embd.weight": f32(model.embed.weight), "output_norm.weight": f32(model.norm.weight)}
    if model.lm_head is not None:  # an untied head; a tied one is llama.cpp's fallback to token_embd
        tensors["output.weight"] = f32(model.lm_head.weight)
    for i, layer in enumerate(model.layers):
        p = f"blk.{i}."
        q, k, v = layer.attn.wqkv.weight.split([a.n_heads * hd, a.n_kv_heads * hd, a.n_kv_heads * hd])
        gate, up = layer.ffn.w13.weight.split(ffn)
        tensors.update({p + "attn_norm.weight": f32(layer.attn_norm.weight), p + "attn_q.weight": f32(q),
                        p + "attn_k.weight": f32(k), p + "attn_v.weight": f32(v),
                        p + "attn_output.weight": f32(layer.attn.wo.weight),
                        p + "ffn_norm.weight": f32(layer.ffn_norm.weight), p + "ffn_gate.weight": f32(gate),
                        p + "ffn_up.weight": f32(up), p + "ffn_down.weight": f32(layer.ffn.w2.weight)})
    return meta, tensors


def write_gguf(path: Path, meta: dict[str, int | float | str], tensors: dict[str, np.ndarray]) -> None:
    """Write a GGUF with the `gguf` package (the `bench` extra): ints as uint32, floats as float32."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in meta.items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_float32(key, float(value))
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def find_llama_bench(given: str | None) -> Path | None:
    """The llama-bench binary: the option, else $SMOLLCHAT_LLAMA_BENCH, else one on PATH."""
    path = given or os.environ.get(LLAMA_BENCH_ENV) or shutil.which("llama-bench")
    return Path(path) if path else None


def parse_llama_bench(text: str) -> list[dict[str, Any]]:
    """llama-bench's `-o json` output -> one row per test: prompt/gen/depth tokens, the tok/s samples, type."""
    rows = []
    for r in json.loads(text):
        samples = r.get("samples_ts") or [r["avg_ts"]]
        rows.append({"n_prompt": r["n_prompt"], "n_gen": r["n_gen"], "n_depth": r.get("n_depth", 0),
                     "tok_s": round(statistics.median(samples), 3), "tok_s_all": [round(s, 3) for s in samples],
                     "model_type": r.get("model_type", ""), "build": r.get("build_commit", ""),
                     "threads": r.get("n_threads")})
    return rows


def llama_cpp(run: PeerRun, say: Callable[[str], None]) -> dict[str, Any] | str:
    """llama-bench on a GGUF of our own random-weight Axiom model, quantized to the mode's type; prefill at the
    run's prompt lengths, decode of n_new tokens after the run's prompt, the same thread count."""
    bench = find_llama_bench(run.llama_bench)
    if bench is None or not bench.is_file():
        return (f"llama-bench not found{f' at {bench}' if bench else ''}: build llama.cpp as bench/README.md says, then "
                f"pass --llama-bench PATH or set {LLAMA_BENCH_ENV}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        return "not installed: the gguf package (pip install 'smollchat[bench]')"
    quantize = bench.with_name("llama-quantize")
    ggml_type = LLAMA_TYPE[(str(run.dtype).removeprefix("torch."), run.quantize)]
    with tempfile.TemporaryDirectory(prefix="smollchat-gguf-") as tmp:
        f32 = Path(tmp) / "axiom-f32.gguf"
        say("peer: writing our random-weight model as GGUF (F32)")
        model = run.rebuild()
        meta, tensors = axiom_gguf(model)
        del model
        write_gguf(f32, meta, tensors)
        del tensors

        def quantized(to: str) -> Path:
            if to == "F32":
                return f32
            if not quantize.is_file():
                raise RuntimeError(f"llama-quantize not found beside {bench}: build both targets (bench/README.md)")
            out = Path(tmp) / f"axiom-{to.lower()}.gguf"
            say(f"peer: llama-quantize -> {to}")
            subprocess.run([str(quantize), str(f32), str(out), to, str(run.threads)], check=True,
                           capture_output=True, text=True)
            return out

        def base(path: Path, runs: int = run.runs) -> list[str]:
            return [str(bench), "-m", str(path), "-t", str(run.threads), "-r", str(runs), "-o", "json"]

        target = quantized(ggml_type)
        say("peer: llama-bench prefill")
        pre = _llama_bench(base(target) + ["-p", ",".join(map(str, run.prefill_tokens)), "-n", "0"])
        size = target.stat().st_size
        files = {ggml_type: target}
        if run.quantize in LLAMA_ALSO:
            files[LLAMA_ALSO[run.quantize]] = quantized(LLAMA_ALSO[run.quantize])
        # Decode: one llama-bench run of each type after each run of ours, round by round (interleaved).
        rounds: dict[str, list[dict[str, Any]]] = {t: [] for t in files}
        ours: list[float] = []
        for i in range(run.runs):
            if run.ours_decode is not None:
                say(f"peer: our decode, round {i + 1} of {run.runs}")
                ours.append(run.ours_decode())
            for t, path in files.items():
                say(f"peer: llama-bench decode {t}, round {i + 1} of {run.runs}")
                rounds[t] += _llama_bench(base(path, 1) + ["-p", "0", "-n", str(run.n_new), "-d", str(len(run.prompt))])

    def figures(rows: list[dict[str, Any]]) -> dict[str, Any]:
        out = {"decode_tok_s": round(statistics.median(r["tok_s"] for r in rows), 3),
               "decode_tok_s_all": [r["tok_s"] for r in rows]}
        return out | ({"ours_interleaved_tok_s": [round(t, 3) for t in ours]} if ours else {})
    first = rounds[ggml_type][0]
    return {"impl": f"llama.cpp llama-bench (build {first['build']})", "type": ggml_type, "gguf_bytes": size,
            **figures(rounds[ggml_type]), "decode_depth": first["n_depth"],
            "prefill": [{"tokens": r["n_prompt"], "tok_s": r["tok_s"]} for r in pre], "threads": first["threads"],
            "also": {t: figures(rows) for t, rows in rounds.items() if t != ggml_type},
            "note": "Q4_0 (symmetric, blocks of 32) is the llama.cpp type nearest our int4 (asymmetric, groups of 128)"
            if ggml_type == "Q4_0" else ""}


def _llama_bench(cmd: list[str]) -> list[dict[str, Any]]:
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:1])} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return parse_llama_bench(done.stdout)
