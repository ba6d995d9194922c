"""Our one-row CPU product (engine/cpu_gemv.py, csrc/gemv.cpp) against an fp64 oracle, at every instruction
level this machine runs, on shapes whose rows and widths end in every kind of tail; and the kernel choice's use
of it (the fixtures through it: test_kernels.py's every-path test)."""
from __future__ import annotations

import pytest
import torch

from chatapp.engine import cpu_gemv, kernels
from chatapp.engine.layers import cpu_linear
from tests.engine.closeness import assert_close

# Rows: fewer than a thread's share, odd, many; widths: under one vector, a lone 32-wide block after the 64-wide
# ones (100), tails after either.
SHAPES = [(5, 7), (1, 100), (67, 129), (300, 1037), (1024, 256), (129, 4096 + 31)]


@pytest.fixture
def levels():
    # Function scope: the build goes under the test's own cache folder (the load is once a process anyway).
    if not cpu_gemv.load():
        pytest.skip(f"the extension cannot be built here: {cpu_gemv.error()}")
    return list(range(int(torch.ops.smollchat_cpu.gemv_cpu_levels()[0]) + 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_every_level_is_the_product_within_the_dtype_rounding(levels, dtype, shape):
    n, k = shape
    g = torch.Generator().manual_seed(n * 10007 + k)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    x = torch.randn(1, 1, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    want = x.double() @ w.double().t()
    scale = want.abs().max().item()
    for lvl in levels:
        got = torch.ops.smollchat_cpu.gemv(x, w, lvl)
        assert got.shape == (1, 1, n) and got.dtype == dtype
        # fp32: a few ulps of the largest output per sqrt(k) of summation; bf16: one rounding of the result
        # (half an ulp) on top of fp32 accumulation.
        tol = (2 ** -8) if dtype == torch.bfloat16 else 8 * torch.finfo(torch.float32).eps * k ** 0.5
        assert_close(got.double(), want, atol=tol * scale, rtol=tol, what=f"level {lvl} {tuple(shape)}")
        with_bias = cpu_linear(x, w, b, gemv=lvl) if lvl > 0 else None
        if with_bias is not None:
            assert_close(with_bias.double(), want + b.double(), atol=2 * tol * (scale + b.abs().max().item()),
                         rtol=2 * tol, what="with bias")


def test_bad_operands_are_refused_with_what_is_wrong(levels):
    w = torch.randn(8, 16)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.smollchat_cpu.gemv(torch.randn(1, 8), w.t(), 1)
    with pytest.raises(RuntimeError, match="one row of K = 16"):
        torch.ops.smollchat_cpu.gemv(torch.randn(2, 16), w, 1)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.smollchat_cpu.gemv(torch.randn(1, 16).bfloat16(), w, 1)


def test_more_rows_take_pytorch_s_product(levels):
    w, x = torch.randn(40, 24), torch.randn(3, 24)
    assert torch.equal(cpu_linear(x, w, gemv=1), torch.nn.functional.linear(x, w))


def test_the_level_follows_pytorch_s_kernel_family(levels, monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert cpu_gemv.level() == min(1, levels[-1])
    assert cpu_gemv.products(torch.bfloat16) == (["gemv-avx2"] if levels[-1] >= 1 else [])
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    assert cpu_gemv.products(torch.float32) == []


def test_measurement_offers_it_and_a_replay_without_it_falls_back(levels, fixtures_root, monkeypatch):
    from chatapp.engine.layers import CpuLinear
    from chatapp.engine.loader import load_model

    if levels[-1] < 1:
        pytest.skip("this CPU has no AVX2 level")
    assert kernels.MatrixPath("row", "gemv-avx2", "linear") in kernels.candidates(torch.float32, "decode")
    with pytest.raises(ValueError, match="decode only"):
        kernels.MatrixPath.parse("row/linear/gemv-avx2")
    rec = {"dtype": "float32", "widening": "row/gemv-avx2/linear", "narrowing": "row/linear/linear"}
    model = load_model(fixtures_root / "axiom", dtype="float32", kernels=rec)
    w13 = model.layers[0].ffn.w13
    assert type(w13) is CpuLinear and w13.gemv == 1 and type(model.layers[0].ffn.w2) is torch.nn.Linear
    assert model.head_product.keywords["gemv"] == 1  # the tied head widens: our product reads the table as it is
    monkeypatch.setattr(cpu_gemv, "products", lambda dtype: [])
    model = load_model(fixtures_root / "axiom", dtype="float32", kernels=rec)
    assert model.kernel_choice.as_dict()["widening"] == "row/linear/linear"
    assert "the gemv-avx2 product unavailable here" in model.kernel_choice.source
    assert not any(type(m) is CpuLinear for m in model.modules())


def test_a_replayed_int4_choice_without_our_product_packs_aten_s_layout(levels, fixtures_root, monkeypatch):
    from chatapp.engine.loader import load_model
    from chatapp.engine.quant import QuantLinear

    ours = cpu_gemv.products(cpu_gemv.INT4)
    if not ours:
        pytest.skip("this CPU has no AVX2 level")
    with pytest.raises(ValueError, match="int4 nibbles take one of our products"):
        kernels.MatrixPath.parse("nibbles/linear/linear")
    rec = {"dtype": "float32", "widening": f"nibbles/{ours[0]}/linear", "narrowing": "row/linear/linear"}
    model = load_model(fixtures_root / "axiom", dtype="float32", quantize="int4", kernels=rec)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.mode == "int4"]
    wide = {m.layout for m in layers if m.out_features > m.in_features}
    assert wide == {"nibbles"} and {m.layout for m in layers if m.out_features <= m.in_features} == {"aten"}
    assert {m.gemv for m in layers if m.layout == "nibbles"} == {cpu_gemv.PRODUCTS[ours[0]]}
    monkeypatch.setattr(cpu_gemv, "products", lambda dtype: [])
    model = load_model(fixtures_root / "axiom", dtype="float32", quantize="int4", kernels=rec)
    assert model.kernel_choice.as_dict()["widening"] == "row/linear/linear"
    assert f"the {ours[0]} product unavailable here" in model.kernel_choice.source
    assert {m.layout for m in model.modules() if isinstance(m, QuantLinear)} == {"aten"}


def quantized_x(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """The VNNI level's activation, written plainly: int8 blocks of 32 values (128 for int4), scale max|x| / 127 a
    block, round half to even, in fp32 arithmetic (the kernel's own operations, so equal by construction)."""
    k = x.shape[-1]
    blocks = torch.nn.functional.pad(x.float().reshape(-1), (0, -k % block)).view(-1, block)
    amax = blocks.abs().amax(1, keepdim=True)
    # 127 / amax correctly rounded, as the kernel divides (a Python number over a tensor takes 127 * (1 / amax) in
    # torch, one ulp off at times, and so a value sitting near a half step rounds the other way).
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    return ((blocks * inv).round().clamp(-127, 127) * (amax / 127)).reshape(-1)[:k]


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_int8_rows_product_is_the_scaled_product(levels, shape, xdtype):
    n, k = shape
    g = torch.Generator().manual_seed(n + 31 * k)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, generator=g) / 100).bfloat16()
    x = torch.randn(1, k, generator=g).to(xdtype)
    exact = (x.double() @ q.double().t()) * scales.double()
    # The VNNI level multiplies by x rounded to its int8 blocks: the product of those values, and within
    # half a block step a value of the exact one.
    on_blocks = (quantized_x(x).double()[None] @ q.double().t()) * scales.double()
    step = torch.nn.functional.pad(x.double().abs().reshape(-1), (0, -k % 32)).view(-1, 32).amax(1) / 127
    slack = (step.repeat_interleave(32)[None, :k] / 2 @ q.double().abs().t()) * scales.double()
    top = int(torch.ops.smollchat_cpu.gemv_cpu_levels()[2])
    # One rounding of the output (bf16: half an ulp) on fp32 accumulation.
    tol = 2 ** -8 if xdtype == torch.bfloat16 else 2 ** -16
    # 2: AVX-512 F/BW, 3: AVX512-VNNI, each clamped to what the CPU has; 4: int8 x int8 on AVX2, where level 1 runs.
    for lvl in range(5):
        got = torch.ops.smollchat_cpu.gemv_int8(x, q, scales, lvl)
        assert got.shape == (1, n) and got.dtype == xdtype
        blocks = (lvl == 3 and top >= 3) or (lvl == 4 and top >= 1)
        want = on_blocks if blocks else exact
        assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol, what=f"int8 level {lvl} {shape}")
        if blocks:
            assert ((got.double() - exact).abs() <= slack * (1 + tol) + tol * exact.abs().max()).all()
            assert (on_blocks - exact).abs().max() > 0  # the oracle does differ from the exact product


def test_the_int8_x_int8_products_do_not_saturate_at_the_extremes(levels):
    # Every weight at -128 or 127 and every x at +-its block's maximum: each pair of products the AVX2 loop sums
    # in 16 bits is then 2 x 128 x 127 or 2 x 127 x 127 in size, the largest it can be. Exact in every level.
    k = 96
    q = torch.tensor([[-128] * k, [127] * k, [-128, 127] * (k // 2)], dtype=torch.int8)
    x = torch.tensor([[1.0, -1.0] * (k // 2)]).float()
    x[0, :32] = 1.0
    scales = torch.ones(3).bfloat16()
    exact = x.double() @ q.double().t()
    for lvl in range(5):
        got = torch.ops.smollchat_cpu.gemv_int8(x, q, scales, lvl)
        assert torch.equal(got.double(), exact), (lvl, got, exact)


# (rows, input width, group): widths that are and are not multiples of 128 (the nibbles' span: padded), each group.
INT4_SHAPES = [(5, 96, 32), (67, 160, 32), (300, 576, 64), (129, 1024, 128), (40, 2816, 128), (3, 5280, 32),
               (70, 64, 64)]


@pytest.mark.parametrize("shape", INT4_SHAPES, ids=[f"{n}x{k}g{g}" for n, k, g in INT4_SHAPES])
@pytest.mark.parametrize("xdtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_int4_nibbles_product_is_the_dequantized_product(levels, shape, xdtype):
    """gemv_int4 on quant.py's nibbles: the weights are exactly the grid's (int4_unpack against a plain
    dequantization), and every level's product is the grid's weights times x, as given (level 0) or rounded to
    int8 spans of 128 (the byte products, levels 3 and 4), within fp32 summation and one rounding of the output;
    and within half an x step of the exact product."""
    from chatapp.engine.quant import int4_grid, quantize_int4

    n, k, group = shape
    g = torch.Generator().manual_seed(n + 7 * k)
    w = torch.randn(n, k, generator=g) / k ** 0.5 + torch.rand(n, 1, generator=g) * 0.1  # rows off centre
    q, scale, zero = int4_grid(w, group)
    grid = (q.float() - 8) * scale.float().repeat_interleave(group, 1) + zero.float().repeat_interleave(group, 1)
    packed, sz = quantize_int4(w, group, "nibbles")
    assert packed.shape == (n, -(-k // 128) * 64) and sz.shape == (n, -(-k // 128) * 128 // group, 2)
    for lvl in (0, 3, 4):  # the same bits at every level
        assert torch.equal(torch.ops.smollchat_cpu.int4_unpack(packed, sz, group, k, lvl), grid.bfloat16()), lvl
    rows = 1 + n % 7  # several rows of x too (prefill): tiles of four and a remainder
    x = torch.randn(rows, k, generator=g).to(xdtype)
    exact = x.double() @ grid.double().t()
    rounded = torch.stack([quantized_x(r, 128) for r in x]).double() @ grid.double().t()
    step = torch.nn.functional.pad(x.double().abs(), (0, -k % 128)).view(rows, -1, 128).amax(-1) / 127
    slack = step.repeat_interleave(128, 1)[:, :k] / 2 @ grid.double().abs().t()
    tol = 2 ** -8 if xdtype == torch.bfloat16 else 2 ** -16
    top = int(torch.ops.smollchat_cpu.gemv_cpu_levels()[2])
    for lvl in (0, 3, 4):
        got = torch.ops.smollchat_cpu.gemv_int4(x, packed, sz, group, lvl)
        assert got.shape == (rows, n) and got.dtype == xdtype
        assert torch.equal(torch.ops.smollchat_cpu.gemv_int4(x[-1:], packed, sz, group, lvl), got[-1:])
        bytes_ = lvl > 0 and top >= 1
        want = rounded if bytes_ else exact
        summed = 8 * torch.finfo(torch.float32).eps * k ** 0.5 * (x.double().abs() @ grid.double().abs().t())
        assert ((got.double() - want).abs() <= tol * want.abs() + summed + 1e-30).all(), f"int4 level {lvl} {shape}"
        if bytes_:
            assert ((got.double() - exact).abs() <= slack * (1 + tol) + tol * exact.abs() + summed).all()
            assert (rounded - exact).abs().max() > 0  # the oracle does differ from the exact product


def test_the_int4_byte_products_do_not_saturate(levels):
    """Every nibble at 15 and every x at its span's maximum: the AVX2 loop adds four 16-bit pair sums of 15 x 127
    products within a group of 128 (15,240, under 2^15), the largest they can be; a wrapped sum would be off by
    65,536 steps."""
    from chatapp.engine.quant import int4_grid, quantize_int4

    k = 256
    w = torch.ones(2, k)
    w[:, ::32] = -1.0  # every group spans [-1, 1]: 1.0 is nibble 15, and all but one weight a group are 15
    for group in (128, 64, 32):
        q, scale, zero = int4_grid(w, group)
        assert (q == 15).sum() == 2 * (k - k // 32)
        grid = (q.double() - 8) * scale.double().repeat_interleave(group, 1) + zero.double().repeat_interleave(group, 1)
        packed, sz = quantize_int4(w, group, "nibbles")
        x = torch.ones(2, k)
        x[1, 1::2] = -1.0  # row 1: the pair sums cancel instead
        for row in range(2):
            want = x[row:row + 1].double() @ grid.t()
            for lvl in (0, 3, 4):
                got = torch.ops.smollchat_cpu.gemv_int4(x[row:row + 1], packed, sz, group, lvl).double()
                assert ((got - want).abs() <= 1e-5 * k).all(), (group, row, lvl, got, want)


def test_int4_operands_are_refused_with_what_is_wrong(levels):
    from chatapp.engine.quant import quantize_int4

    packed, sz = quantize_int4(torch.randn(8, 256), 128, "nibbles")
    with pytest.raises(RuntimeError, match="group size must be"):
        torch.ops.smollchat_cpu.gemv_int4(torch.randn(1, 256), packed, sz, 48, 3)
    with pytest.raises(RuntimeError, match="nibbles must be a contiguous uint8"):
        torch.ops.smollchat_cpu.gemv_int4(torch.randn(1, 512), packed, sz, 128, 3)
    with pytest.raises(RuntimeError, match="scales must be a contiguous bf16"):
        torch.ops.smollchat_cpu.int4_unpack(packed, sz[:, :1].contiguous(), 128, 256, 3)


def test_an_int8_model_takes_the_product_the_choice_names(levels, fixtures_root):
    from chatapp.engine.loader import load_model
    from chatapp.engine.quant import QuantLinear
    from safetensors.torch import load_file

    if levels[-1] < 1:
        pytest.skip("this CPU has no AVX2 level")
    d = fixtures_root / "axiom"
    if not d.is_dir():
        pytest.skip("no axiom fixture")
    ids = load_file(str(d / "golden.safetensors"))["input_ids"][:, :12]
    rec = {"dtype": "bfloat16", "widening": "row/gemv-avx2/linear", "narrowing": "row/linear/linear"}
    ours = load_model(d, dtype="bfloat16", quantize="int8", kernels=rec)
    aten = load_model(d, dtype="bfloat16", quantize="int8", kernels={**rec, "widening": "row/linear/linear"})
    layers = [m for m in ours.modules() if isinstance(m, QuantLinear) and m.mode == "int8"]
    assert {m.gemv for m in layers if m.out_features > m.in_features} == {1}
    assert {m.gemv for m in layers if m.out_features <= m.in_features} == {-1}
    assert ours.kernel_choice.as_dict()["widening"] == "row/gemv-avx2/linear"
    with torch.inference_mode():
        sa, sb = (m.make_state(ids.shape[1], "cpu", torch.bfloat16) for m in (ours, aten))
        ours.infer(ids[:, :-1], sa), aten.infer(ids[:, :-1], sb)
        got, want = ours.infer(ids[:, -1:], sa).logits, aten.infer(ids[:, -1:], sb).logits
    assert_close(got.float(), want.float(), dtype=torch.bfloat16, what="one-row int8 logits, ours against aten's")


def test_int8_measurement_races_aten_against_ours(levels):
    if levels[-1] < 1:
        pytest.skip("this CPU has no AVX2 level")
    calls = []

    def timer(case, path, fn):
        calls.append(str(path))
        fn()  # the real products run (int8 pools): no crash, right shapes
        if isinstance(path, str):  # the unpacking race at several rows: the own product wins throughout here
            return 0.001 if path == "own" else 0.002
        return 0.001 if path.decode == "gemv-avx2" else 0.002
    chosen, _ = kernels.measure({"widening": (96, 40), "narrowing": (40, 200)}, torch.int8, timer)
    assert str(chosen["widening"]) == str(chosen["narrowing"]) == f"row/gemv-avx2/unpack{kernels.UNPACK_RACE_ROWS[-1]}"
    assert "row/linear/linear" in calls and "unpack" in calls


def test_int4_measurement_races_aten_s_layout_against_our_nibbles(levels):
    ours = cpu_gemv.products(cpu_gemv.INT4)
    if not ours:
        pytest.skip("this CPU has no AVX2 level")
    calls = []

    def timer(case, path, fn):
        calls.append(str(path))
        fn()  # the real products run on both layouts' pools: no crash, right shapes
        if isinstance(path, str):  # the unpacking race at several rows: unpacking wins from the first here
            return 0.001 if path == "unpack" else 0.002
        return 0.001 if path.layout == "nibbles" and path.decode == ours[0] else 0.002
    # (2,000 wide, as one of Byrne's matrices: no int4 group divides it, so it is timed at 2,048)
    chosen, _ = kernels.measure({"widening": (96, 64), "narrowing": (40, 2000)}, cpu_gemv.INT4, timer)
    least = kernels.UNPACK_RACE_ROWS[0] // 2
    assert str(chosen["widening"]) == str(chosen["narrowing"]) == f"nibbles/{ours[0]}/unpack{least}"
    assert "row/linear/linear" in calls and {f"nibbles/{p}/linear" for p in ours} <= set(calls)


def test_without_a_compiler_it_is_no_candidate_and_says_why(monkeypatch):
    from chatapp.engine import graphs

    monkeypatch.setattr(cpu_gemv, "_state", {})
    monkeypatch.setattr(graphs, "find_cxx", lambda: None)
    assert not cpu_gemv.load() and "no C++ compiler" in cpu_gemv.error()
    assert cpu_gemv.products(torch.bfloat16) == cpu_gemv.products(torch.int8) == cpu_gemv.products(cpu_gemv.INT4) == []
    assert not any("gemv" in str(p) for p in kernels.candidates(torch.float32, "decode"))


def test_the_build_folder_follows_every_source_and_header(tmp_path, monkeypatch):
    """A changed shared header must rebuild the extension (a stale library would run the old SIMD code), and
    every file the build includes must ship with the package."""
    import re
    from pathlib import Path

    csrc = cpu_gemv.SOURCE.parent
    included = {m for f in cpu_gemv.SOURCES for m in re.findall(r'#include "([^"]+)"', f.read_text())}
    assert included and {csrc / name for name in included} <= set(cpu_gemv.HEADERS)
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    listed = re.search(r"\[tool\.setuptools\.package-data\]\n\"\*\" = \[(.*)\]", pyproject).group(1)
    patterns = re.findall(r'"([^"]+)"', listed)
    assert all(any(f.match(p) for p in patterns) for f in cpu_gemv.SOURCES + cpu_gemv.HEADERS)
    before = cpu_gemv.build_dir()
    header = tmp_path / "simd.h"
    header.write_text(cpu_gemv.HEADERS[0].read_text() + "\n// changed\n")
    monkeypatch.setattr(cpu_gemv, "HEADERS", (header,))
    assert cpu_gemv.build_dir() != before


def test_int8_rows_unpack_to_the_bf16_of_their_scaled_values(levels):
    """int8_unpack (prefill past quant.UNPACK_ROWS rows) gives q * scale rounded once to bf16, ties to even, at every
    level, tails of K (not a multiple of 16) included; and a layer past that many rows is the product of those."""
    from chatapp.engine.quant import UNPACK_ROWS, QuantLinear, quantize_int8

    g = torch.Generator().manual_seed(3)
    for n, k in ((37, 100), (5, 48), (64, 1024)):  # (the last one is the layer's below)
        q, scales = quantize_int8(torch.randn(n, k, generator=g) * 3)
        want = (q.float() * scales.float()[:, None]).bfloat16()
        for lvl in (0, 1, 3):
            assert torch.equal(torch.ops.smollchat_cpu.int8_unpack(q, scales, lvl), want), (n, k, lvl)
    layer = QuantLinear("int8", 1024, 64, q, scales)
    layer.gemv = 1
    x = torch.randn(UNPACK_ROWS + 5, 1024, generator=g)
    assert_close(layer(x).double(), (x.bfloat16().double() @ want.double().t()), dtype=torch.bfloat16,
                 what="int8 rows past UNPACK_ROWS")
