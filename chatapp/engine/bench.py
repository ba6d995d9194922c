"""The benchmark behind `smollchat bench MODEL`: real-size random weights, one JSON record.

A catalog entry's `[bench_config]` is its real config (a demo entry benches its `demo_config`): the model is
built from it with random weights in the chosen dtype, prepared as a loaded checkpoint is (layouts,
quantization), and driven the way the engine drives it: prompt chunks through generate.feed, one decode
step at a time through graphs.decode_step (eager under --eager), sampling with the entry's own settings.
Figures: load time and peak RSS (before and after quantizing), prefill tok/s and time to first token at
128 tokens and at half the context (at most 1,024), decode tok/s over 128 tokens (median of 3 after a
warm-up), the time each token spends outside the model, state bytes at 0 / a quarter / the full context
(a line through two measured points), the machine's DRAM read and GEMV bandwidth measured in the same run,
the roofline fraction (decode tok/s x weight bytes read per token / DRAM bandwidth), and the CPU.
Timings are medians; on a shared machine the record's `loadavg` says how busy it was. Then, unless --quick,
the architecture's peers in the same process (engine/bench_peers.py), each with ours / peer.
"""
from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..catalog import ModelEntry
from ..contract import resolve_controls
from . import cpu_gemv
from .bench_peers import PeerRun, run_peers, seeded
from .decisions import cpu_info, resolve_threads, share_between, usage
from .generate import feed
from .graphs import decode_step
from .loader import build_model, prepare_for_inference, resolve_dtype
from .quant import QuantEmbedding, head_weight
from .sample import Sampler


@dataclass(frozen=True)
class BenchOptions:
    quantize: str = "none"
    dtype: str = "auto"
    threads: int | None = None
    eager: bool = False
    quick: bool = False
    #: The decode step's compile mode (graphs.MODES); --eager forces "off".
    compile: str = "auto"
    #: Measure the kernel choice and the compiled step again, replacing what this machine had cached.
    remeasure: bool = False
    #: Control values over the catalog entry's (e.g. Huginn's num_steps), for every forward of the run.
    controls: dict[str, Any] = field(default_factory=dict)
    #: llama.cpp's llama-bench binary for the Axiom peer (else $SMOLLCHAT_LLAMA_BENCH, else PATH).
    llama_bench: str | None = None


def _peak_rss() -> int:
    """The process's peak resident set so far, bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def random_model(entry: ModelEntry, dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """The entry's bench (or demo) config with random weights, built directly in `dtype` (no fp32 copy of a
    large model); the tensors the loader keeps fp32 stay fp32, as in a loaded checkpoint."""
    config = dict(entry.demo_config if entry.demo else entry.bench_config)
    if not config:
        raise ValueError(f"{entry.id} has no [bench_config] in its catalog file: add the real config there")
    with seeded(dtype if dtype.is_floating_point else torch.float32, seed):
        model = build_model(config, entry.options, device="cpu")
        init = getattr(model, "init_demo_weights", None)
        if callable(init):
            init()
    keep = set(getattr(model, "FP32_TENSORS", ()))
    for name, p in model.named_parameters():
        if name in keep:
            p.data = p.data.float()
    return model, config


def dram_read_gbs(mib: int = 256, repeats: int = 5) -> float:
    """Read bandwidth of a buffer far larger than the caches: sum() over it, median of `repeats`."""
    buf = torch.ones(mib * 2 ** 18)  # fp32: 4 bytes each
    buf.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.nbytes / statistics.median(times) / 1e9


def gemv_gbs(dtype: torch.dtype, mib: int = 64, repeats: int = 7, product: str = "linear", quant: str = "") -> float:
    """Weight bytes per second of a one-token product on a [N, 4096] matrix (a decode step's kernel): `product`
    is the decode product the model's kernel choice took for its widening matrices (gemv_product): our one-row
    product at its level, or PyTorch's (F.linear on `dtype` weights; aten's int8 or int4 product for `quant`
    "int8" or "int4" ones; int4 in our nibbles layout where the product is ours)."""
    k = 4096
    level = cpu_gemv.PRODUCTS.get(product, 0)
    x = torch.randn(1, k).bfloat16()
    if quant == "int8":
        w = torch.randint(-127, 128, (mib * 2 ** 20 // k, k), dtype=torch.int8)
        scales = torch.ones(w.shape[0], dtype=torch.bfloat16)
        nbytes = w.nbytes

        def call() -> Any:
            if level:
                return torch.ops.smollchat_cpu.gemv_int8(x, w, scales, level)
            return torch.ops.aten._weight_int8pack_mm(x, w, scales)
    elif quant == "int4":
        from .kernels import _int4_matrix

        packed, sz, group = _int4_matrix(mib * 2 ** 21 // k, k, "nibbles" if level else "row", 0)
        nbytes = packed.nbytes + sz.nbytes

        def call() -> Any:
            if level:
                return torch.ops.smollchat_cpu.gemv_int4(x, packed, sz, group, level)
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    else:
        w = torch.randn(mib * 2 ** 20 // (k * torch.empty((), dtype=dtype).element_size()), k).to(dtype)
        x = x.to(dtype)
        nbytes = w.nbytes

        def call() -> Any:
            return torch.ops.smollchat_cpu.gemv(x, w, level) if level else F.linear(x, w)
    call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return nbytes / statistics.median(times) / 1e9


def gemv_product(model: nn.Module, quantize: str | None) -> tuple[str, str]:
    """The one-row product a decode step of `model` runs on its widening matrices, as gemv_gbs takes it: one
    of ours where the kernel choice took it (its name), else "linear" (PyTorch's); and the weights' kind ("int8",
    "int4", or "" for float ones)."""
    choice = getattr(model, "kernel_choice", None)
    name = choice.widening.decode if choice is not None else "linear"
    return (name if name in cpu_gemv.PRODUCTS else "linear"), (quantize if quantize in ("int8", "int4") else "")


def bytes_per_token(model: nn.Module, controls: Any = None) -> int:
    """Weight bytes one decode step reads: every parameter but the embedding tables (one row each is
    gathered), except an embedding that is also the float output head; a module the step runs n times
    (Huginn's core block, `ArchModel.repeated_modules`) counts n times."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for module, times in model.repeated_modules(controls):
        total += (times - 1) * sum(p.numel() * p.element_size() for p in module.parameters())
    head = None if getattr(model, "quant_head", None) is not None else head_weight(model)
    qhead = getattr(model, "quant_head", None)
    for m in model.modules():
        if isinstance(m, nn.Embedding) and (head is None or m.weight is not head[1]):
            total -= m.weight.numel() * m.weight.element_size()
        elif isinstance(m, QuantEmbedding):
            # Its residual is only gathered; its int8 rows too, unless they are the quantized head's own.
            shared = qhead is not None and m.packed is qhead.packed
            total -= sum(t.nbytes for t in (m.residual, *(() if shared else (m.packed, m.scales))) if t is not None)
    return total


def _used(state) -> int:
    return sum(state.bytes().used.values())


def _random_ids(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(entry: ModelEntry, opts: BenchOptions, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Benchmark one catalog entry on the CPU; returns the record (see the module docstring)."""
    say = progress or (lambda _m: None)
    torch.set_num_threads(resolve_threads(opts.threads))  # the app's default unless --threads says
    dev = torch.device("cpu")
    dtype = resolve_dtype(opts.dtype, dev, entry.cpu_dtype)
    quant = None if opts.quantize == "none" else opts.quantize
    rec: dict[str, Any] = {"model": entry.id, "demo": entry.demo, "dtype": str(dtype).removeprefix("torch."),
                           "quantize": opts.quantize, "threads": torch.get_num_threads(), "quick": opts.quick,
                           "cpu": cpu_info()}
    say("building random weights")
    t0 = time.perf_counter()
    model, config = random_model(entry, dtype)
    rec["peak_rss_before_quantize_bytes"] = _peak_rss()
    say("preparing" + (f" ({quant})" if quant else ""))
    prepare_for_inference(model, dev, dtype, quant,
                          kernels="reference" if opts.eager else "measure" if opts.remeasure else "auto")
    rec["load_s"] = round(time.perf_counter() - t0, 3)
    rec["peak_rss_bytes"] = _peak_rss()
    rec["config"] = config
    rec["kernels"] = model.kernel_choice.as_dict()
    rec["params"] = sum(p.numel() for p in model.parameters())
    rec["weight_bytes"] = model.weight_bytes()
    controls = resolve_controls(model.control_specs(), catalog=entry.controls, call=opts.controls)
    rec["controls"] = dict(controls)
    rec["weight_bytes_per_token"] = bytes_per_token(model, controls)
    if quant:
        rec["quant_report"] = model.quant_report.summary()
    context = min(entry.context, model.max_context)
    state = model.make_state(context, dev, dtype)
    mode = "off" if opts.eager else "on" if opts.remeasure else opts.compile
    step, report = decode_step(model, entry.architecture, state, dev, dtype, mode,
                               progress=say)
    rec["compile"] = report.label
    vocab = model.vocab_size
    settings = entry.sampling().with_overrides(seed=0)
    short, half = (16, 32) if opts.quick else (128, min(context // 2, 1024))
    n_new, runs = (16, 1) if opts.quick else (128, 3)
    with torch.inference_mode():
        say("prefill")
        rec["prefill"], used = [], {}
        for n in sorted({min(short, context - 1), min(half, context - 1)}):
            state.reset()
            ids = _random_ids(n, vocab, n)
            t = time.perf_counter()
            logits = feed(model, state, ids, dev, controls).logits
            t_pre = time.perf_counter() - t
            Sampler(settings, vocab, dev, ids).draw(logits)
            ttft = time.perf_counter() - t
            used[n] = _used(state)
            rec["prefill"].append({"tokens": n, "tok_s": round(n / t_pre, 2), "ttft_s": round(ttft, 4)})
        say("decode")
        prompt = _random_ids(min(short, context - n_new - 1), vocab, 7)
        _decode(model, step, state, prompt, 8, settings, vocab, dev, controls)  # warm-up
        done = [_decode(model, step, state, prompt, n_new, settings, vocab, dev, controls) for _ in range(runs)]
    rec["decode_tok_s"] = round(statistics.median(d["tok_s"] for d in done), 3)
    rec["decode_tok_s_all"] = [round(d["tok_s"], 3) for d in done]
    rec["decode_cpu_share"] = [round(d["cpu_share"], 2) for d in done]
    rec["decode_new_tokens"] = n_new
    rec["step_ms"] = round(statistics.median(d["step_ms"] for d in done), 3)
    rec["model_ms"] = round(statistics.median(d["model_ms"] for d in done), 3)
    rec["outside_model_ms"] = round(statistics.median(d["outside_ms"] for d in done), 3)
    # The calling thread's CPU time for the same work: what a busy machine's wall clock hides (other
    # intra-op threads are not counted, so with --threads 1 it is the whole cost).
    rec["outside_model_cpu_ms"] = round(statistics.median(d["outside_cpu_ms"] for d in done), 3)
    rec["state"] = _state_bytes(state, used, context)
    say("bandwidth")
    rec["dram_read_gbs"] = round(dram_read_gbs(64 if opts.quick else 256), 2)
    product, kind = gemv_product(model, quant)
    if product != "linear":
        rec["gemv_product"] = f"{product} {kind}" if kind else product
    else:
        rec["gemv_product"] = f"aten {kind}" if kind else f"F.linear {str(dtype).removeprefix('torch.')}"
    rec["gemv_gbs"] = round(gemv_gbs(dtype, 16 if opts.quick else 64, product=product, quant=kind), 2)
    rec["roofline_fraction"] = round(rec["decode_tok_s"] * rec["weight_bytes_per_token"] / (rec["dram_read_gbs"] * 1e9), 3)
    if not opts.quick:
        def ours_decode() -> float:  # one more decode run of ours, between a peer's (llama.cpp interleaves)
            with torch.inference_mode():
                return _decode(model, step, state, prompt, n_new, settings, vocab, dev, controls)["tok_s"]
        rec["peers"] = run_peers(PeerRun(entry.architecture, config, dtype, opts.quantize, rec["threads"], prompt,
                                         n_new, runs, [p["tokens"] for p in rec["prefill"]],
                                         lambda: random_model(entry, dtype)[0], opts.llama_bench, ours_decode), say)
        del model, step, state
        for peer in rec["peers"].values():
            for figures in (peer, *peer.get("also", {}).values()) if isinstance(peer, dict) else ():
                if figures.get("decode_tok_s"):
                    # Interleaved runs of ours where the peer had them: the same minutes' bandwidth.
                    mine = statistics.median(figures.get("ours_interleaved_tok_s") or [rec["decode_tok_s"]])
                    figures["ours_over_peer"] = round(mine / figures["decode_tok_s"], 3)
    else:
        rec["peers"] = {}
    rec["cpu"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    return rec


def _decode(model, step, state, prompt: list[int], n: int, settings, vocab: int, dev,
            controls: Any = None) -> dict[str, float]:
    """Prefill `prompt`, then n tokens one step at a time; tok/s, median step and median time outside the model."""
    state.reset()
    sampler = Sampler(settings, vocab, dev, prompt)
    logits = feed(model, state, prompt, dev, controls).logits
    stamps, inside, outside, outside_cpu = [], [], [], []
    start = usage()
    for i in range(n):
        t0, c0 = time.perf_counter(), time.thread_time()
        # As the engine's decode loop draws when no per-token figures are asked for.
        tok = sampler.draw(logits)
        sampler.extend([tok])
        ids = torch.tensor([[tok]], device=dev)
        t1, c1 = time.perf_counter(), time.thread_time()
        stamps.append(t0)
        if i + 1 < n:
            logits = step(ids, state, controls, None, last_only=True).logits[0, -1]
            t2 = time.perf_counter()
            inside.append(t2 - t1)
            outside.append(t1 - t0)
            outside_cpu.append(c1 - c0)
    span = stamps[-1] - stamps[0]
    # ~0.5 on 2 threads means another process held a core, and OpenMP's barriers then make every figure noise.
    share = share_between(start, usage(), time.perf_counter() - stamps[0])
    return {"tok_s": (n - 1) / span if span > 0 else 0.0, "cpu_share": share,
            "step_ms": 1e3 * statistics.median(b - a for a, b in zip(stamps, stamps[1:])),
            "model_ms": 1e3 * statistics.median(inside), "outside_ms": 1e3 * statistics.median(outside),
            "outside_cpu_ms": 1e3 * statistics.median(outside_cpu)}


def _state_bytes(state, used: dict[int, int], context: int) -> dict[str, Any]:
    """Allocated bytes, and filled bytes at 0 / a quarter / the full context on the line through the two
    measured prefill points (constant for a recurrent state, per token for a KV cache)."""
    (n1, u1), (n2, u2) = sorted(used.items())[0], sorted(used.items())[-1]
    per_token = (u2 - u1) / (n2 - n1) if n2 != n1 else 0.0
    at = {"0": u1 - per_token * n1, "quarter": u1 + per_token * (context // 4 - n1), "full": u1 + per_token * (context - n1)}
    return {"allocated_bytes": sum(state.bytes().allocated.values()), "per_token_bytes": round(per_token, 1),
            "measured": {str(k): v for k, v in used.items()}, "context": context,
            "used_bytes": {k: int(round(v)) for k, v in at.items()}}
