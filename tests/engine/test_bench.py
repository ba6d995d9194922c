"""`smollchat bench` on a demo model with --quick: the record has every figure the issue asks for, with
consistent values (never timing thresholds: this machine is shared)."""
import json

import pytest
import torch

from chatapp.catalog import load_catalog
from chatapp.cli import main
from chatapp.engine.bench import BenchOptions, bytes_per_token, random_model, run
from chatapp.engine.loader import build_model

FIELDS = {"model", "dtype", "quantize", "threads", "cpu", "load_s", "peak_rss_bytes", "peak_rss_before_quantize_bytes",
          "weight_bytes", "weight_bytes_per_token", "prefill", "decode_tok_s", "decode_tok_s_all", "decode_cpu_share",
          "step_ms", "model_ms", "outside_model_ms", "outside_model_cpu_ms", "state", "dram_read_gbs", "gemv_gbs",
          "roofline_fraction", "compile", "peers"}


def test_the_gemv_figure_runs_the_product_the_kernel_choice_took(monkeypatch):
    # Our one-row product at its level (float, int8 and int4 weights), or PyTorch's; each call multiplies the matrix.
    from chatapp.engine import bench, cpu_gemv
    from chatapp.engine.kernels import KernelChoice, MatrixPath

    if not cpu_gemv.products(torch.bfloat16):
        pytest.skip(f"no one-row product of ours here: {cpu_gemv.error() or 'no AVX2'}")
    seen = []
    for op in ("gemv", "gemv_int8", "gemv_int4"):
        real = getattr(torch.ops.smollchat_cpu, op)
        monkeypatch.setattr(torch.ops.smollchat_cpu, op, lambda *a, _r=real, _op=op: seen.append((_op, a[-1])) or _r(*a))
    name = cpu_gemv.products(torch.bfloat16)[0]
    model = torch.nn.Module()
    model.kernel_choice = KernelChoice("bfloat16", MatrixPath("row", name, "linear"), MatrixPath(), "measured")
    assert bench.gemv_product(model, None) == (name, "")
    assert bench.gemv_gbs(torch.bfloat16, 1, repeats=2, product=name) > 0
    assert seen == [("gemv", cpu_gemv.PRODUCTS[name])] * 3
    seen.clear()
    assert bench.gemv_gbs(torch.bfloat16, 1, repeats=2, product="gemv-avx2", quant="int8") > 0
    assert seen == [("gemv_int8", 1)] * 3
    seen.clear()
    assert bench.gemv_gbs(torch.bfloat16, 1, repeats=2, product="gemv-avx2-q8", quant="int4") > 0
    assert seen == [("gemv_int4", 4)] * 3
    seen.clear()
    assert bench.gemv_gbs(torch.bfloat16, 1, repeats=2, product="linear", quant="int4") > 0 and seen == []
    model.kernel_choice = KernelChoice("bfloat16", MatrixPath("column"), MatrixPath(), "measured")
    assert bench.gemv_product(model, "int8") == ("linear", "int8")
    assert bench.gemv_gbs(torch.bfloat16, 1, repeats=2, product="linear") > 0 and seen == []


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_quick_record_has_every_figure(tmp_path, capsys, quantize):
    out = tmp_path / "rec.json"
    assert main(["bench", "axiom-tiny", "--quick", "--threads", "1", "--quantize", quantize, "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert FIELDS <= set(rec)
    assert rec["model"] == "axiom-tiny" and rec["quantize"] == quantize and rec["threads"] == 1
    assert rec["cpu"]["model"] and rec["cpu"]["aten_cpu_capability"] and isinstance(rec["cpu"]["flags"], list)
    assert [p["tokens"] for p in rec["prefill"]] == [16, 32]
    assert all(p["tok_s"] > 0 and p["ttft_s"] > 0 for p in rec["prefill"])
    assert rec["decode_tok_s"] > 0 and rec["outside_model_ms"] >= 0 and rec["dram_read_gbs"] > 0
    assert rec["peak_rss_bytes"] >= rec["peak_rss_before_quantize_bytes"] > 0
    # Axiom's KV grows by a fixed amount a token: the line through the two prefill points starts at 0.
    st = rec["state"]
    assert st["used_bytes"]["0"] == 0 and st["used_bytes"]["full"] == st["per_token_bytes"] * st["context"]
    assert st["allocated_bytes"] == st["used_bytes"]["full"]
    assert rec["roofline_fraction"] == pytest.approx(
        rec["decode_tok_s"] * rec["weight_bytes_per_token"] / (rec["dram_read_gbs"] * 1e9), rel=0.02, abs=2e-3)
    if quantize == "int8":
        assert rec["quant_report"].startswith("int8")
    # The demo takes PyTorch's products (it is too small to measure a kernel choice): the GEMV figure says so.
    assert rec["gemv_product"] == ("aten int8" if quantize == "int8" else f"F.linear {rec['dtype']}") and rec["gemv_gbs"] > 0
    assert "decode" in capsys.readouterr().out


def test_bytes_per_token_counts_a_float_tied_head_once():
    entry = load_catalog()["axiom-tiny"]
    import torch

    model, _ = random_model(entry, torch.float32)
    total = model.weight_bytes()
    assert bytes_per_token(model) == total  # the tied embedding is the head: read whole every token
    from chatapp.engine.quant import quantize_model
    quantize_model(model, "int8")
    # The int8 head (its table shared with the lookup) is read whole; the lookup's residual is only gathered.
    assert bytes_per_token(model) == model.weight_bytes() - model.embed.residual.nbytes


def test_every_real_entry_carries_a_bench_config_that_builds():
    for e in load_catalog().values():
        if not e.demo:
            model = build_model(e.bench_config, e.options)  # meta device: shapes only
            assert sum(p.numel() for p in model.parameters()) > 10 * e.params // 11, e.id


def test_an_entry_without_bench_config_is_a_clear_error():
    from dataclasses import replace

    entry = replace(load_catalog()["axiom"], bench_config={})
    with pytest.raises(ValueError, match=r"\[bench_config\]"):
        run(entry, BenchOptions(quick=True))


def test_huginn_s_core_block_counts_once_per_recurrence_step(tmp_path):
    # Huginn reads its core block num_steps times a token: the bytes a token reads (and the roofline) say so,
    # and --control sets the depth for the whole run, recorded in the record.
    import torch

    entry = load_catalog()["huginn-tiny"]
    model, _ = random_model(entry, torch.float32)
    core = sum(p.numel() * p.element_size() for p in model.transformer.core_block.parameters())
    one, four = bytes_per_token(model, {"num_steps": 1}), bytes_per_token(model, {"num_steps": 4})
    assert four - one == 3 * core and one == bytes_per_token(model, None) - (entry_steps(model) - 1) * core
    out = tmp_path / "rec.json"
    assert main(["bench", "huginn-tiny", "--quick", "--threads", "1", "--control", "num_steps=4",
                 "--json", str(out)]) == 0
    rec = json.loads(out.read_text())
    assert rec["controls"]["num_steps"] == 4
    assert rec["weight_bytes_per_token"] == bytes_per_token(model.to(getattr(torch, rec["dtype"])), {"num_steps": 4})


def entry_steps(model) -> int:
    """The architecture's default recurrence depth (the controls' default when none are given)."""
    return int(model._controls(None)["num_steps"])


def test_a_peer_interleaved_with_ours_is_compared_with_those_runs(monkeypatch, capsys):
    """A peer that ran between extra decode runs of ours (llama.cpp) is compared with the median of those runs,
    not with our runs of minutes earlier; the others with ours."""
    from chatapp.catalog import get_entry
    from chatapp.engine import bench

    seen = {}

    def peers(run, say):
        seen["ours"] = [run.ours_decode() for _ in range(3)]
        return {"interleaved": {"decode_tok_s": 10.0, "ours_interleaved_tok_s": [20.0, 30.0, 40.0], "impl": "x",
                                "also": {"Q8_0": {"decode_tok_s": 60.0, "ours_interleaved_tok_s": [20.0, 30.0, 40.0]}}},
                "plain": {"decode_tok_s": 2.0, "impl": "y"}, "absent": "not installed"}
    monkeypatch.setattr(bench, "run_peers", peers)
    monkeypatch.setattr(bench, "dram_read_gbs", lambda mib: 10.0)
    monkeypatch.setattr(bench, "gemv_gbs", lambda dtype, mib, **how: 10.0)
    rec = run(get_entry("axiom-tiny"), BenchOptions(threads=1, compile="off"))
    assert len(seen["ours"]) == 3 and all(t > 0 for t in seen["ours"])  # real decode runs of the loaded model
    assert rec["peers"]["interleaved"]["ours_over_peer"] == 3.0
    assert rec["peers"]["interleaved"]["also"]["Q8_0"]["ours_over_peer"] == 0.5
    assert rec["peers"]["plain"]["ours_over_peer"] == pytest.approx(rec["decode_tok_s"] / 2.0, rel=1e-3)
