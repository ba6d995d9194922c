"""The fused CPU decode step (engine/dense_step.py, csrc/dense_step.cpp) against the eager step it replaces: the
reference fixture's greedy ids and step logits through every product and attention it can call, quantized models'
logits against the same quantized modules run eager, and eager (never a crash) where it cannot run or fails."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from chatapp.catalog import get_entry
from chatapp.contract import Done
from chatapp.engine import cpu_gemv, dense_step
from chatapp.engine.loader import load_model
from chatapp.engine.quant import QuantLinear
from chatapp.engine.runtime import load_engine
from tests.engine.closeness import assert_close, dtype_tolerance

CPU = torch.device("cpu")


@pytest.fixture
def extension():
    if not cpu_gemv.load():
        pytest.skip(f"the extension cannot be built here: {cpu_gemv.error()}")


def _paths(mdtype: torch.dtype, layout: str = "row") -> list[str]:
    """Every decode product this machine runs for `mdtype` weights, as kernel-choice paths, with PyTorch's."""
    return [f"{layout}/{p}/linear" for p in cpu_gemv.products(mdtype)] + ["row/linear/linear"]


def _attentions() -> list[str]:
    return ["sdpa", *cpu_gemv.attention_products()]


@torch.inference_mode()
def _decode(step, model, ids: torch.Tensor, continuation: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Prefill eagerly, then feed `continuation` through `step` one token at a time: the logits before each."""
    state = model.make_state(ids.shape[1] + len(continuation), CPU, dtype)
    rows = [model.infer(ids, state, last_only=True).logits[0, -1]]
    for tok in continuation[:-1]:
        rows.append(step(torch.tensor([[tok]]), state).logits[0, -1])
    assert state.length == ids.shape[1] + len(continuation) - 1
    return torch.stack(rows)


def _fused(model, dtype: torch.dtype):
    step, why = dense_step.build(model, CPU, dtype)
    assert step is not None, why
    return step


@pytest.mark.parametrize("attention", ["sdpa", "attention-avx2", "attention-avx512"])
@pytest.mark.parametrize("path", ["row/linear/linear", "row/gemv-avx2/linear", "row/gemv-avx512/linear"])
def test_the_reference_fixture_decodes_its_greedy_ids_through_the_fused_step(extension, fixtures_root, path, attention):
    """fp32, every one-row product and decode attention this machine has: the fixture's cached greedy ids, and its
    step logits within the fixture's own tolerance."""
    name = path.split("/")[1]
    missing = [n for n, have in ((name, name == "linear" or name in cpu_gemv.products(torch.float32)),
                                 (attention, attention in _attentions())) if not have]
    if missing:
        pytest.skip(f"this machine (or its kernel family) has no {' and no '.join(missing)}")
    d = fixtures_root / "axiom"
    golden = load_file(str(d / "golden.safetensors"))
    tol = json.loads((d / "golden.json").read_text())["suggested_tolerance"]["greedy_step_logits_fp32"]
    model = load_model(d, kernels={"dtype": "float32", "widening": path, "narrowing": path, "attention": attention})
    fused = _fused(model, torch.float32)
    expected = golden["greedy_ids"][0].tolist()
    got = _decode(fused, model, golden["input_ids"], expected, torch.float32)
    assert fused.failed is None
    assert got.argmax(-1).tolist() == expected
    assert_close(got, golden["greedy_step_logits"][0], tol=tol, what="fused step logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["int8", "int4", "int4-nibbles"])
def test_quantized_products_give_the_eager_step_s_logits(extension, fixtures_root, mode, dtype):
    """The same quantized modules (each of ours and aten's) run eagerly and inside the fused step: the fused
    step's logits are the eager step's within a few roundings of the activations (bf16 for every quantized
    product) and the same greedy ids."""
    mode, _, layout = mode.partition("-")
    mdtype = torch.int8 if mode == "int8" else cpu_gemv.INT4
    paths = _paths(mdtype, layout or "row") if layout or mode == "int8" else ["row/linear/linear"]
    d = fixtures_root / "axiom"
    ids = load_file(str(d / "golden.safetensors"))["input_ids"]
    for path in paths:
        model = load_model(d, dtype=dtype, quantize=mode,
                           kernels={"dtype": str(dtype).removeprefix("torch."), "widening": path, "narrowing": path,
                                    "attention": _attentions()[-1]})
        kinds = {m.layout if m.mode == "int4" else "int8" for m in model.modules() if isinstance(m, QuantLinear)}
        want = "int8" if mode == "int8" else "nibbles" if path.startswith("nibbles") else "aten"
        assert kinds == {want}, kinds
        eager = _decode(lambda t, s: model.infer(t, s, last_only=True), model, ids, list(range(1, 17)), dtype)
        fused = _decode(_fused(model, dtype), model, ids, list(range(1, 17)), dtype)
        assert_close(fused, eager, rtol=dtype_tolerance(torch.bfloat16, 4), atol=0.0, what=f"{mode} {path}")
        assert fused.argmax(-1).tolist() == eager.argmax(-1).tolist()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_engine_decodes_through_the_fused_step_with_the_eager_tokens(extension, dtype):
    """`--compile on` on a CPU takes the fused step for Axiom (no inductor run), reports it, and a reply's tokens are
    the eager engine's; the step writes the same cache the eager step writes."""
    engine = load_engine(get_entry("axiom-tiny"), device="cpu", dtype=dtype, compile="on")
    assert engine.compile.active and engine.compile.reason == dense_step.DenseStep.backend, engine.compile
    assert engine.info()["compile"].startswith("compiled (fused C++ step")
    s = engine.default_settings().with_overrides(temperature=0.0, max_new_tokens=20, repetition_penalty=1.0,
                                                 no_repeat_ngram=1, top_k=0, top_p=1.0, stop_strings=())
    prompt = [1, 2, 3, 4, 5, 6, 7]
    fused = [ev.token_id for ev in engine.generate(prompt, s) if not isinstance(ev, Done)]
    fused_cache = [b[:, :, :engine.state.length].clone() for layer in engine.state for b in layer.buffers()]
    step, engine.step = engine.step, engine.model.infer
    eager = [ev.token_id for ev in engine.generate(prompt, s) if not isinstance(ev, Done)]
    assert fused == eager and len(fused) == 20
    mdtype = getattr(torch, dtype)
    for got, ref in zip(fused_cache, (b[:, :, :engine.state.length] for layer in engine.state for b in layer.buffers())):
        assert_close(got, ref, dtype=mdtype, what="KV cache")
    assert step.failed is None


def test_what_the_op_cannot_run_stays_on_the_module_s_path(extension, fixtures_root):
    """A bias, oneDNN-prepacked weights or norms of another dtype: no fused step, and the reason."""
    model = load_model(fixtures_root / "axiom")
    wo = model.layers[1].attn.wo
    wo.bias = torch.nn.Parameter(torch.zeros(wo.out_features))
    step, why = dense_step.build(model, CPU, torch.float32)
    assert step is None and "bias" in why
    model = load_model(fixtures_root / "axiom")
    model.norm.weight.data = model.norm.weight.data.double()
    step, why = dense_step.build(model, CPU, torch.float32)
    assert step is None and "norms" in why
    assert dense_step.build(load_model(fixtures_root / "genesis"), CPU, torch.float32) == (
        None, "the architecture has no fused step")


def test_a_failing_op_falls_back_to_eager_for_good(extension, fixtures_root, caplog):
    """If the op raises, the token is computed eagerly, the state is as the eager step leaves it, and later tokens
    go eager without trying again. The op itself refuses a position outside the cache it was given."""
    model = load_model(fixtures_root / "axiom")
    fused = _fused(model, torch.float32)
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        state, ref_state = model.make_state(16, CPU, torch.float32), model.make_state(16, CPU, torch.float32)
        model.infer(ids, state)
        model.infer(ids, ref_state)
        fused(torch.tensor([[4]]), state)
        model.infer(torch.tensor([[4]]), ref_state)
        x, (cos, sin) = model.embed(torch.tensor([[5]])), model._rope(4, 1, CPU)
        with pytest.raises(RuntimeError, match="outside the cache"):
            fused._op.step(x, cos, sin, 16)
        calls = []

        class Broken:
            def step(self, *args):
                calls.append(args)
                raise RuntimeError("boom")
        fused._op = Broken()
        with caplog.at_level(logging.WARNING):
            got = fused(torch.tensor([[5]]), state).logits
        assert fused.failed == "RuntimeError: boom" and "failed, running eager" in caplog.text
        assert_close(got, model.infer(torch.tensor([[5]]), ref_state, last_only=True).logits, dtype=torch.float32)
        assert state.length == ref_state.length == 5
        fused(torch.tensor([[6]]), state)
        assert state.length == 6 and len(calls) == 1
