"""Huginn's memory: KV bytes against spec §5's formulas for each strategy, growth in blocks, the real
tensor inventory on meta, and a sharded F32 checkpoint loaded with a bounded peak."""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

from chatapp.engine.arch.huginn_cache import BLOCK, CacheStrategy, HuginnState
from chatapp.engine.loader import LoadError, build_model, check_inventory, load_model

SMALL = dict(model_type="huginn_raven", n_embd=64, n_heads=4, intermediate_size=96, vocab_size=128,
             block_size=512, mean_recurrence=8)


def spec_slots(strategy: str, r: int) -> int:
    """Spec §5: 4r + 4 slots for full; compress-sN 4 + N; compress-rN 4 + ceil(4r / N); the anchor keeps
    8 iterations plus one shared: 4 + min(4r, 36)."""
    if strategy.startswith("compress-s") or "-compress-s" in strategy:
        return 4 + min(4 * r, int(strategy.rsplit("s", 1)[1]))
    if "compress-r" in strategy:
        n = int(strategy.rsplit("r", 1)[1])
        return 4 + -(-4 * r // n)
    if "anchor" in strategy:
        return 4 + min(4 * r, 36)
    return 4 * r + 4


@pytest.mark.parametrize("strategy", ["full", "latest-m4-compress-s16", "compress-r4", "compress-anchor"])
def test_kv_bytes_follow_the_spec_formula_at_several_lengths_and_steps(strategy):
    torch.manual_seed(0)
    model = build_model(SMALL, device="cpu").eval()
    a = model.args
    per_slot_token = 2 * a.n_kv_heads * a.head_dim * 4  # K and V, fp32
    for steps in (1, 5, 12):
        controls = {"num_steps": steps, "cache_strategy": strategy, "state_init": "zero"}
        state = model.make_state(a.block_size, "cpu", torch.float32)
        fed = 0
        for t in (1, 200, 100):  # lengths 1, 201 and 301: one block, then two
            with torch.inference_mode():
                model(torch.randint(0, 128, (1, t)), state, last_only=True, controls=controls)
            fed += t
            b = state.bytes()
            slots = spec_slots(strategy, steps)
            assert b.used["kv"] == slots * fed * per_slot_token, (steps, fed)
            assert b.allocated["kv"] == slots * (-(-fed // BLOCK) * BLOCK) * per_slot_token
            assert len(state.slots) == slots
            report = state.kv_report()
            assert report["prelude"] == report["coda"] == 2 * report["total"] // slots


def test_real_size_bytes_per_token_match_the_spec():
    # Spec §5, bf16: 2,787,840 B/token at 32 steps, 5,491,200 at 64, 422,400 under compress-s16.
    for strategy, steps, want in (("full", 32, 2_787_840), ("full", 64, 5_491_200), ("compress-s16", 32, 422_400)):
        state = HuginnState(8, 55, 96, 5280, "cpu", torch.bfloat16, block=1)
        s = CacheStrategy.parse(strategy)
        k = torch.zeros(1, 1, 55, 96, dtype=torch.bfloat16)
        state.begin(torch.zeros(1, 1, dtype=torch.long), s)
        for slot in (0, 1, *range(2, 2 + 4 * steps), -1, -2):
            state.attend_kv(slot, k, k)
        state.finish()
        b = state.bytes()
        assert b.used["kv"] == b.allocated["kv"] == want


def test_the_cache_grows_in_blocks_and_gives_memory_back():
    torch.manual_seed(0)
    model = build_model(SMALL, device="cpu").eval()
    controls = {"num_steps": 3, "state_init": "zero"}
    state = model.make_state(512, "cpu", torch.float32)
    with torch.inference_mode():
        model(torch.randint(0, 128, (1, 10)), state, controls=controls)
        one_block = state.bytes().allocated["kv"]
        model(torch.randint(0, 128, (1, 250)), state, controls=controls)
        assert state.bytes().allocated["kv"] == 2 * one_block
        snap = state.snapshot()
        state.trim(100)
        assert state.bytes().allocated["kv"] == 2 * one_block
        slot_token = 2 * 4 * 16 * 4  # K and V of 4 heads x 16, fp32
        assert state.bytes().used["kv"] == 16 * 100 * slot_token  # 3 steps: 16 slots
        state.reset()
        assert state.bytes().allocated.get("kv", 0) == 0 and state.length == 0
        state.restore(snap)
        assert state.length == 260 and state.bytes().used["kv"] == 16 * 260 * slot_token
    # Nothing is preallocated for the context limit: a fresh state holds no KV at all.
    assert model.make_state(512, "cpu", torch.float32).bytes().allocated.get("kv", 0) == 0


def _real_inventory(fixtures_root):
    path = fixtures_root / "huginn" / "real_tensors.json"
    if not path.exists():
        pytest.skip("real_tensors.json absent")
    tensors = json.loads(path.read_text())["tensors"]
    return {k: torch.empty(v["shape"], dtype=torch.float32, device="meta") for k, v in tensors.items()}


def test_the_real_inventory_loads_on_meta(fixtures_root):
    weights = _real_inventory(fixtures_root)
    assert len(weights) == 77 and "freqs_cis" in weights and "lm_head.weight" in weights
    model = build_model({"model_type": "huginn_raven"})
    model.load_state_dict(check_inventory(model, weights), strict=True, assign=True)
    a = model.args
    assert (a.n_embd, a.n_heads, a.head_dim, a.intermediate_size, a.padded_vocab_size) == (5280, 55, 96, 17920, 65536)
    # 3.91B on the card counts the second embedding copy (spec §1).
    n = sum(p.numel() for p in model.parameters())
    assert n == 3_564_976_800 and n + 65536 * 5280 == 3_911_006_880
    assert model.lm_head is None and model.max_context == 4096
    # Our own state_dict (what the demo maker saves) passes unchanged: sanitize is idempotent.
    again = build_model({"model_type": "huginn_raven"})
    assert set(check_inventory(again, dict(model.state_dict()))) == set(model.state_dict())


def test_inventory_errors_name_the_tensor(fixtures_root):
    weights = _real_inventory(fixtures_root)
    del weights["transformer.core_block.2.attn.qk_bias"]
    with pytest.raises(LoadError, match="core_block.2.attn.qk_bias"):
        check_inventory(build_model({"model_type": "huginn_raven"}), weights)
    weights = _real_inventory(fixtures_root)
    weights["transformer.adapter.bias"] = torch.empty(5280, device="meta")
    with pytest.raises(LoadError, match="adapter.bias"):
        check_inventory(build_model({"model_type": "huginn_raven"}), weights)


def test_a_head_that_differs_from_the_embedding_is_kept_untied(fixtures_root, tmp_path):
    fx = fixtures_root / "huginn"
    if not fx.is_dir():
        pytest.skip("huginn fixture absent")
    from safetensors.torch import load_file

    weights = load_file(str(fx / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * 2
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((fx / "config.json").read_text())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = load_model(tmp_path, "cpu", torch.float32)
    assert any("untied" in str(w.message) for w in seen)
    assert torch.equal(model.lm_head.weight, weights["lm_head.weight"])


PROBE = r"""
import sys, torch
torch.set_num_threads(1)
from chatapp.engine import cpu_gemv, loader
from chatapp.engine.loader import build_model, load_model, read_config

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

# Import-time, first-module and extension-build costs are not the checkpoint's: pay them before the baseline.
build_model(read_config(sys.argv[1]))
cpu_gemv.load()
base = status("VmRSS")
phases = {}
prepare = loader.prepare_for_inference

def measured_prepare(*args, **kwargs):
    # The peak of reading the shards, then the peak of the kernel race on top of the loaded weights, apart
    # (writing 5 to clear_refs restarts VmHWM).
    phases["read"], phases["loaded"] = status("VmHWM") - base, status("VmRSS") - base
    open("/proc/self/clear_refs", "w").write("5")
    return prepare(*args, **kwargs)

loader.prepare_for_inference = measured_prepare
model = load_model(sys.argv[1], "cpu", sys.argv[2])
# fp32 weights may still be pages of the mapped file: touch them all so the peak counts them.
total = sum(float(p.sum()) for p in model.parameters())  # a reduction: no copy of p
phases["prepared"] = status("VmHWM") - base
print(max(phases["read"], phases["prepared"]), sum(p.numel() * p.element_size() for p in model.parameters()),
      phases["read"], phases["loaded"], phases["prepared"])
"""


def test_a_sharded_f32_checkpoint_loads_without_two_copies_in_memory(tmp_path):
    # The real layout at 1/100 of the bytes: F32, the embedding stored twice, the RoPE table, shards named
    # by an index. A 3.5B model (15.6 GB F32) must load on a 24 GB machine.
    cfg = dict(model_type="huginn_raven", n_embd=512, n_heads=8, intermediate_size=1536, vocab_size=8192,
               block_size=256)
    shapes = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    tensors["lm_head.weight"] = tensors["transformer.wte.weight"].clone()
    tensors["freqs_cis"] = torch.zeros(1, 256, 1, 32, 2)
    f32 = sum(t.numel() * 4 for t in tensors.values())
    names, n_shards, weight_map = sorted(tensors), 8, {}
    for i in range(n_shards):
        fn = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: tensors[k] for k in names[i::n_shards]}, str(tmp_path / fn))
        weight_map.update({k: fn for k in names[i::n_shards]})
    del tensors
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    for dtype, bound in (("bfloat16", 0.8), ("float32", 1.35)):
        out = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path), dtype], capture_output=True, text=True,
                             check=True)
        peak, weights, *phases = map(int, out.stdout.split())
        # bf16: the weights (half the file) plus one F32 tensor and one mapped shard at a time; two full
        # bf16 copies would already be 1.0x the file. fp32: two copies would be 2x.
        assert weights < peak < bound * f32, (dtype, "peak / file while reading, loaded, after the race:",
                                              [round(b / f32, 3) for b in phases])
