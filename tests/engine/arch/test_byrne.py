"""Byrne-86M (SpikeWhaleLM) against its stand-in fixture, naive oracles for its parts, its state and inventory.

fixtures/byrne was made by a card/partial-code stand-in, not the reference (spec §10): it pins the quoted
parts (attention, XSA, QK-norm, RoPE slice, HRM, wiring, tying) and one consistent reading of the guessed
ones (the `OPTIONS` defaults). The oracles below are written from the spec's formulas, loop by loop.
"""
from __future__ import annotations

from functools import partial

import itertools
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chatapp.engine.arch import spike_whale
from chatapp.engine.arch.spike_whale_parts import HyperConnection
from chatapp.engine.generate import prefill
from chatapp.engine.loader import LoadError, build_model, check_inventory, load_model
from chatapp.engine.state import ContextFull
from chatapp.engine.verify import verify

from ..conftest import demo_engine
from ..closeness import assert_close

FIXTURE = "byrne"

# The real config.json (spec §2.1, Escarda-86M-Base; Byrne has use_jepa false).
REAL = dict(model_type="spike_whale", vocab_size=16512, hidden_size=640, num_hidden_layers=16, max_position_embeddings=4096,
            rms_norm_eps=1e-6, tie_word_embeddings=True, num_attention_heads=10, num_key_value_heads=1, head_dim=64,
            nope_head_dim=48, qk_rope_head_dim=16, q_lora_rank=128, o_lora_rank=128, rope_theta=10000.0, use_qk_norm=True,
            use_xsa=True, use_derf=False, use_engram=True, engram_table_size=4096, engram_max_ngram=3, engram_num_heads=2,
            engram_compress_dim=32, engram_gate_init_bias=-1.0, use_hyper_connections=True, hc_mult=2,
            hc_sinkhorn_iters=20, hc_eps=1e-6, use_hrm_refine=True, hrm_refine_dim=128, hrm_refine_steps=1,
            use_jepa=False, use_moe=False, moe_layers=[], moe_intermediate_size=2000, num_hash_layers=2)
TINY = dict(model_type="spike_whale", vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=1, head_dim=16, nope_head_dim=12, qk_rope_head_dim=4, q_lora_rank=24, o_lora_rank=24,
            max_position_embeddings=64, moe_intermediate_size=80, engram_table_size=64, engram_compress_dim=8,
            hrm_refine_dim=16)


@pytest.fixture(scope="module")
def model(fx):
    return load_model(fx, "cpu", torch.float32)


# Tolerance of this file's model-level comparisons unless a test states its own.
close = partial(assert_close, atol=2e-4)


def tiny_model(dtype=torch.float32, seed=0, **over):
    torch.manual_seed(seed)
    m = build_model({**TINY, **over}, device="cpu")
    with torch.no_grad():
        # Non-trivial mixes and gates: nn init leaves them at exact zeros.
        for name, p in m.named_parameters():
            if "logits" in name or name.endswith(("hrm_refine.gate", "hc_out_mix.weight", ".base", ".scale")):
                p.normal_(0.0, 0.5)
            elif name.endswith(".fn"):
                p.normal_(0.0, 0.1)
    return m.to(dtype).eval()


def test_verify_passes_on_the_fixture(fx):
    report = verify(fx)
    assert report.ok, "\n".join(report.lines())
    assert report.greedy_ids_match and [c.name for c in report.comparisons] == ["logits"]


def test_the_engram_look_back_is_part_of_the_state(model, golden):
    ids = golden[0]["input_ids"]
    state = model.make_state(40, "cpu", torch.float32)
    with torch.inference_mode():
        full = model(ids)
        model(ids[:, :20], state)
        window = state[-1]
        # It holds the compressed embeddings of the last two tokens...
        comp = model.model.engram.compressor(model.model.embed_tokens(ids[:, 18:20]))
        # (a 2-row projection against rows of a 20-row forward: other kernels, so a dtype tolerance)
        assert_close(window.tail, comp, what="engram look-back")
        snap = state.snapshot()
        step = model(ids[:, 20:21], state)
        close(step[0, -1], full[0, 20], atol=2e-5)
        # ...and the next step depends on it: with it cleared the logits move.
        state.restore(snap)
        window.tail.zero_()
        assert (model(ids[:, 20:21], state)[0, -1] - full[0, 20]).abs().max() > 1e-2


def test_snapshot_restore_replays_the_same_step(model, golden):
    ids = golden[0]["input_ids"]
    state = model.make_state(40, "cpu", torch.float32)
    with torch.inference_mode():
        model(ids[:, :20], state)
        snap = state.snapshot()
        first = model(ids[:, 20:22], state)
        state.restore(snap)
        again = model(ids[:, 20:22], state)
    assert torch.equal(first, again) and state.length == 22


def _real_inventory(fixtures_root):
    path = fixtures_root / "byrne" / "real_tensors.json"
    if not path.exists():
        pytest.skip("real_tensors.json absent")
    return {k: torch.empty(v["shape"], dtype=torch.float32, device="meta")
            for k, v in json.loads(path.read_text())["tensors"].items()}


@pytest.mark.parametrize("variant", ["as-listed", "embed-only", "lm_head-only", "with-rotary-buffers"])
def test_real_inventory_loads_on_meta(fixtures_root, variant):
    weights = _real_inventory(fixtures_root)
    if variant == "embed-only":
        del weights["lm_head.weight"]
    elif variant == "lm_head-only":
        weights["lm_head.weight"] = weights.pop("model.embed_tokens.weight")
    elif variant == "with-rotary-buffers":
        weights["model.layers.3.attn.rotary_emb.inv_freq"] = torch.empty(8, device="meta")
        weights["model.layers.3.attn.rotary_emb.cos_cached"] = torch.empty(4096, 16, device="meta")
    model = build_model(REAL)
    model.load_state_dict(check_inventory(model, weights), strict=True, assign=True)
    assert model.lm_head is None
    # The stand-in's 100,732,164 minus the stored head copy (16512 x 640) and the MTP head (640 x 640).
    assert sum(p.numel() for p in model.parameters()) == 100_732_164 - 16512 * 640 - 640 * 640
    # Idempotent: our own state_dict (what the demo maker saves) goes through sanitize unchanged.
    again = build_model(REAL)
    assert set(check_inventory(again, dict(model.state_dict()))) == set(model.state_dict())


def test_the_ffn_width_comes_from_the_checkpoint(fixtures_root):
    # config.json has no intermediate_size (spec §2.1): a config saying 2048 still loads the 2000-wide tensors.
    model = build_model({**REAL, "moe_intermediate_size": 2048})
    check_inventory(model, _real_inventory(fixtures_root))
    assert model.args.ffn_width == 2000
    assert model.model.layers[15].ffn.gate_up_proj.weight.shape == (4000, 640)


def test_inventory_errors_name_the_tensor(fixtures_root):
    weights = _real_inventory(fixtures_root)
    del weights["model.engram.tables.weight"]
    with pytest.raises(LoadError, match="engram.tables.weight"):
        check_inventory(build_model(REAL), dict(weights))
    weights = _real_inventory(fixtures_root)
    weights["model.layers.2.attn.derf_alpha"] = torch.empty(1, device="meta")
    with pytest.raises(LoadError, match="derf_alpha"):
        check_inventory(build_model(REAL), weights)
    weights = _real_inventory(fixtures_root)
    weights["model.layers.2.attn.q_norm.weight"] = torch.empty(128, device="meta")
    with pytest.raises(LoadError, match="q_norm"):
        check_inventory(build_model(REAL), weights)


def test_unsupported_config_switches_are_refused():
    for key in ("use_derf", "use_moe", "use_value_embed"):
        with pytest.raises(LoadError, match=key):
            build_model({**TINY, key: True})
    with pytest.raises(LoadError, match="rope_layout"):
        build_model(TINY, {"rope_layout": "sideways"})


def test_a_head_that_differs_from_the_embedding_is_used_untied(fx, golden, tmp_path):
    with safe_open(str(fx / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["lm_head.weight"] = tensors["lm_head.weight"] * 2.0
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((fx / "config.json").read_text())
    with pytest.warns(UserWarning, match="untied"):
        m = load_model(tmp_path, "cpu", torch.float32)
    with torch.inference_mode():
        logits = m(golden[0]["input_ids"])
    # The final projection is linear in the head: doubling it doubles the logits.
    close(logits, 2.0 * golden[0]["logits"], atol=5e-4)
    # In bf16 the untied head (read as fp32 beside the engram inputs) follows the model dtype.
    with pytest.warns(UserWarning, match="untied"):
        m16 = load_model(tmp_path, "cpu", torch.bfloat16)
    assert m16.lm_head.weight.dtype == torch.bfloat16
    with torch.inference_mode():
        assert (m16(golden[0]["input_ids"]).argmax(-1) == logits.argmax(-1)).float().mean() > 0.9


def _spec_bytes(layers: int, tokens: int, itemsize: int) -> dict[str, int]:
    """Spec §5: k and v of one 64-dim head per layer and token, plus the engram look-back (2 x 32 fp32)."""
    return {"kv": layers * 2 * 64 * itemsize * tokens, "conv": 2 * 32 * 4}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_real_state_allocation_matches_the_spec(dtype):
    model = build_model(REAL)  # the real shapes, on meta
    state = model.make_state(4096, "cpu", dtype)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    assert state.bytes().allocated == _spec_bytes(16, 4096, itemsize)
    assert sum(b.untyped_storage().nbytes() for s in state for b in s.buffers()) == sum(_spec_bytes(16, 4096, itemsize).values())
    if dtype == torch.float32:
        # The spec's headline: 8,192 B per token, 32 MiB at the 4,096-token context.
        assert state.bytes().allocated["kv"] == 8192 * 4096 == 32 * 2 ** 20


def test_used_bytes_follow_the_formula_while_the_model_runs():
    # Real head geometry on two layers and a small vocabulary, run to 10, 1,000 and 2,000 tokens.
    torch.manual_seed(0)
    model = build_model({**REAL, "vocab_size": 300, "num_hidden_layers": 2}, device="cpu").eval()
    state = model.make_state(4096, "cpu", torch.float32)
    ptrs = [b.data_ptr() for s in state for b in s.buffers()]
    ids = torch.randint(0, 300, (1, 2001), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for target in (10, 1000, 2000):
            # The Engine's chunked prefill, from what the state holds up to `target` tokens.
            logits = prefill(model, state, ids[0, state.length:target].tolist(), "cpu")
            assert torch.isfinite(logits).all()
            assert state.bytes().used == _spec_bytes(2, target, 4), f"at {target} tokens"
            assert state.bytes().allocated == _spec_bytes(2, 4096, 4)
        model(ids[:, 2000:2001], state)
        assert state.bytes().used["kv"] == _spec_bytes(2, 2001, 4)["kv"]
    assert [b.data_ptr() for s in state for b in s.buffers()] == ptrs


def test_the_context_limit_is_max_position_embeddings():
    model = tiny_model()
    assert model.max_context == 64 and build_model(REAL).max_context == 4096
    state = model.make_state(model.max_context, "cpu", torch.float32)
    with torch.inference_mode():
        model(torch.zeros(1, 64, dtype=torch.long), state)
        with pytest.raises(ContextFull):
            model(torch.zeros(1, 1, dtype=torch.long), state)


def test_every_reading_option_changes_the_logits_and_only_the_default_fits_the_fixture(model, golden):
    ids = golden[0]["input_ids"]
    base = dict(model.args.__dict__)
    try:
        for name, values in spike_whale.OPTIONS.items():
            assert base[name] == values[0], f"{name}: the fixture's reading must be the default"
            for value in values[1:]:
                if name == "hc_form":
                    with pytest.raises(ValueError, match="inventory"):
                        model.set_options(hc_form=value)
                    continue
                model.set_options(**{name: value})
                with torch.inference_mode():
                    err = (model(ids) - golden[0]["logits"]).abs().max().item()
                model.set_options(**{name: values[0]})
                assert err > 1e-2, f"{name}={value!r} leaves the logits unchanged"
        with torch.inference_mode():
            close(model(ids), golden[0]["logits"])
    finally:
        model.set_options(**{k: base[k] for k in spike_whale.OPTIONS if k != "hc_form"})


def _engram_naive(mod, x: torch.Tensor, a) -> torch.Tensor:
    """Spec §4.7, one position and one lookup at a time. x [T, H] from position 0."""
    t_len = x.shape[0]
    heads, orders = a.engram_num_heads, range(2, a.engram_max_ngram + 1)
    lookups = ([(g, m) for g in range(heads) for m in orders] if a.engram_lookup_layout == "head_major"
               else [(g, m) for m in orders for g in range(heads)])
    comp = x @ mod.compressor.weight.T
    bits = mod.proj.shape[2]
    e = torch.zeros_like(x)
    for t in range(t_len):
        for l, (_, m) in enumerate(lookups):
            bucket = 0
            if t >= m - 1:
                code = torch.zeros(bits)
                for k in range(m):
                    src = t - k if a.engram_key_order == "newest_first" else t - m + 1 + k
                    code += mod.proj[l, k] @ comp[src]
                for j in range(bits):
                    if code[j] > 0:
                        bucket += 2 ** (j if a.engram_bit_order == "lsb_first" else bits - 1 - j)
            e[t] += mod.tables.weight[l * a.engram_table_size + bucket]
    if a.engram_reduce == "mean":
        e /= len(lookups)
    z = torch.cat([x, e], -1) @ mod.gate.weight.T + mod.gate.bias
    g = torch.sigmoid(z) if a.engram_gate == "sigmoid" else 0.5 * (1 + torch.erf(z))
    return g * (e @ mod.out_proj.weight.T)


@pytest.mark.parametrize("reading", list(itertools.product(("newest_first", "oldest_first"), ("head_major", "order_major"),
                                                           ("lsb_first", "msb_first"))), ids=str)
def test_engram_matches_a_naive_loop_whole_and_in_pieces(reading):
    opts = dict(zip(("engram_key_order", "engram_lookup_layout", "engram_bit_order"), reading))
    model = tiny_model(**opts)
    mod, a = model.model.engram, model.args
    x = torch.randn(1, 11, a.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ref = _engram_naive(mod, x[0], a)
        close(mod(x, None, 0)[0], ref, atol=1e-5)
        # Through the look-back window: 1 + 1 + 9 tokens give the same as one pass.
        window = model.make_state(16, "cpu", torch.float32)[-1]
        parts = [mod(x[:, i:j], window, i) for i, j in ((0, 1), (1, 2), (2, 11))]
        close(torch.cat(parts, 1)[0], ref, atol=1e-5)
    for name, value in (("engram_reduce", "sum"), ("engram_gate", "erf")):
        model.set_options(**{name: value})
        with torch.inference_mode():
            close(mod(x, None, 0)[0], _engram_naive(mod, x[0], a), atol=1e-5)


def test_dynamic_hyper_connection_matches_the_mhc_formula_token_by_token():
    a = spike_whale.ModelArgs.from_config({**TINY, "hc_mult": 3}, hc_form="dynamic")
    torch.manual_seed(4)
    hc = HyperConnection(a)
    with torch.no_grad():
        hc.fn.normal_(0.0, 0.2), hc.base.normal_(0.0, 1.0), hc.scale.normal_(1.0, 0.3)
    n, h = 3, a.hidden_size
    streams = torch.randn(n, 2, 5, h)  # stream-major [n, B, T, H]
    y = torch.randn(2, 5, h)
    with torch.inference_mode():
        x, ctx = hc.pre_op(streams)
        out = hc.post_op(streams, y, ctx)
    for b, t in itertools.product(range(2), range(5)):
        flat = streams[:, b, t].reshape(-1)
        mix = (hc.fn @ flat) / math.sqrt(flat.square().mean() + a.rms_norm_eps)
        pre = torch.sigmoid(mix[:n] * hc.scale[0] + hc.base[:n]) + a.hc_eps
        post = 2 * torch.sigmoid(mix[n:2 * n] * hc.scale[1] + hc.base[n:2 * n])
        comb = torch.softmax((mix[2 * n:] * hc.scale[2] + hc.base[2 * n:]).view(n, n), -1) + a.hc_eps
        comb = comb / (comb.sum(0) + a.hc_eps)
        for _ in range(a.hc_sinkhorn_iters - 1):
            comb = comb / (comb.sum(1, keepdim=True) + a.hc_eps)
            comb = comb / (comb.sum(0) + a.hc_eps)
        close(x[b, t], sum(pre[s] * streams[s, b, t] for s in range(n)), atol=1e-5)
        for j in range(n):
            close(out[j, b, t], post[j] * y[b, t] + sum(comb[i, j] * streams[i, b, t] for i in range(n)), atol=1e-5)


def test_the_dynamic_form_names_its_own_tensors():
    names = set(build_model({**TINY, "num_hidden_layers": 1}, {"hc_form": "dynamic"}).state_dict())
    assert {"model.layers.0.hc_attn.fn", "model.layers.0.hc_attn.base", "model.layers.0.hc_ffn.scale"} <= names
    assert not any("logits" in k for k in names)


def test_cpu_fp32_load_stores_widening_matrices_column_major(fx, model):
    # The fixture's logits (checked above) come from this layout; the shapes never change.
    ffn, attn = model.model.layers[0].ffn, model.model.layers[0].attn
    assert ffn.gate_up_proj.weight.stride() == (1, 192) and ffn.gate_up_proj.weight.shape == (192, 64)
    assert model.model.embed_tokens.weight.stride() == (1, 512) and attn.q_b_proj.weight.stride() == (1, 64)
    assert ffn.down_proj.weight.is_contiguous() and attn.qkv_a_proj.weight.is_contiguous()
    # bf16 GEMV is faster row-major: a bf16 load keeps every matrix as stored.
    m16 = load_model(fx, "cpu", torch.bfloat16)
    assert all(p.is_contiguous() for p in m16.parameters())


def test_a_bf16_load_keeps_the_engram_inputs_in_fp32(fx, golden):
    m16 = load_model(fx, "cpu", torch.bfloat16)
    m32 = load_model(fx, "cpu", torch.float32)
    assert m16.model.embed_tokens.weight.dtype == m16.model.engram.proj.dtype == torch.float32
    assert m16.model.layers[0].attn.qkv_a_proj.weight.dtype == torch.bfloat16
    ids = golden[0]["input_ids"]
    with torch.inference_mode():
        # Same buckets, so the same engram output as the fp32 model, bit for bit.
        e16 = m16.model.engram(m16.model.embed_tokens(ids), None, 0)
        e32 = m32.model.engram(m32.model.embed_tokens(ids), None, 0)
        assert torch.equal(e16, e32)
        logits = m16(ids)
    assert (logits.argmax(-1) == golden[0]["logits"].argmax(-1)).float().mean() > 0.9


def test_demo_entry_streams_through_the_engine():
    engine = demo_engine("byrne-tiny")  # the demo checkpoint and Engine the CLI uses
    ids = engine.tokenizer.render([{"role": "user", "content": "hi"}], system="Be brief.")
    assert ids[0] == 260 and engine.tokenizer.stop_ids == (261, 259)
    settings = engine.default_settings().with_overrides(seed=3, max_new_tokens=12)
    events = list(engine.generate(ids, settings))
    done = events[-1]
    assert done.new_tokens == len(events) - 1 and done.stop_reason in ("max_tokens", "eos")
    mem = engine.memory()
    a = engine.model.args
    assert mem.used["kv"] == engine.state.length * a.num_hidden_layers * 2 * a.head_dim * 4
    assert mem.allocated["conv"] == mem.used["conv"] == 2 * a.engram_compress_dim * 4
    # Regenerate: the look-back window cannot trim, so the prompt snapshot is restored and reused.
    again = list(engine.generate(ids, settings))
    assert again[-1].reused_tokens == len(ids)
    assert [e.token_id for e in again[:-1]] == [e.token_id for e in events[:-1]]


@pytest.mark.gpu
def test_fixture_on_cuda_in_bf16_keeps_the_greedy_path(fx, golden):
    m = load_model(fx, "cuda", torch.bfloat16)
    ids = golden[0]["input_ids"].cuda()
    with torch.inference_mode():
        logits = m(ids).cpu()
        state = m.make_state(40, "cuda", torch.bfloat16)
        steps = torch.cat([m(ids[:, :12], state)] + [m(ids[:, i:i + 1], state) for i in range(12, 24)], 1).cpu()
    scale = golden[0]["logits"].abs().max().item()
    close(logits, golden[0]["logits"], atol=0.05 * scale, rtol=0)
    close(steps, logits, atol=0.05 * scale, rtol=0)
