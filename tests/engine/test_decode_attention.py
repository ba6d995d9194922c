"""Our decode attention (csrc/attention.cpp, layers.causal_attention's `product`) against a plain fp64
softmax(q k^T / sqrt(d)) v, at every level this machine runs, on cache views with strides and lengths that end
in every kind of tail; the kernel choice's race between it and SDPA; and the golden fixtures through it
(test_kernels.py's every-path test)."""
from __future__ import annotations

import pytest
import torch

from chatapp.engine import cpu_gemv, kernels
from chatapp.engine.layers import causal_attention
from tests.engine.closeness import assert_close

# (query heads, kv heads, key width, cached length): MHA and GQA, widths on and off the vector widths (24: AVX2's
# 8 but not AVX-512's 16, so level 2 runs the AVX2 loop; 20: neither, portable), one key, lengths around a vector's
# 8 and 16.
CASES = [(4, 4, 64, 1), (16, 8, 64, 17), (8, 2, 128, 300), (6, 3, 80, 33), (2, 1, 16, 16), (12, 1, 64, 1024),
         (4, 2, 24, 13), (2, 2, 20, 9)]


@pytest.fixture
def levels():
    if not cpu_gemv.load():
        pytest.skip(f"the extension cannot be built here: {cpu_gemv.error()}")
    return list(range(int(torch.ops.smollchat_cpu.attention_cpu_level()) + 1))


def oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, 1, H, D], k/v [B, Hkv, L, D]: query head h reads kv head h // (H / Hkv); fp64."""
    b, _, h, d = q.shape
    rep = h // k.shape[1]
    kk, vv = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    p = torch.softmax((q.double().transpose(1, 2) @ kk.transpose(-1, -2)) / d ** 0.5, dim=-1)
    return (p @ vv).transpose(1, 2)  # [B, 1, H, Dv]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"{h}x{hkv}x{d}-L{n}" for h, hkv, d, n in CASES])
def test_every_level_is_the_attention_within_the_dtype_rounding(levels, dtype, case):
    h, hkv, d, n = case
    g = torch.Generator().manual_seed(h * 1000 + n)
    # Views of a longer cache, as a decode step passes them: strided over the unused tail, batch of two.
    cache_k = torch.randn(2, hkv, n + 5, d, generator=g).to(dtype)
    cache_v = torch.randn(2, hkv, n + 5, d, generator=g).to(dtype)
    k, v = cache_k[:, :, :n], cache_v[:, :, :n]
    q = (3 * torch.randn(2, 1, h, d, generator=g)).to(dtype)  # peaked scores: the softmax's range is exercised
    want = oracle(q, k, v)
    # fp32: summation-order error over the cached length; bf16: one rounding of the output on fp32 work.
    tol = 2 ** -8 if dtype == torch.bfloat16 else 64 * torch.finfo(torch.float32).eps * n ** 0.5
    for lvl in levels:
        got = causal_attention(q, k, v, product=lvl) if lvl else torch.ops.smollchat_cpu.decode_attention(
            q.view(2, hkv, h // hkv, d), k, v, d ** -0.5, 0).view(2, 1, h, d)
        assert got.shape == want.shape and got.dtype == dtype
        assert_close(got.double(), want, atol=tol, rtol=tol, what=f"level {lvl} {case}")
    assert_close(causal_attention(q, k, v).double(), want, atol=tol, rtol=tol, what="SDPA (the oracle's own check)")


def test_bad_operands_are_refused_with_what_is_wrong(levels):
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 2, 5, 16)
    with pytest.raises(RuntimeError, match="one dtype"):
        torch.ops.smollchat_cpu.decode_attention(q, k, k.bfloat16(), 0.25, 2)
    with pytest.raises(RuntimeError, match="do not match"):
        torch.ops.smollchat_cpu.decode_attention(q, torch.randn(1, 3, 5, 16), torch.randn(1, 3, 5, 16), 0.25, 2)
    with pytest.raises(RuntimeError, match="last dims contiguous"):
        torch.ops.smollchat_cpu.decode_attention(q, k.transpose(2, 3).contiguous().transpose(2, 3), k, 0.25, 2)


def test_the_choice_races_sdpa_against_ours_and_records_it(levels, monkeypatch):
    names = cpu_gemv.attention_products()
    if not names:
        pytest.skip("this machine has no level of our decode attention above portable C++")
    calls = []

    def timer(case, path, fn):
        calls.append(path)
        fn()  # the real calls run: no crash
        return 0.001 if path == names[0] else 0.002
    timings = kernels.measure_attention((8, 4, 64, 64), torch.bfloat16, 40, names, timer)
    assert set(timings) == {"sdpa", *names} and min(timings, key=timings.get) == names[0]
    assert "sdpa" in calls

    class Model(torch.nn.Module):  # a model big enough to be measured, with one cached-attention module
        max_context = 64

        def __init__(self):
            super().__init__()
            from chatapp.engine.arch.axiom import Attention, ModelArgs
            self.attn = Attention(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=10))

        def matrices(self):
            return [torch.empty(kernels.MIN_MEASURE_BYTES // 4, dtype=torch.float32).view(-1, 64)]
    model = Model()
    got = kernels.choose_attention(model, torch.float32, torch.device("cpu"), "auto", timer)
    assert got == names[0]
    calls.clear()
    assert kernels.choose_attention(model, torch.float32, torch.device("cpu"), "auto", timer) == names[0]
    assert not calls  # cached for this machine, dtype and head shape
    assert kernels.choose_attention(model, torch.float32, torch.device("cpu"), "reference", timer) == "sdpa"


def test_a_recorded_attention_is_replayed_or_put_back_to_sdpa(levels, fixtures_root, monkeypatch):
    from chatapp.engine.loader import load_model

    d = fixtures_root / "axiom"
    if not d.is_dir():
        pytest.skip("no axiom fixture")
    names = cpu_gemv.attention_products()
    if not names:
        pytest.skip("this machine has no level of our decode attention above portable C++")
    rec = {"dtype": "float32", "widening": "row/linear/linear", "narrowing": "row/linear/linear", "attention": names[0]}
    model = load_model(d, kernels=rec)
    assert model.kernel_choice.as_dict()["attention"] == names[0]
    assert {m.decode_attention for m in model.modules() if hasattr(m, "attention_heads")} == {cpu_gemv.ATTENTION[names[0]]}
    monkeypatch.setattr(cpu_gemv, "attention_products", lambda: [])
    model = load_model(d, kernels=rec)
    assert model.kernel_choice.attention == "sdpa" and "attention unavailable here" in model.kernel_choice.source
    assert {m.decode_attention for m in model.modules() if hasattr(m, "attention_heads")} == {0}
    with pytest.raises(ValueError, match="unknown decode attention"):
        kernels.KernelChoice.from_dict({**rec, "attention": "fast"})


def test_a_compiled_step_over_our_attention_gives_its_eager_tokens(levels, inductor_only):
    from chatapp.catalog import get_entry
    from chatapp.engine.runtime import load_engine
    from tests.engine.test_graphs import greedy

    names = cpu_gemv.attention_products()
    if not names:
        pytest.skip("this machine has no level of our decode attention above portable C++")
    rec = {"dtype": "float32", "widening": "row/linear/linear", "narrowing": "row/linear/linear", "attention": names[0]}
    engine = load_engine(get_entry("axiom-tiny"), device="cpu", dtype="float32", compile="on", kernels=rec)
    assert engine.compile.active, engine.compile
    assert engine.info()["kernels"]["attention"] == names[0]
    got = greedy(engine)
    engine.step = engine.model.infer
    assert greedy(engine) == got
