"""The compiled decode step (engine/graphs.py): same tokens as eager, its cache under smollchat's cache folder,
and eager (never a crash) without a C++ compiler or when compilation fails.

One real compile (axiom-tiny, CPU inductor); everything else runs without inductor.
"""
from __future__ import annotations

import logging

import pytest
import torch

from chatapp import locations
from chatapp.catalog import get_entry
from chatapp.contract import Done
from chatapp.engine import graphs
from chatapp.engine.loader import LoadError
from chatapp.engine.runtime import load_engine
from tests.engine.closeness import assert_close

# Axiom's demo is these tests' model, and on a CPU its step would be the fused C++ one: the compiled path here.
pytestmark = pytest.mark.usefixtures("inductor_only")


def greedy(engine, n: int = 24) -> list[int]:
    # Banning repeated ids keeps greedy off a single repeated id on random weights, so the test sees many steps'
    # argmaxes, not one.
    s = engine.default_settings().with_overrides(temperature=0.0, max_new_tokens=n, repetition_penalty=1.0,
                                                 no_repeat_ngram=1, top_k=0, top_p=1.0, stop_strings=())
    return [ev.token_id for ev in engine.generate([1, 2, 3, 4, 5, 6, 7], s) if not isinstance(ev, Done)]


@pytest.fixture
def no_cxx(monkeypatch, tmp_path):
    """A machine without a C++ compiler: nothing on PATH, no $CXX."""
    from torch._inductor import config

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(config.cpp, "cxx", (None, "g++"))


def test_compiled_step_gives_eager_tokens_and_caches_under_smollchat(tmp_path):
    from torch._dynamo.utils import counters

    engine = load_engine(get_entry("axiom-tiny"), device="cpu", dtype="float32", compile="on")
    report = engine.compile
    assert report.active, report
    assert report.compile_s > 0 and report.eager_ms > 0 and report.compiled_ms > 0
    assert engine.info()["compile"].startswith("compiled (inductor cpp")
    compiled_step = engine.step
    graphs_after_load = counters["stats"]["unique_graphs"]
    got = greedy(engine)
    # The warm-up compiled every graph a reply needs: no recompile per position.
    assert counters["stats"]["unique_graphs"] == graphs_after_load
    engine.step = engine.model.infer  # the same engine, eager
    assert greedy(engine) == got
    engine.step = compiled_step

    # Step by step: the compiled logits are the eager ones within fp32 summation-order error.
    state = engine.state
    tok = torch.tensor([[11]])
    with torch.inference_mode():
        engine.reset()
        engine.model.infer(torch.tensor([[1, 2, 3, 4, 5]]), state)
        for _ in range(4):
            snap = state.snapshot()
            ref = engine.model.infer(tok, state, last_only=True).logits
            state.restore(snap)
            got = engine.step(tok, state).logits
            assert_close(got, ref, dtype=torch.float32, what="compiled step logits")
            tok = ref[0, -1].argmax().view(1, 1)
    assert state.length == 5 + 4

    # Inductor's artefacts went to smollchat's cache folder, none beside the checkpoint.
    cache = graphs.compile_cache_dir()
    assert cache.is_relative_to(locations.cache_dir())
    assert any(p.is_file() for p in (cache / "fxgraph").rglob("*")), "no FX graph cached"
    checkpoint_dir = locations.demo_dir()
    assert not any("fxgraph" in p.parts or p.suffix in (".so", ".cpp") for p in checkpoint_dir.rglob("*"))
    # The measurement was recorded: "auto" now decides without measuring again.
    assert len(graphs._read_decisions()) == 1


def test_a_compiled_step_over_prepacked_weights_gives_their_eager_tokens():
    from chatapp.engine.layers import PackedLinear, packed_available

    if not packed_available(torch.float32):
        pytest.skip("this torch and CPU do not prepack float32 weights")
    packed = {"dtype": "float32", "widening": "packed/packed/packed", "narrowing": "packed/packed/packed"}
    engine = load_engine(get_entry("axiom-tiny"), device="cpu", dtype="float32", compile="on", kernels=packed)
    assert engine.compile.active, engine.compile
    assert any(isinstance(m, PackedLinear) for m in engine.model.modules())
    got = greedy(engine)
    engine.step = engine.model.infer
    assert greedy(engine) == got  # (the packed logits against the reference's: test_kernels, on every fixture)


def test_no_compiler_decodes_eager_with_one_log_line(no_cxx, caplog):
    assert graphs.find_cxx() is None
    with caplog.at_level(logging.WARNING, logger=graphs.__name__):
        engine = load_engine(get_entry("axiom-tiny"), device="cpu", dtype="float32", compile="on")
    assert engine.step == engine.model.infer
    assert not engine.compile.active and engine.compile.reason == "no C++ compiler"
    assert [r.getMessage() for r in caplog.records if r.name == graphs.__name__] == [
        "no C++ compiler found (set CXX or install g++): decoding eager"]
    assert engine.info()["compile"] == "eager (no C++ compiler)"
    assert len(greedy(engine, 4)) == 4


def test_compiler_found_on_path():
    # The machine running this suite has g++ (the compile test above needs it); the lookup names a file.
    found = graphs.find_cxx()
    if found is None:
        pytest.skip("no C++ compiler on this machine")
    assert found.endswith(("g++", "c++", "clang++")) or "CXX" in __import__("os").environ


def test_compile_failure_falls_back_to_eager(monkeypatch, caplog):
    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("inductor exploded\nsecond line")
        return call

    monkeypatch.setattr(graphs.torch, "compile", broken)
    eager = load_engine(get_entry("axiom-tiny"), device="cpu", dtype="float32", compile="off")
    with caplog.at_level(logging.WARNING, logger=graphs.__name__):
        engine = load_engine(get_entry("axiom-tiny"), device="cpu", dtype="float32", compile="on")
    assert engine.step == engine.model.infer
    assert engine.compile.reason == "compile failed: RuntimeError: inductor exploded"
    assert len([r for r in caplog.records if r.name == graphs.__name__]) == 1
    assert engine.state.length == 0  # the warm-up left nothing behind
    assert greedy(engine, 6) == greedy(eager, 6)


def test_auto_follows_the_recorded_measurement(monkeypatch):
    # torch.compile replaced by the plain function: the decision logic runs without inductor.
    monkeypatch.setattr(graphs.torch, "compile", lambda fn, **kw: fn)
    entry = get_entry("axiom-tiny")
    engine = load_engine(entry, device="cpu", dtype="float32")  # auto, nothing measured yet
    assert not engine.compile.active and "not measured" in engine.compile.reason
    key = graphs._decision_key(engine.model, "axiom", engine.device, engine.dtype)

    graphs._record_decision(key, eager_ms=2.0, compiled_ms=3.0)
    engine = load_engine(entry, device="cpu", dtype="float32")
    assert not engine.compile.active and "no faster" in engine.compile.reason

    graphs._record_decision(key, eager_ms=3.0, compiled_ms=2.0)
    engine = load_engine(entry, device="cpu", dtype="float32")
    assert engine.compile.active and isinstance(engine.step, graphs.CompiledStep)
    # Another dtype is another decision.
    assert not load_engine(entry, device="cpu", dtype="bfloat16").compile.active


@pytest.mark.parametrize("eager_ms, compiled_ms", [(3.0, 2.0), (2.0, 3.0)])
def test_auto_measures_a_real_size_model_once(monkeypatch, eager_ms, compiled_ms):
    # A model above AUTO_MEASURE_BYTES (here: every model) with nothing recorded: "auto" compiles, times the two
    # paths itself, keeps the faster and records it; the next load reads the record instead of timing again.
    monkeypatch.setattr(graphs.torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(graphs, "AUTO_MEASURE_BYTES", 0)
    timed = []

    def clock(fn, device):  # the eager and the compiled step alternate, eager first
        fn()
        timed.append(len(timed))
        return eager_ms if len(timed) % 2 else compiled_ms
    monkeypatch.setattr(graphs, "_step_ms", clock)
    said = []
    entry = get_entry("axiom-tiny")
    engine = load_engine(entry, device="cpu", dtype="float32", progress=said.append)
    assert len(timed) == 2 * graphs.MEASURE_STEPS
    assert any("timing it against eager" in m for m in said)
    assert (engine.compile.eager_ms, engine.compile.compiled_ms) == (eager_ms, compiled_ms)
    faster = compiled_ms < eager_ms
    assert engine.compile.active == faster and isinstance(engine.step, graphs.CompiledStep) == faster
    if not faster:
        assert "no faster" in engine.compile.reason and engine.step == engine.model.infer
    assert engine.state.length == 0
    key = graphs._decision_key(engine.model, "axiom", engine.device, engine.dtype)
    assert graphs._read_decisions()[key]["faster"] == faster
    again = load_engine(entry, device="cpu", dtype="float32")
    assert len(timed) == 2 * graphs.MEASURE_STEPS  # read back, not timed again
    assert again.compile.active == faster


def test_a_machine_too_busy_to_time_records_nothing(monkeypatch):
    # Every timed step spoilt (decisions.timed gave NaN): compiled for this load, no decision kept, so the next
    # load measures again.
    monkeypatch.setattr(graphs.torch, "compile", lambda fn, **kw: fn)
    monkeypatch.setattr(graphs, "AUTO_MEASURE_BYTES", 0)
    monkeypatch.setattr(graphs, "timed", lambda fn: (fn(), float("nan"))[1])
    entry = get_entry("axiom-tiny")
    engine = load_engine(entry, device="cpu", dtype="float32")
    assert engine.compile.active and "machine was busy" in engine.compile.reason
    assert engine.compile.eager_ms is None and graphs._read_decisions() == {}


def test_uncompiled_architecture_and_bad_mode():
    engine = load_engine(get_entry("axiom-tiny"), device="cpu", dtype="float32", compile="off")
    step, report = graphs.decode_step(engine.model, "huginn_raven", engine.state, engine.device, engine.dtype, "on")
    assert step == engine.model.infer
    assert not report.active and report.reason == "the huginn_raven step is not compiled"
    with pytest.raises(LoadError, match="compile must be one of auto, on, off"):
        load_engine(get_entry("axiom-tiny"), device="cpu", compile="fast")


@pytest.mark.gpu
def test_cuda_graph_step_gives_eager_tokens():
    entry = get_entry("axiom-tiny")
    eager = load_engine(entry, device="cuda", dtype="bfloat16", compile="off")
    graphed = load_engine(entry, device="cuda", dtype="bfloat16", compile="on")
    assert graphed.compile.active and graphed.compile.reason == "cuda graphs"
    assert greedy(graphed) == greedy(eager)
    # The prompt cache restores into the same buffers, so a second reply still runs on the captured graphs.
    assert greedy(graphed) == greedy(eager)


def test_byrne_s_derived_caches_trace_without_a_graph_break():
    # The engram's code weight and the static hyper-connection mixes are cached against their parameters' version
    # (is_inference(), _version: untraceable); a compiled step reads what the eager prefill cached, unchanged.
    from chatapp.engine.arch.spike_whale_parts import EngramMemory, HyperConnection

    engine = load_engine(get_entry("byrne-tiny"), device="cpu", dtype="float32", compile="off")
    engram = next(m for m in engine.model.modules() if isinstance(m, EngramMemory))
    hc = next(m for m in engine.model.modules() if isinstance(m, HyperConnection) and not m.dynamic)
    with torch.inference_mode():
        engine.model.infer(torch.tensor([[1, 2, 3]]), engine.state)
        want = (engram.code_weight(engine.device), *hc.static_mixes(engine.dtype))
        traced = torch.compile(lambda: (engram.code_weight(engine.device), *hc.static_mixes(engine.dtype)),
                               fullgraph=True, backend="eager")
        got = traced()
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("entry_id", ["byrne-tiny", "odinnext-tiny", "genesis-tiny"])
def test_the_newly_compilable_steps_trace_as_one_graph_with_eager_logits(entry_id):
    # Dynamo alone (backend="eager": the captured graph runs the same kernels), so equality holds by construction;
    # the state the traced steps write is what the next eager step reads.
    engine = load_engine(get_entry(entry_id), device="cpu", dtype="float32", compile="off")
    assert engine.entry.architecture in graphs.COMPILABLE
    model, state = engine.model, engine.state
    traced = torch.compile(lambda ids, s: model(ids, s, last_only=True), fullgraph=True, backend="eager")
    with torch.inference_mode():
        model.infer(torch.tensor([[1, 2, 3, 4, 5]]), state)
        tok = torch.tensor([[7]])
        for _ in range(4):
            snap = state.snapshot()
            ref = model.infer(tok, state, last_only=True).logits
            state.restore(snap)
            assert torch.equal(traced(tok, state), ref)
            tok = ref[0, -1].argmax().view(1, 1)


def test_each_model_s_compiled_step_runs_its_own_graph(monkeypatch):
    """The compiled step skips guards on the model's modules (graphs.CompiledStep), so two models of one
    architecture in one process, one float and one int8 (other modules, other weights; and one int4 in our
    nibbles where this machine runs them), must not meet each other's graphs: each step gives its own model's
    eager logits."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, **{**kw, "backend": "eager"}))
    from chatapp.engine.loader import load_model
    from chatapp.engine.demo import ensure_demo

    from chatapp.engine import cpu_gemv

    d = ensure_demo(get_entry("axiom-tiny"))
    models = [load_model(d), load_model(d, quantize="int8")]
    ours = cpu_gemv.products(cpu_gemv.INT4)
    if ours:  # int4 in our nibbles: the custom products traced through their fake (shape) functions
        path = f"nibbles/{ours[0]}/linear"
        models.append(load_model(d, quantize="int4", kernels={"dtype": "float32", "widening": path, "narrowing": path}))
    steps = [graphs.CompiledStep(m, torch.device("cpu")) for m in models]
    tok = torch.tensor([[7]])
    with torch.inference_mode():
        for model, step in zip(models * 2, steps * 2):
            state = model.make_state(16, "cpu", torch.float32)
            model.infer(torch.tensor([[1, 2, 3]]), state)
            snap = state.snapshot()
            ref = model.infer(tok, state, last_only=True).logits
            state.restore(snap)
            assert torch.equal(step(tok, state).logits, ref) and not step.failed
