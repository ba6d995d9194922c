"""Weight-only int8/int4: the packed kernels apply the rounded weights, quality on every golden fixture,
the on-disk cache, the bytes it saves, and clear errors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from chatapp.engine import quant
from chatapp.engine.loader import load_model, safetensors_files
from chatapp.engine.quant import QuantEmbedding, QuantError, QuantLinear, dequantize, quantize_model

FIXTURES = ("axiom", "byrne", "genesis", "huginn", "odinnext")
# Relative logit error |q - fp32| / |fp32| over the fixture's prompt, measured when this was written
# (bf16 activations, int4 groups of 64 on these 64-wide models) and given 1.5x room. The fixtures are
# random-weight models whose logits amplify weight noise: int4's per-layer weight error is ~9 % here
# (int8 0.6 %), and a wrong packing or zero point gives 1.0 or more.
REL_BOUND = {("axiom", "int8"): 0.12, ("axiom", "int4"): 0.98, ("byrne", "int8"): 0.04, ("byrne", "int4"): 0.46,
             ("genesis", "int8"): 0.09, ("genesis", "int4"): 0.79, ("huginn", "int8"): 0.09, ("huginn", "int4"): 0.54,
             ("odinnext", "int8"): 0.025, ("odinnext", "int4"): 0.32}
# Top-1 agreement over the prompt's 24 positions, measured the same way, less one position of room.
TOP1_FLOOR = {("axiom", "int8"): 0.83, ("axiom", "int4"): 0.25, ("byrne", "int8"): 0.91, ("byrne", "int4"): 0.66,
              ("genesis", "int8"): 0.91, ("genesis", "int4"): 0.66, ("huginn", "int8"): 0.91, ("huginn", "int4"): 0.95,
              ("odinnext", "int8"): 0.91, ("odinnext", "int4"): 0.87}


def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


@pytest.fixture(scope="module")
def fixture_models(fixtures_root):
    def get(name):
        d = fixtures_root / name
        if not d.is_dir():
            pytest.skip(f"the {name} fixture is absent from {fixtures_root}")
        return d, load_file(str(d / "golden.safetensors"))["input_ids"]
    return get


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("name", FIXTURES)
@torch.inference_mode()
def test_quality_on_the_golden_fixture(fixture_models, name, mode):
    d, ids = fixture_models(name)
    ref = _logits(load_model(d), ids)
    model = load_model(d)
    report = quantize_model(model, mode)
    assert report.layers and all(k.startswith(mode) for n, k in report.layers.items() if n not in report.kept)
    out = _logits(model, ids)
    err = (out - ref).abs()
    assert float((out - ref).norm() / ref.norm()) <= REL_BOUND[name, mode]
    agree = out.argmax(-1) == ref.argmax(-1)
    assert float(agree.float().mean()) >= TOP1_FLOOR[name, mode]
    # Where fp32's winner leads by more than twice the largest logit error, no error can change it.
    top2 = ref.topk(2, -1).values
    sure = (top2[..., 0] - top2[..., 1]) > 2 * err.amax(-1)
    assert agree[sure].all()


def _nibbles():
    """A kernel choice that packs int4 in our nibbles layout for both classes of matrix (skips where this machine
    cannot build or run our int4 product)."""
    from chatapp.engine import cpu_gemv
    from chatapp.engine.kernels import KernelChoice, MatrixPath

    ours = cpu_gemv.products(cpu_gemv.INT4)
    if not ours:
        pytest.skip("no int4 product of ours here (no C++ compiler, or no AVX2)")
    path = MatrixPath("nibbles", ours[0], "linear")
    return KernelChoice("float32", path, path, "test")


def _layers(name, fixtures_root):
    model = load_model(fixtures_root / name)
    floats = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return model, floats


@pytest.mark.parametrize("mode", ["int8", "int4", "int4-nibbles"])
@torch.inference_mode()
def test_kernels_apply_the_rounded_weights_within_the_grid(fixtures_root, mode):
    """Each layer's weights are the float ones within half a grid step, and several rows of x through the layer
    (aten's kernels; for our nibbles, blocks of unpacked bf16 rows through F.linear) are those weights' product."""
    choice = _nibbles() if mode == "int4-nibbles" else None
    mode = mode.split("-")[0]
    model, floats = _layers("odinnext", fixtures_root)
    quantize_model(model, mode, choice=choice)
    if choice is not None:
        assert {m.layout for m in model.modules() if isinstance(m, QuantLinear) and m.mode == "int4"} == {"nibbles"}
    g = torch.Generator().manual_seed(0)
    checked = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear) or name not in floats:
            continue
        w, deq = floats[name], dequantize(layer)
        if layer.mode == "int8":
            step = w.abs().amax(1, keepdim=True) / 127
        else:
            grp = w.reshape(w.shape[0], -1, layer.group_size)
            step = ((grp.amax(-1) - grp.amin(-1)) / 15).repeat_interleave(layer.group_size, 1)
        # Half a grid step, plus the bf16 rounding of the scale (2^-8 relative) and of the kernel's output.
        assert ((deq - w).abs() <= step * (0.5 + 2 ** -7) + 2 ** -8 * w.abs() + 1e-6).all(), name
        x = torch.randn(3, 5, layer.in_features, generator=g)
        want = x.to(torch.bfloat16).float() @ deq.t()
        got = layer(x)
        assert got.shape == (3, 5, layer.out_features) and got.dtype == torch.float32
        assert torch.allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * float(want.abs().max()))
        checked += 1
    assert checked >= 8


def test_int4_falls_back_to_int8_where_groups_do_not_divide():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(80, 200), nn.Linear(200, 48, bias=False), nn.Linear(48, 8))
    ref = model(torch.randn(2, 80))
    report = quantize_model(model, "int4")
    assert report.layers == {"0": "int8", "1": "int8"}
    assert "input width 80 is not a multiple of 128 or 64 or 32" in report.kept["0"]
    assert "input width 200" in report.kept["1"]
    assert "too small" in report.kept["2"] and isinstance(model[2], nn.Linear)
    out = model(torch.randn(2, 80))
    assert out.shape == ref.shape and torch.isfinite(out).all()


def test_int4_pads_rows_to_sixteen():
    torch.manual_seed(0)
    lin = nn.Linear(64, 100)  # 100 rows: the packer needs a multiple of 16
    model = nn.Sequential(lin)
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    quantize_model(model, "int4")
    x = torch.randn(4, 64)
    want = x @ w.t() + b
    got = model(x)
    assert got.shape == (4, 100)
    assert float((got - want).norm() / want.norm()) < 0.1  # int4's grid on N(0, 1/8) weights


@torch.inference_mode()
def test_cache_round_trip_is_keyed_and_never_beside_the_checkpoint(fixtures_root):
    d = fixtures_root / "axiom"
    before = sorted(p.name for p in d.iterdir())
    files = safetensors_files(d)
    ids = load_file(str(d / "golden.safetensors"))["input_ids"]
    first = load_model(d)
    r1 = quantize_model(first, "int4", files)
    assert r1.cache == "written" and r1.cache_path
    cache = quant._cache_root()
    assert str(r1.cache_path).startswith(str(cache)) and cache.is_relative_to(os.environ["SMOLLCHAT_HOME"])
    second = load_model(d)
    r2 = quantize_model(second, "int4", files)
    assert r2.cache == "hit" and r2.cache_path == r1.cache_path and r2.layers == r1.layers
    assert torch.equal(_logits(first, ids), _logits(second, ids))  # the same packed tensors
    assert quantize_model(load_model(d), "int8", files).cache_path != r1.cache_path
    # A damaged entry is rebuilt, never trusted.
    with open(r1.cache_path, "r+b") as f:
        f.write(b"\xff" * 64)
    third = load_model(d)
    assert quantize_model(third, "int4", files).cache == "written"
    assert torch.equal(_logits(third, ids), _logits(first, ids))
    # The int4 layout is part of the key: our nibbles are cached apart from aten's packing, and hit on a second load.
    choice = _nibbles()
    r4 = quantize_model(load_model(d), "int4", files, choice=choice)
    assert r4.cache == "written" and r4.cache_path != r1.cache_path
    again = load_model(d)
    r5 = quantize_model(again, "int4", files, choice=choice)
    assert r5.cache == "hit" and r5.cache_path == r4.cache_path and any("nibbles" in k for k in r5.layers.values())
    assert {m.layout for m in again.modules() if isinstance(m, QuantLinear) and m.mode == "int4"} == {"nibbles"}
    assert sorted(p.name for p in d.iterdir()) == before
    memo = json.loads((cache / "sha256.json").read_text())
    assert any(k.startswith(str(files[0].resolve())) for k in memo)


@pytest.mark.parametrize("mode,most", [("int8", 0.27), ("int4", 0.16)])
def test_weight_bytes_show_the_quantized_size(fixtures_root, mode, most):
    model = load_model(fixtures_root / "odinnext")
    fp32 = {n: m.weight.numel() * 4 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    embed = model.model.embeddings.weight
    before = model.weight_bytes()
    report = quantize_model(model, mode)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    held = {n: m.packed.nbytes + m.scales.nbytes for n, m in layers.items()}
    # Each linear holds a quarter (int8 + a bf16 scale a row) or an eighth (int4 + scale/zero a group) of fp32.
    for n in fp32:
        if n in held:
            assert held[n] <= most * fp32[n], n
    # The tied embedding's lookup: in int8 the head's own int8 rows plus a 4-bit residual, in int4 its own int8 rows.
    lookup = model.model.embeddings
    assert isinstance(lookup, QuantEmbedding) and lookup.weight.numel() == 0 and lookup.weight.dtype == embed.dtype
    shared = lookup.packed is model.quant_head.packed and lookup.scales is model.quant_head.scales
    assert shared == (mode == "int8") == (lookup.residual is not None)
    extra = lookup.residual.nbytes if shared else lookup.packed.nbytes + lookup.scales.nbytes
    assert extra <= 0.26 * embed.nbytes  # a nibble or a byte a value against fp32's four, plus the row scales
    # The memory report's figure: the float linears and the float embedding are gone, the packed bytes (tied
    # head copy and lookup table included) counted once each.
    assert report.layers[quant.HEAD].startswith(mode) and "quant_head" in layers
    freed = sum(fp32[n] for n in held if n in fp32) + embed.nbytes
    assert model.weight_bytes() == before - freed + sum(held.values()) + extra


@torch.inference_mode()
def test_embedding_lookup_reads_the_rows_within_a_sixteenth_of_a_step(fixtures_root):
    model = load_model(fixtures_root / "genesis")
    w = model.tok_emb.weight.detach().clone()
    quantize_model(model, "int8")
    ids = torch.tensor([[0, 5, w.shape[0] - 1], [7, 7, 3]])
    step = w.abs().amax(1) / 127
    got = model.tok_emb(ids)
    assert got.dtype == w.dtype and got.shape == (2, 3, w.shape[1])
    # 1/32 of a grid step from the residual (1/16 where the 4 bits clamp at a row's extreme value), plus the
    # bf16 rounding of the row's scale (2^-8 relative).
    bound = step[ids, None] * (1 / 16 + 2 ** -7) + 2 ** -8 * w[ids].abs() + 1e-7
    assert ((got - w[ids]).abs() <= bound).all()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_a_quantized_tied_model_holds_fewer_bytes_than_bf16(mode):
    from chatapp.catalog import get_entry
    from chatapp.engine.runtime import load_engine

    entry = get_entry("axiom-tiny")
    bf16 = load_engine(entry, device="cpu", dtype="bfloat16").memory().weights
    quantized = load_engine(entry, device="cpu", dtype="bfloat16", quantize=mode)
    assert not any(isinstance(m, nn.Embedding) for m in quantized.model.modules())
    # Byte counts (exact): axiom-tiny's weights are mostly its tied 100k-row embedding, two bytes a value in
    # bf16. int8: a byte for the shared table plus the lookup's nibble; int4: the head's half byte plus the
    # lookup's own byte; scales and the small linears on top. Before the lookup was quantized both held more
    # than bf16 (the bf16 table stayed beside the head's packed copy).
    assert quantized.memory().weights <= 0.8 * bf16


@pytest.mark.parametrize("bad,match", [(dict(mode="int3"), "unknown quantization"),
                                       (dict(mode="int4", group_size=48), "group size")])
def test_bad_requests_say_what_to_do(bad, match):
    with pytest.raises(QuantError, match=match):
        quantize_model(nn.Sequential(nn.Linear(64, 64)), **bad)


def test_load_engine_quantizes_from_the_argument_or_the_catalog_default():
    from dataclasses import replace

    from chatapp.catalog import get_entry
    from chatapp.contract import SamplingSettings
    from chatapp.engine.runtime import load_engine

    entry = get_entry("axiom-tiny")
    plain = load_engine(entry, device="cpu", dtype="float32")
    engine = load_engine(replace(entry, quantize="int8"), device="cpu", dtype="float32")  # the catalog's default
    assert engine.info()["quantize"] == "int8" and plain.info()["quantize"] == "none"
    assert engine.model.quant_report.layers[quant.HEAD].startswith("int8")
    assert engine.memory().weights == engine.model.weight_bytes() != plain.memory().weights
    events = list(engine.generate([1, 2, 3], SamplingSettings(temperature=0, max_new_tokens=4)))
    assert sum(1 for e in events if hasattr(e, "token_id")) == 4
    assert load_engine(replace(entry, quantize="int8"), device="cpu", quantize="none").info()["quantize"] == "none"


def test_quantize_choice_errors_say_what_to_do():
    from chatapp.catalog import get_entry
    from chatapp.engine.loader import LoadError
    from chatapp.engine.runtime import _quantization

    entry = get_entry("axiom-tiny")
    with pytest.raises(LoadError, match="one of none, int8, int4"):
        _quantization(entry, "int2", torch.device("cpu"))
    with pytest.raises(LoadError, match="--device cpu"):
        _quantization(entry, "int4", torch.device("cuda"))
    assert _quantization(entry, None, torch.device("cuda")) == "none"


class _Untied(nn.Module):
    vocab_size = 300

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(300, 64)
        self.lm_head = nn.Linear(64, 300, bias=False)

    def forward(self, ids):
        return quant.project_head(self, self.embed(ids), self.lm_head.weight)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@torch.inference_mode()
def test_an_untied_embedding_gets_its_own_int8_rows(mode):
    torch.manual_seed(0)
    model = _Untied()
    w = model.embed.weight.detach().clone()
    report = quantize_model(model, mode)
    lookup = model.embed
    assert isinstance(lookup, QuantEmbedding) and lookup.packed is not model.quant_head.packed
    assert lookup.packed.dtype == torch.int8 and (lookup.residual is not None) == (mode == "int8")
    assert report.layers["embed"].startswith("int8 rows") and model.lm_head.weight.numel() == 0
    ids = torch.tensor([[1, 299, 42]])
    step = w.abs().amax(1) / 127
    room = (1 / 16 if mode == "int8" else 1 / 2) + 2 ** -7  # the residual's 1/16 step at most, or int8's half
    assert ((lookup(ids)[0] - w[ids[0]]).abs() <= step[ids[0], None] * room + 1e-6).all()
    assert model(ids).shape == (1, 3, 300)


@torch.inference_mode()
def test_byrne_bf16_releases_its_float_head_copy(fixtures_root):
    d = fixtures_root / "byrne"
    ids = load_file(str(d / "golden.safetensors"))["input_ids"]
    model = load_model(d, dtype=torch.bfloat16)
    assert model._head is not None  # the bf16 copy of the fp32 tied embedding (the engram reads fp32)
    quantize_model(model, "int8")
    assert model._head is None and torch.isfinite(_logits(model, ids)).all()


@pytest.mark.parametrize("rows", [1, 2, 5, 40])
def test_int8_widths_off_sixteen_give_the_product_on_any_rows(rows):
    # torch 2.13's AVX-512 int8 kernel crashed the process on a width of 200 with 2 or more rows.
    torch.manual_seed(rows)
    lin = nn.Linear(200, 48, bias=False)
    model = nn.Sequential(lin)
    w = lin.weight.detach().clone()
    quantize_model(model, "int8")
    q = model[0]
    x = torch.randn(rows, 200)
    want = x.double() @ (q.packed.double() * q.scales.double()[:, None]).t()
    got = model(x)
    assert got.shape == (rows, 48)
    assert (got.double() - want).abs().max() <= 2 ** -7 * want.abs().max() + 1e-3
    assert (got.double() - x.double() @ w.double().t()).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("product", ["gemv-avx512vnni", "gemv-avx2-q8"])
@pytest.mark.parametrize("name", FIXTURES)
def test_int8_x_int8_decode_stays_near_the_int8_quality(fixture_models, name, product, mode):
    """The byte products (cpu_gemv: x rounded to int8, in blocks of 32 for int8 weights as llama.cpp's Q8_0 does,
    in spans of 128 for our int4 nibbles; VNNI, or AVX2 alone) add their own rounding to the weights', and the
    kernel choice takes them by speed where the CPU has them. One token at a time over each golden prompt, the
    logits stay within 1.6x the distance from fp32 of the same quantized weights multiplied by x as given through
    aten's kernels (measured 1.1-1.5x for int8 when this was written, 0.6-1.01x for int4, whose weight error is
    larger), and agree on the top token as often, less one position."""
    from chatapp.engine import cpu_gemv
    from tests.engine.test_kernels import _prefill_then_decode

    mdtype = torch.int8 if mode == "int8" else cpu_gemv.INT4
    if product not in cpu_gemv.products(mdtype):
        pytest.skip(f"this machine (or its kernel family) has no {product} (or no C++ compiler)")
    d, ids = fixture_models(name)
    steps = ids.shape[1] - 1  # a one-token prefill, then one-token steps: every position through the product
    ref = _prefill_then_decode(load_model(d, kernels="reference"), ids, torch.float32, steps)
    got = {}
    ours = f"{'row' if mode == 'int8' else 'nibbles'}/{product}/linear"
    for path in (ours, "row/linear/linear"):
        model = load_model(d, quantize=mode, kernels={"dtype": "float32", "widening": path, "narrowing": path})
        layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.mode == mode]
        assert layers and {m.gemv for m in layers} == {cpu_gemv.PRODUCTS.get(path.split("/")[1], -1)}
        assert {m.layout for m in layers} == {"nibbles" if path.startswith("nibbles") else "aten"}
        got[path] = _prefill_then_decode(model, ids, torch.float32, steps)
    vnni, exact = got[ours], got["row/linear/linear"]
    assert not torch.equal(vnni, exact)
    assert float((vnni - ref).norm()) <= 1.6 * float((exact - ref).norm())
    agree = [int((v.argmax(-1) == ref.argmax(-1)).sum()) for v in (vnni, exact)]
    assert agree[0] >= agree[1] - 1
