"""Genesis against the reference's golden fixture, its storage variants, its state and memory formulas.

fixtures/genesis was made by running genesis-llm 2.0.3 (spec §7): `logits` and the cached greedy path are
the generation semantics (TTT off); `logits_ttt` is the reference's scoring forward with the TTT head.
"""
from __future__ import annotations

from functools import partial

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from chatapp.engine.arch import genesis
from chatapp.engine.generate import prefill
from chatapp.engine.loader import (LoadError, build_model, check_inventory, load_model, read_config,
                                   prepare_for_inference)
from chatapp.engine.state import ContextFull
from chatapp.engine.verify import verify

from ..conftest import demo_engine
from ..closeness import assert_close

FIXTURE = "genesis"

# Real head geometry (spec §1.1) on fewer layers and a small vocabulary: cheap to run 2,000 tokens through.
REAL_HEADS = dict(model_type="genesis", n_embd=576, n_head=9, n_kv_head=3, block_size=2048, gla_expand_k=0.75,
                  gla_expand_v=1.5, ttt_rank=4, use_mup=True, use_selective_activation=True, selective_k_ratio=0.85)
TINY = dict(model_type="genesis", vocab_size=97, n_embd=48, n_layer=4, block_size=64, n_head=4, n_kv_head=2,
            gla_expand_k=0.75, gla_expand_v=1.5, ttt_rank=2, use_mup=True, selective_k_ratio=0.85)


@pytest.fixture(scope="module")
def model(fx):
    return load_model(fx, "cpu", torch.float32)


# Tolerance of this file's model-level comparisons unless a test states its own.
close = partial(assert_close, atol=1e-3)


def tiny_model(dtype=torch.float32, **over):
    torch.manual_seed(0)
    return build_model({**TINY, **over}, device="cpu").to(dtype).eval()


def test_verify_passes_on_the_fixture(fx):
    report = verify(fx)
    assert report.ok, "\n".join(report.lines())
    assert report.greedy_ids_match
    assert {c.name for c in report.comparisons} == {"logits", "greedy_step_logits"}


def test_ttt_scoring_mode_reproduces_logits_ttt(model, golden):
    tensors, meta = golden
    with torch.inference_mode():
        got = model(tensors["input_ids"], ttt=True)
    close(got, tensors["logits_ttt"], atol=meta["suggested_tolerance"]["logits_ttt_atol"])
    # The head really changes the logits: plain logits must not also match logits_ttt.
    assert (tensors["logits_ttt"] - tensors["logits"]).abs().max() > 0.1


def test_ttt_scoring_mode_is_non_causal_and_refuses_a_state(model, golden):
    ids = golden[0]["input_ids"]
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % model.args.vocab_size
    with torch.inference_mode():
        a, b = model(ids, ttt=True), model(changed, ttt=True)
        plain_a, plain_b = model(ids), model(changed)
    # Changing the last token moves the first position's TTT logits (sequence-mean confidence)...
    assert (a[0, 0] - b[0, 0]).abs().max() > 0
    # ...but never the causal generation logits (exact: same shapes and kernels, and every masked
    # term the changed token meets is an exact zero).
    assert torch.equal(plain_a[0, :-1], plain_b[0, :-1])
    with pytest.raises(ValueError, match="non-causal"):
        model(ids, model.make_state(32, "cpu", torch.float32), ttt=True)


def test_snapshot_restore_replays_the_same_step(model, golden):
    ids = golden[0]["input_ids"]
    state = model.make_state(40, "cpu", torch.float32)
    with torch.inference_mode():
        model(ids[:, :20], state)
        snap = state.snapshot()
        first = model(ids[:, 20:22], state)
        state.restore(snap)
        again = model(ids[:, 20:22], state)
    assert torch.equal(first, again)


def test_layer_schedule_and_derived_shapes_of_the_real_config():
    a = genesis.ModelArgs.from_config({})  # no metadata: the genesis_147m preset
    assert a.n_layer == 30 and a.n_embd == 576 and a.use_mup and not a.use_selective_activation
    assert a.fox_layers == (3, 7, 11, 15, 19, 23, 27)
    assert (a.dk, a.dv, a.rotary_dim, a.head_dim, a.intermediate_size) == (48, 96, 24, 64, 1440)
    # Missing metadata keys take GenesisConfig's dataclass defaults, not the preset.
    b = genesis.ModelArgs.from_config({"n_embd": 64, "n_head": 4, "n_kv_head": 2, "n_layer": 2})
    assert (b.use_mup, b.use_selective_activation, b.ffn_keep, b.ttt_rank) == (False, True, 80, 8)
    with pytest.raises(ValueError, match="use_fox_pro"):
        genesis.ModelArgs.from_config({"use_fox_pro": False})


def _real_inventory(fixtures_root):
    path = fixtures_root / "genesis" / "real_tensors.json"
    if not path.exists():
        pytest.skip("real_tensors.json absent")
    dtypes = {"F32": torch.float32, "I64": torch.int64}
    return {k: torch.empty(v["shape"], dtype=dtypes[v["dtype"]], device="meta")
            for k, v in json.loads(path.read_text())["tensors"].items()}


@pytest.mark.parametrize("variant", ["as-listed", "tok_emb-only", "lm_head-only"])
def test_real_inventory_loads_on_meta(fixtures_root, variant):
    weights = _real_inventory(fixtures_root)
    if variant != "as-listed":
        weights = {k: v for k, v in weights.items() if ".rope." not in k and "evolution" not in k}
        dropped = weights.pop("lm_head.weight" if variant == "tok_emb-only" else "tok_emb.weight")
        if variant == "lm_head-only":
            weights["lm_head.weight"] = dropped
    # The metadata of the real file is unseen: the preset says vocab 50304, the tensors say 50279.
    model = build_model({"model_type": "genesis"})
    model.load_state_dict(check_inventory(model, weights), strict=True, assign=True)
    assert model.args.vocab_size == 50279 and model.tok_emb.weight.shape == (50279, 576)
    # Params minus the ones inference never reads (b_proj x23, TTT q/k/v, reflection): spec §2's 151,757,837.
    unused = 23 * (9 * 576 + 9) + 3 * 576 * 576 + 576 * 1152
    assert sum(p.numel() for p in model.parameters()) + unused == 151_757_837
    # Idempotent: our own state_dict goes through sanitize unchanged.
    again = build_model({"model_type": "genesis"})
    assert set(check_inventory(again, dict(model.state_dict()))) == set(model.state_dict())


def test_inventory_errors_name_the_tensor(fixtures_root):
    weights = _real_inventory(fixtures_root)
    weights["blocks.5.attn.A_log"] = torch.empty(8, device="meta")
    with pytest.raises(LoadError, match="A_log"):
        check_inventory(build_model({"model_type": "genesis"}), dict(weights))
    del weights["blocks.5.attn.A_log"]
    with pytest.raises(LoadError, match="A_log"):
        check_inventory(build_model({"model_type": "genesis"}), weights)


def test_storage_variants_load_to_the_same_logits(fx, golden, tmp_path):
    # lm_head stored instead of tok_emb, RoPE/TTT buffers saved too, and metadata whose vocab disagrees.
    with safe_open(str(fx / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = json.loads(meta["genesis_config_json"])
    cfg["vocab_size"] = 50304
    tensors["lm_head.weight"] = tensors.pop("tok_emb.weight")
    tensors["blocks.0.attn.rope.inv_freq"] = torch.ones(3)
    tensors["blocks.0.attn.rope.cos_cached"] = torch.ones(1, 1, 4096, 6)
    tensors["metacognition.evolution_history"] = torch.zeros(100)
    tensors["metacognition.evolution_idx"] = torch.tensor(7)
    d = tmp_path / "variant"
    d.mkdir()
    save_file(tensors, str(d / "genesis_152m_instruct.safetensors"),
              metadata={"genesis_config_json": json.dumps(cfg), "format": "pt"})
    assert read_config(d)["model_type"] == "genesis"
    m = load_model(d, "cpu", torch.float32)
    assert m.args.vocab_size == 320
    with torch.inference_mode():
        close(m(golden[0]["input_ids"]), golden[0]["logits"])


def test_a_file_without_metadata_reads_as_the_preset(fx, tmp_path):
    d = tmp_path / "nometa"
    d.mkdir()
    shutil.copy(fx / "model.safetensors", d / "model.safetensors")
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(d / "model.safetensors"))
    assert read_config(d) == {"model_type": "genesis"}
    # The 30-layer preset does not fit the 5-layer fixture: a clear error, not a silent misload.
    with pytest.raises(LoadError, match="lacks"):
        load_model(d, "cpu", torch.float32)


def _spec_bytes(n_gdn: int, n_fox: int, length: int, dtype: torch.dtype) -> dict[str, int]:
    """Spec §3.4: GDN S 9·48·96 fp32 + q|k|v conv tails (432+144+288)·3; FoX tails 3·(192+576) and
    (192 + 576)·itemsize + 9·4 bytes per cached token (compact k, fp32 gate sums)."""
    s = torch.tensor([], dtype=dtype).element_size()
    return {"recurrent": n_gdn * 9 * 48 * 96 * 4,
            "conv": n_gdn * (432 + 144 + 288) * 3 * s + n_fox * 3 * (192 + 576) * s,
            "kv": n_fox * length * ((192 + 576) * s + 9 * 4)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_real_state_allocation_matches_the_spec(dtype):
    model = build_model({"model_type": "genesis"})  # the real 30-layer shapes, on meta
    state = model.make_state(2048, "cpu", dtype)
    measured = sum(b.untyped_storage().nbytes() for s in state for b in s.buffers())
    expected = _spec_bytes(23, 7, 2048, dtype)
    assert state.bytes().allocated == expected
    assert measured == sum(expected.values())
    if dtype == torch.bfloat16:
        # The spec's headline figures: 4,053,888 B of GDN state (+ tails) and 11,004 B per token of FoX cache.
        assert expected["recurrent"] + 23 * 2592 * 4 == 4_053_888
        assert expected["kv"] == 11_004 * 2048


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_used_bytes_follow_the_formulas_while_the_model_runs(dtype):
    # One FoX and three GDN layers at the real head geometry, run to 10, 1,000 and 2,000 tokens.
    torch.manual_seed(0)
    model = build_model({**REAL_HEADS, "vocab_size": 320, "n_layer": 4}, device="cpu").to(dtype).eval()
    prepare_for_inference(model, torch.device("cpu"), dtype)  # as load_model does
    state = model.make_state(2048, "cpu", dtype)
    ptrs = [b.data_ptr() for s in state for b in s.buffers()]
    ids = torch.randint(0, 320, (1, 2048), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for target in (10, 1000, 2000):
            # The Engine's chunked prefill, from what the state holds up to `target` tokens.
            logits = prefill(model, state, ids[0, state.length:target].tolist(), "cpu")
            assert torch.isfinite(logits).all()
            b = state.bytes()
            assert b.used == _spec_bytes(3, 1, target, dtype), f"at {target} tokens"
            assert b.allocated == _spec_bytes(3, 1, 2048, dtype)
        # Decode one more token: the constant parts do not move, the cache grows by one row.
        model(ids[:, 2000:2001], state)
        assert state.bytes().used["kv"] - _spec_bytes(3, 1, 2000, dtype)["kv"] == _spec_bytes(0, 1, 1, dtype)["kv"]
    # Nothing was reallocated on the way.
    assert [b.data_ptr() for s in state for b in s.buffers()] == ptrs


def test_the_block_size_is_the_context_limit():
    model = tiny_model()
    assert model.max_context == 64
    state = model.make_state(model.max_context, "cpu", torch.float32)
    with torch.inference_mode():
        model(torch.zeros(1, 64, dtype=torch.long), state)
        with pytest.raises(ContextFull):
            model(torch.zeros(1, 1, dtype=torch.long), state)


def test_gate_parameters_stay_fp32_in_a_bf16_load(fx):
    m = load_model(fx, "cpu", torch.bfloat16)
    attn = m.blocks[0].attn
    assert attn.A_log.dtype == attn.dt_bias.dtype == m.blocks[3].attn.fgate_bias.dtype == torch.float32
    assert attn.in_proj.weight.dtype == torch.bfloat16


def test_zero_centred_norms_fold_the_offset(fx, model):
    with safe_open(str(fx / "model.safetensors"), "pt") as f:
        omega = f.get_tensor("blocks.2.ffn_norm.omega")
    assert torch.allclose(model.blocks[2].ffn_norm.weight, omega + 1.0)


def test_chat_rendering_with_the_pythia_tokenizer(fixtures_root):
    path = fixtures_root.parent / "tokenizers" / "gpt-neox-pythia.json"
    if not path.exists():
        pytest.skip("shared tokenizer absent")
    from chatapp.catalog import get_entry
    from chatapp.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(get_entry("genesis"), None, path)
    ids = tok.render([{"role": "user", "content": "hi"}], system="Be brief.")
    # <|im_start|> = 50277, <|im_end|> = 50278 follow the 50,277 base ids; "\n" = 187 before every <|im_end|>.
    assert ids[0] == 50277 and ids.count(50277) == 3 and ids.count(50278) == 2
    assert [ids[i - 1] for i, x in enumerate(ids) if x == 50278] == [187, 187]
    assert tok.decode(ids) == ("<|im_start|>system\nBe brief.\n<|im_end|>\n<|im_start|>user\nhi\n<|im_end|>\n"
                               "<|im_start|>assistant\n")
    assert tok.stop_ids == (50278, 0) and tok.vocab_size == 50279
    assert tok.encode("Hello world") == [12092, 1533]
    # Default system prompt of the reference CLI; no BOS.
    assert tok.render_text([{"role": "user", "content": "x"}]).startswith(
        "<|im_start|>system\nYou are a helpful assistant.\n<|im_end|>\n")


def test_demo_entry_streams_through_the_engine_with_a_hybrid_memory_report():
    engine = demo_engine("genesis-tiny")  # the demo checkpoint and Engine the CLI uses
    ids = engine.tokenizer.render([{"role": "user", "content": "hi"}], system="Be brief.")
    assert ids[0] == 257 and engine.tokenizer.stop_ids == (258, 256)
    settings = engine.default_settings().with_overrides(seed=3, max_new_tokens=12)
    events = list(engine.generate(ids, settings))
    done = events[-1]
    assert done.new_tokens == len(events) - 1 and done.stop_reason in ("max_tokens", "eos")
    mem = engine.memory()
    a, gdn = engine.model.args, 3
    # Constant GDN state (fp32 S + q|k|v tails) beside a FoX cache that holds exactly the tokens fed.
    assert mem.allocated["recurrent"] == mem.used["recurrent"] == gdn * a.n_head * a.dk * a.dv * 4
    item = torch.tensor([], dtype=engine.dtype).element_size()  # the catalog's CPU dtype (bf16)
    assert mem.used["kv"] == engine.state.length * ((a.n_kv_head + a.n_head) * a.head_dim * item + a.n_head * 4)
    assert engine.state.length == len(ids) + done.new_tokens - 1
    # Regenerate: the recurrent state cannot trim, so the prompt snapshot is restored and reused.
    again = list(engine.generate(ids, settings))
    assert again[-1].reused_tokens == len(ids)
    assert [e.token_id for e in again[:-1]] == [e.token_id for e in events[:-1]]


def test_fixture_passes_on_the_naive_ops(fx, monkeypatch):
    monkeypatch.setenv("SMOLLCHAT_OPS", "naive")
    report = verify(fx)
    assert report.ok, "\n".join(report.lines())


def test_fixture_passes_on_the_triton_kernels(fx):
    """The GPU path (GLA + FoX Triton kernels) end to end; on CPU through the interpreter, in a fresh process
    because Triton reads TRITON_INTERPRET when it is first imported."""
    pytest.importorskip("triton")
    env = {**os.environ, "SMOLLCHAT_OPS": "triton", "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-m", "chatapp", "verify", str(fx)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "greedy_ids           match" in res.stdout and res.stdout.rstrip().endswith("PASS")
