"""The per-machine kernel choice (engine/kernels.py): the measurement picks whatever its clock says is fastest,
is remembered per machine (a changed ATEN_CPU_CAPABILITY is another machine), and every path it can pick
gives the reference path's logits within the dtype's tolerance on every golden fixture."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from chatapp import locations
from chatapp.catalog import get_entry
from chatapp.engine import cpu_gemv, decisions, kernels
from chatapp.engine.kernels import MatrixPath
from chatapp.engine.layers import CpuLinear, PackedLinear, packed_available
from chatapp.engine.loader import LoadError, load_model
from chatapp.engine.runtime import load_engine
from tests.engine.arch.test_huginn import ZERO
from tests.engine.closeness import assert_close, dtype_tolerance

SHAPES = {"widening": (96, 32), "narrowing": (32, 80)}


def forced(fastest: dict[str, str], calls: list | None = None):
    """A clock under which, per case prefix ("widening decode", ...), the path named there takes 1 ms and any
    other 2 ms; `calls` collects (case, path) of every timed call. Nothing is run."""
    def timer(case, path, fn):
        if calls is not None:
            calls.append((case, str(path)))
        want = next((v for k, v in fastest.items() if case.startswith(k)), None)
        return 0.001 if str(path) == want else 0.002
    return timer


@pytest.mark.parametrize("widening, narrowing", [("row/linear/linear", "column/linear/linear"),
                                                 ("column/linear/linear", "row/linear/linear")])
def test_fp32_measurement_picks_the_forced_fastest_layout(widening, narrowing):
    chosen, timings = kernels.measure(SHAPES, torch.float32, forced({"widening decode": widening,
                                                                    "narrowing decode": narrowing}))
    assert (str(chosen["widening"]), str(chosen["narrowing"])) == (widening, narrowing)
    assert set(timings) == {"widening decode 96x32", "narrowing decode 32x80"}  # fp32 has no product to choose


@pytest.mark.parametrize("decode", ["row/linear/linear", "column/linear/linear", "row/tiles/tiles"])
@pytest.mark.parametrize("prefill", ["linear", "tiles"])
def test_bf16_measurement_picks_the_forced_decode_then_prefill_path(decode, prefill):
    layout, product, _ = decode.split("/")
    want = f"{layout}/{product}/{prefill}"
    chosen, _ = kernels.measure(SHAPES, torch.bfloat16, forced({"widening decode": decode, "narrowing decode": decode,
                                                                "widening prefill": want, "narrowing prefill": want}))
    assert str(chosen["widening"]) == str(chosen["narrowing"]) == want


def test_a_path_three_times_slower_is_timed_once():
    calls = []

    def timer(case, path, fn):
        calls.append(str(path))
        return 0.001 if str(path) == "row/linear/linear" else 0.01
    chosen, timings = kernels.measure({"widening": (96, 32)}, torch.float32, timer)
    assert str(chosen["widening"]) == "row/linear/linear"
    others = {str(p) for p in kernels.candidates(torch.float32, "decode")} - {"row/linear/linear"}
    assert others and all(calls.count(p) == 1 for p in others) and calls.count("row/linear/linear") == kernels.ROUNDS
    assert list(timings["widening decode 96x32"]) == ["row/linear/linear"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_prepacked_weights_are_a_candidate_only_where_this_machine_has_them(dtype, monkeypatch):
    if not packed_available(dtype):
        assert kernels.PACKED not in kernels.candidates(dtype, "decode")
        pytest.skip(f"this torch and CPU do not prepack {dtype} weights")
    calls = []
    fastest = {"widening decode": "packed/packed/packed", "narrowing decode": "packed/packed/packed"}
    chosen, timings = kernels.measure(SHAPES, dtype, forced(fastest, calls))
    assert str(chosen["widening"]) == str(chosen["narrowing"]) == "packed/packed/packed"
    assert not any("prefill" in case for case, _ in calls)  # a packed weight has one product
    monkeypatch.setattr(kernels, "packed_available", lambda dtype: False)
    assert kernels.PACKED not in kernels.candidates(dtype, "decode")
    chosen, _ = kernels.measure(SHAPES, dtype, forced(fastest))
    assert "packed" not in str(chosen["widening"]) + str(chosen["narrowing"])


def test_busy_calls_do_not_count_and_a_busy_load_records_nothing(fixtures_root, monkeypatch):
    # A call the machine was too busy to time (NaN) is no evidence: the path with clean calls wins even though
    # its spoilt calls were slow; with no clean call at all the load takes the default and records nothing.
    def timer(case, path, fn):
        return 0.002 if str(path) == "row/linear/linear" else float("nan")
    chosen, timings = kernels.measure({"widening": (96, 32)}, torch.float32, timer)
    assert str(chosen["widening"]) == "row/linear/linear" and list(timings["widening decode 96x32"]) == ["row/linear/linear"]
    chosen, _ = kernels.measure({"widening": (96, 32)}, torch.float32, lambda case, path, fn: float("nan"))
    assert chosen == {}
    monkeypatch.setattr(kernels, "MIN_MEASURE_BYTES", 0)
    monkeypatch.setattr(kernels, "wall_timer", lambda case, path, fn: float("nan"))
    model = load_model(fixtures_root / "axiom", dtype="float32")
    assert model.kernel_choice.source == "default (machine busy)"
    assert model.kernel_choice.paths == kernels.default(torch.float32).paths
    assert not (locations.cache_dir() / "kernels.json").exists()


def test_the_timer_spoils_a_call_that_lacked_cpu(monkeypatch):
    # decisions.timed: a call whose threads waited for a CPU over a quarter of (wall x threads) reads NaN, one
    # that did not reads its wall time, however little CPU time it used (a single-threaded kernel on 2 threads).
    # Where no run delay is readable, CPU time judges. Forced clocks: 10 ms of wall time on 2 threads.
    monkeypatch.setattr(decisions.torch, "get_num_threads", lambda: 2)
    cases = [((0.010, 0.008), True), ((0.010, 0.001), False), ((0.004, None), True), ((0.019, None), False)]
    for (cpu, waited), want_nan in cases:
        walls = iter([1.0, 1.010])
        clocks = iter([(5.0, None if waited is None else 2.0), (5.0 + cpu, None if waited is None else 2.0 + waited)])
        got = decisions.timed(lambda: None, walls.__next__, clocks.__next__)
        assert math.isnan(got) == want_nan and (want_nan or abs(got - 0.010) < 1e-12), (cpu, waited)


def test_run_delay_is_read_where_linux_keeps_it():
    waited = decisions.run_delay_s()
    if waited is None:
        pytest.skip("this kernel keeps no schedstat")
    assert waited >= 0 and decisions.run_delay_s() >= waited


def test_the_real_clock_times_real_products():
    # The default timer runs the candidates (tiny matrices: microseconds) and returns positive medians.
    chosen, timings = kernels.measure({"narrowing": (16, 48)}, torch.bfloat16)
    assert chosen["narrowing"].layout in kernels.LAYOUTS
    assert all(ms > 0 for case in timings.values() for ms in case.values())


def test_each_timed_call_first_flushes_the_cache_and_the_buffer_goes_with_the_measurement(monkeypatch):
    # The real clock reads a buffer of twice the last-level cache (within half the measurement's memory) before
    # each timed call, so a pool that fits the cache is timed from memory; the buffer is dropped at the end.
    seen = []

    def clock(fn):
        buf = kernels._flush.get("buf")
        seen.append(None if buf is None else buf.numel() * buf.element_size())
        fn()
        return 1e-3
    monkeypatch.setattr(kernels, "timed", clock)
    chosen, _ = kernels.measure({"narrowing": (16, 48)}, torch.bfloat16)
    want = min(2 * kernels.last_level_cache_bytes(), kernels.FLUSH_MAX_BYTES, kernels.POOL_BYTES) // 8 * 8
    assert chosen and seen and set(seen) == {want}
    assert kernels._flush == {}
    # Within the measurement's memory: a small model's budget bounds the buffer, its half at most.
    seen.clear()
    kernels.measure({"narrowing": (16, 48)}, torch.bfloat16, memory=2 * 2**20)
    assert set(seen) == {2**20}
    kernels.flush_cache()  # outside a measurement: no buffer is made (it would stay)
    assert kernels._flush == {}


def test_the_last_level_cache_size_is_read_from_sysfs(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "1024K"), ("index3", "32768K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert kernels.last_level_cache_bytes(str(tmp_path / "index*" / "size")) == 32 * 2**20
    (tmp_path / "index3" / "size").write_text("96M\n")
    assert kernels.last_level_cache_bytes(str(tmp_path / "index*" / "size")) == 96 * 2**20
    assert kernels.last_level_cache_bytes(str(tmp_path / "none" / "size")) == 32 * 2**20


@pytest.fixture
def measured_small(monkeypatch):
    """Every model is big enough to measure, under a forced clock that prefers column-major fp32 matrices."""
    monkeypatch.setattr(kernels, "MIN_MEASURE_BYTES", 0)
    calls = []
    monkeypatch.setattr(kernels, "wall_timer", forced({"widening decode": "column/linear/linear",
                                                       "narrowing decode": "column/linear/linear"}, calls))
    return calls


def test_a_measured_choice_is_recorded_and_reused(measured_small, fixtures_root):
    model = load_model(fixtures_root / "axiom", dtype="float32")
    assert model.kernel_choice.source == "measured"
    assert str(model.kernel_choice.widening) == str(model.kernel_choice.narrowing) == "column/linear/linear"
    assert model.layers[0].ffn.w2.weight.stride() == (1, model.layers[0].ffn.w2.weight.shape[0])  # narrowing moved
    record = json.loads((locations.cache_dir() / "kernels.json").read_text())
    (key, value), = ((k, v) for k, v in record.items() if "|attention|" not in k)
    assert key.startswith(decisions.machine_key(torch.device("cpu"))) and value["widening"] == "column/linear/linear"
    # The decode attention is measured and recorded beside it where this machine has ours (SDPA wins a tie).
    assert [v["attention"] for k, v in record.items() if "|attention|" in k] == ["sdpa"] * bool(
        cpu_gemv.attention_products())
    n = len(measured_small)
    again = load_model(fixtures_root / "axiom", dtype="float32")
    assert again.kernel_choice.source == "cached" and again.kernel_choice.paths == model.kernel_choice.paths
    assert len(measured_small) == n  # nothing timed the second time


def test_a_record_over_other_candidates_or_taken_another_way_is_measured_again(measured_small, fixtures_root):
    # A product added since (or one that became runnable) must be raced, a record taken before the cache was
    # flushed for each timed call may have timed cached reads, and one taken with other code of our kernels raced
    # other products: each way the next load measures again.
    assert load_model(fixtures_root / "axiom", dtype="float32").kernel_choice.source == "measured"
    book = kernels._decisions()
    key = next(k for k in book.read() if "|float32|" in k and "|attention|" not in k)
    assert book.get(key)["method"] == f"{kernels.METHOD}+{cpu_gemv.digest()}"
    # (the last: our kernels' code changed since the record)
    for change in ({"candidates": ["row/linear/linear"]}, {"method": None}, {"method": f"{kernels.METHOD}+0123456789ab"}):
        book.record(key, {**book.get(key), **change})
        assert load_model(fixtures_root / "axiom", dtype="float32").kernel_choice.source == "measured"
        assert load_model(fixtures_root / "axiom", dtype="float32").kernel_choice.source == "cached"


def test_measure_replaces_what_the_machine_had_cached(measured_small, fixtures_root, monkeypatch):
    # `smollchat bench --remeasure`: a choice cached while the machine was busy is measured again and replaced.
    first = load_model(fixtures_root / "axiom", dtype="float32")
    assert str(first.kernel_choice.widening) == "column/linear/linear"
    monkeypatch.setattr(kernels, "wall_timer", forced({"widening decode": "row/linear/linear",
                                                       "narrowing decode": "row/linear/linear"}))
    assert load_model(fixtures_root / "axiom", dtype="float32").kernel_choice.source == "cached"
    again = load_model(fixtures_root / "axiom", dtype="float32", kernels="measure")
    assert again.kernel_choice.source == "measured" and str(again.kernel_choice.widening) == "row/linear/linear"
    later = load_model(fixtures_root / "axiom", dtype="float32")
    assert later.kernel_choice.source == "cached" and str(later.kernel_choice.widening) == "row/linear/linear"


def test_another_aten_cpu_capability_is_another_machine(measured_small, fixtures_root, monkeypatch):
    cpu = torch.device("cpu")
    before = kernels.decision_key(cpu, torch.float32, SHAPES)
    load_model(fixtures_root / "axiom", dtype="float32")
    n = len(measured_small)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert kernels.decision_key(cpu, torch.float32, SHAPES) != before
    assert load_model(fixtures_root / "axiom", dtype="float32").kernel_choice.source == "measured"
    assert len(measured_small) > n
    assert len([k for k in json.loads((locations.cache_dir() / "kernels.json").read_text()) if "|attention|" not in k]) == 2


def test_threads_and_dtype_are_part_of_the_key(monkeypatch):
    cpu = torch.device("cpu")
    key = kernels.decision_key(cpu, torch.float32, SHAPES)
    assert kernels.decision_key(cpu, torch.bfloat16, SHAPES) != key
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        assert kernels.decision_key(cpu, torch.float32, SHAPES) != key
    finally:
        torch.set_num_threads(before)


def test_small_models_take_the_default_and_eager_the_reference(fixtures_root, monkeypatch):
    fp32 = load_model(fixtures_root / "byrne", dtype="float32")
    assert fp32.kernel_choice == kernels.default(torch.float32) and fp32.kernel_choice.source == "default"
    ref = load_model(fixtures_root / "byrne", dtype="float32", kernels="reference")
    assert ref.kernel_choice.label == "widening row/linear/linear, narrowing row/linear/linear (reference)"
    assert all(p.is_contiguous() for p in ref.parameters())
    assert all(type(m) is torch.nn.Linear for m in ref.modules() if isinstance(m, torch.nn.Linear))
    monkeypatch.setattr(kernels, "cpu_has_native_bf16", lambda: True)
    assert str(kernels.default(torch.bfloat16).widening) == "row/linear/linear"


def test_a_recorded_choice_is_forced_and_checked(fixtures_root):
    rec = {"dtype": "bfloat16", "widening": "row/tiles/tiles", "narrowing": "column/linear/linear", "source": "measured"}
    model = load_model(fixtures_root / "axiom", dtype="bfloat16", kernels=rec)
    assert model.kernel_choice.source == "recorded" and model.kernel_choice.as_dict()["widening"] == "row/tiles/tiles"
    w13, w2 = model.layers[0].ffn.w13, model.layers[0].ffn.w2
    assert type(w13) is CpuLinear and w13.decode_tiles and w13.prefill_tiles and w13.weight.is_contiguous()
    assert type(w2) is torch.nn.Linear and not w2.weight.is_contiguous()
    assert model.head_product.keywords == {"decode_tiles": True, "prefill_tiles": True, "gemv": -1}  # the tied head widens
    with pytest.raises(LoadError, match="made for bfloat16, the model is float32"):
        load_model(fixtures_root / "axiom", dtype="float32", kernels=rec)
    with pytest.raises(LoadError, match="layout/decode/prefill"):
        load_model(fixtures_root / "axiom", dtype="bfloat16", kernels={**rec, "widening": "row"})
    with pytest.raises(ValueError, match="unknown matrix path"):
        MatrixPath.parse("diagonal/linear/linear")
    with pytest.raises(ValueError, match="one product"):
        MatrixPath.parse("packed/linear/packed")


def test_a_recorded_packed_choice_packs_and_falls_back_where_unavailable(fixtures_root, monkeypatch):
    rec = {"dtype": "float32", "widening": "packed/packed/packed", "narrowing": "row/linear/linear", "source": "measured"}
    if not packed_available(torch.float32):
        pytest.skip("this torch and CPU do not prepack float32 weights")
    model = load_model(fixtures_root / "axiom", dtype="float32", kernels=rec)
    w13, w2 = model.layers[0].ffn.w13, model.layers[0].ffn.w2
    assert type(w13) is PackedLinear and w13.weight.is_mkldnn and w13.weight.shape == (w13.out_features, w13.in_features)
    assert type(w2) is torch.nn.Linear and not w2.weight.is_mkldnn
    assert not model.embed.weight.is_mkldnn  # the tied head is the embedding table: never packed
    monkeypatch.setattr(kernels, "packed_available", lambda dtype: False)
    model = load_model(fixtures_root / "axiom", dtype="float32", kernels=rec)
    assert model.kernel_choice.as_dict()["widening"] == "row/linear/linear"
    assert "prepacked weights unavailable here" in model.kernel_choice.source
    assert not any(isinstance(m, PackedLinear) for m in model.modules())


def test_the_engine_reports_its_choice():
    engine = load_engine(get_entry("axiom-tiny"), device="cpu", dtype="float32", compile="off")
    assert engine.info()["kernels"] == {"dtype": "float32", "widening": "column/linear/linear",
                                        "narrowing": "row/linear/linear", "source": "default", "attention": "sdpa"}
    eager = load_engine(get_entry("axiom-tiny"), device="cpu", dtype="float32", compile="off", kernels="reference")
    assert eager.info()["kernels"]["source"] == "reference"


def paths(dtype: torch.dtype) -> list[str]:
    """Every non-reference path this machine can take for `dtype` (asked inside a test: the GEMV is built under
    the test's own cache folder)."""
    if dtype == torch.float32:
        out = ["column/linear/linear"] + [f"row/{g}/linear" for g in cpu_gemv.products(dtype)]
    else:
        out = ["row/tiles/tiles", "column/linear/linear", "row/linear/tiles"]
        out += [f"row/{g}/tiles" for g in cpu_gemv.products(dtype)]
    return out + ["packed/packed/packed"] * packed_available(dtype)


def _prefill_then_decode(model, ids: torch.Tensor, dtype: torch.dtype, decoded: int = 4) -> torch.Tensor:
    """Logits of a prefill of all but the last `decoded` ids (many-row products) and of one-token steps."""
    controls = ZERO if "huginn" in type(model).__module__ else None
    state = model.make_state(ids.shape[1], "cpu", dtype)
    with torch.inference_mode():
        out = [model.infer(ids[:, :-decoded], state, controls).logits]
        out += [model.infer(ids[:, i:i + 1], state, controls).logits for i in range(ids.shape[1] - decoded, ids.shape[1])]
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("arch", ["axiom", "byrne", "genesis", "odinnext", "huginn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_path_gives_the_reference_logits(fixtures_root, arch, dtype):
    d = fixtures_root / arch
    if not d.is_dir():
        pytest.skip(f"no {arch} fixture")
    ids = load_file(str(d / "golden.safetensors"))["input_ids"]
    ref = _prefill_then_decode(load_model(d, dtype=dtype, kernels="reference"), ids, dtype)
    name = str(dtype).removeprefix("torch.")
    forced = [{"dtype": name, "widening": path, "narrowing": path} for path in paths(dtype)]
    # Our decode attention (csrc/attention.cpp), on the reference's matrices.
    forced += [{"dtype": name, "widening": "row/linear/linear", "narrowing": "row/linear/linear", "attention": a}
               for a in cpu_gemv.attention_products()]
    for rec in forced:
        path = rec.get("attention", rec["widening"])
        model = load_model(d, dtype=dtype, kernels=rec)
        got = _prefill_then_decode(model, ids, dtype)
        assert_close(got, ref, dtype=dtype, what=f"{arch} {name} {path}")
        # The greedy choice agrees wherever the reference's top two are further apart than the tolerance.
        top2 = ref.float().topk(2, dim=-1).values
        rel = dtype_tolerance(dtype)
        clear = (top2[..., 0] - top2[..., 1]) > 2 * (rel + rel * ref.float().abs().max().item())
        assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear]), f"{arch} {name} {path}"



def test_only_file_mapped_pages_are_released_and_the_values_stay(tmp_path):
    import sys

    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"w": torch.randn(512, 256)}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt", device="cpu") as f:
        w = f.get_tensor("w")
    ref = w.clone()
    assert kernels.release_mapped(w) == sys.platform.startswith("linux")
    assert torch.equal(w, ref)  # dropped pages of a file read back as the file's bytes
    anon = torch.randn(512, 256)
    kept = anon.clone()
    assert not kernels.release_mapped(anon) and torch.equal(anon, kept)


@pytest.mark.parametrize("mdtype", ["int8", "int4"])
def test_a_quantized_class_on_our_product_unpacks_past_the_rows_measured_here(mdtype):
    """Where a quantized class's one-row product is ours, the race goes on to the row count at which unpacking its
    weights to bf16 for F.linear starts to beat the class's own many-row product (here, by a clock under which that
    happens at 64 rows: the path says unpack32), stops there, and the layers take that crossing."""
    from chatapp.engine.quant import QuantLinear

    dtype = torch.int8 if mdtype == "int8" else cpu_gemv.INT4
    ours = cpu_gemv.products(dtype)
    if not ours:
        pytest.skip("no product of ours for these weights here (no C++ compiler, or no AVX2)")
    layout = "row" if mdtype == "int8" else "nibbles"
    calls = []

    def timer(case, path, fn):
        calls.append(case)
        if " decode " in case:
            return 0.001 if str(path) == f"{layout}/{ours[0]}/linear" else 0.002
        rows = int(case.split(" prefill ")[1].split()[0])
        return 0.001 if path == ("unpack" if rows >= 64 else "own") else 0.002
    chosen, timings = kernels.measure({"widening": (256, 128)}, dtype, timer)
    path = chosen["widening"]
    assert str(path) == f"{layout}/{ours[0]}/unpack32" and kernels.unpack_rows(path) == 32
    assert [c for c in timings if "prefill" in c] == [f"widening prefill {n} rows, own product or unpacked"
                                                      for n in (8, 16, 32, 64)]
    # The layers of a model take it: 33 rows and more unpack.
    layer = QuantLinear("int8", 128, 256, torch.ones(256, 128, dtype=torch.int8), torch.ones(256, dtype=torch.bfloat16))
    model = torch.nn.Sequential(layer)
    kernels.apply_quantized(model, kernels.KernelChoice("float32", path, path, "test"))
    assert layer.unpack_rows == 32


def test_an_unpacking_crossing_is_a_path_of_our_quantized_products_only():
    assert kernels.MatrixPath.parse("row/gemv-avx2/unpack16").prefill == "unpack16"
    assert kernels.unpack_rows(kernels.MatrixPath.parse("nibbles/gemv-avx2-q8/unpack64")) == 64
    assert kernels.unpack_rows(kernels.MatrixPath()) is None
    for text in ("row/linear/unpack16", "row/gemv-avx2/unpackx", "packed/packed/unpack8"):
        with pytest.raises(ValueError):
            kernels.MatrixPath.parse(text)
