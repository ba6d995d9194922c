"""OdinNext against its card-derived fixture: primary reading, every alternative reading, states, loader.

The fixture pins the spec's reading of the card (not the released model): these tests prove the engine
computes that reading (and each named alternative) exactly, keeps a constant fp32 state, and loads the
real checkpoint's tensor inventory.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatapp.engine.arch import odinnext
from chatapp.engine.loader import LoadError, build_model, check_inventory, load_model
from chatapp.engine.state import ContextFull
from chatapp.engine.verify import verify

from ..conftest import demo_engine
from ..closeness import assert_close

FIXTURE = "odinnext"

PRIMARY = {k: v[0] for k, v in odinnext.OPTIONS.items()}
# The real model's values (spec §2); the config key layout is the fixture's guess.
REAL_CONFIG = {"model_type": "odinnext", "vocab_size": 32770, "hidden_size": 768, "num_hidden_layers": 16,
               "num_heads": 6, "expand_ratio": 128, "intermediate_size": 2048, "max_position_embeddings": 2048,
               "rope_theta": 100000.0, "norm_eps": 1e-6, "tie_word_embeddings": True}


@pytest.fixture(scope="module")
def model(fx):
    return load_model(fx, "cpu", torch.float32)


def close(got, ref, tol):
    assert_close(got, ref, tol=tol)


def test_verify_passes_on_the_fixture(fx):
    report = verify(fx)
    assert report.ok, "\n".join(report.lines())
    assert report.greedy_ids_match
    assert {c.name for c in report.comparisons} == {"logits", "greedy_step_logits"}


@pytest.mark.parametrize("variant", ["ffn_sq_product", "ffn_plain_swiglu", "rope_half_split", "attn_scale_one",
                                     "g_norm_per_head", "no_rope"])
def test_each_alternative_reading_reproduces_its_variant_logits(model, golden, variant):
    tensors, meta = golden
    switch = meta["variants"][variant]["switch"]
    model.set_options(**PRIMARY)
    try:
        model.set_options(**switch)
        with torch.inference_mode():
            got = model(tensors["input_ids"])
    finally:
        model.set_options(**PRIMARY)
    close(got, tensors[f"logits_variant_{variant}"], meta["suggested_tolerance"]["logits_fp32"])
    if meta["variants"][variant]["max_abs_diff_vs_primary"] > 1e-3:
        # The switch really changes the model: the primary logits must not also match.
        assert (got - tensors["logits"]).abs().max() > 1e-3


@pytest.mark.parametrize("chunks", [(24,), (1,) * 24, (7, 1, 16)], ids=["prefill", "token-by-token", "mixed"])
def test_prefill_states_match_whatever_the_chunking(model, golden, chunks):
    tensors, meta = golden
    ids = tensors["input_ids"]
    state = model.make_state(64, "cpu", torch.float32)
    pos, rows = 0, []
    with torch.inference_mode():
        for n in chunks:
            rows.append(model(ids[:, pos:pos + n], state))
            pos += n
    assert state.length == ids.shape[1] and all(s.length == ids.shape[1] for s in state)
    for i, s in enumerate(state):
        close(s.state, tensors[f"prefill_state_layer{i}"], meta["suggested_tolerance"]["prefill_state_fp32"])
    close(torch.cat(rows, 1), tensors["logits"], meta["suggested_tolerance"]["logits_fp32"])


def test_state_bytes_are_constant_and_match_the_formula(model):
    a = model.args
    formula = a.num_hidden_layers * a.num_heads * a.head_f_dim * a.head_i_dim * 4  # B = 1, fp32
    state = model.make_state(2048, "cpu", torch.bfloat16)
    ids = torch.randint(0, a.vocab_size, (1, 2000), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model(ids[:, :10], state)
        at_10 = state.bytes()
        ptrs = [s.state.data_ptr() for s in state]
        model(ids[:, 10:], state)
        at_2000 = state.bytes()
    assert state.length == 2000
    assert at_10.allocated == at_2000.allocated == {"recurrent": formula}
    assert at_10.used == at_2000.used == {"recurrent": formula}
    assert all(s.state.dtype == torch.float32 for s in state)
    assert [s.state.data_ptr() for s in state] == ptrs, "the state buffers must never be reallocated"


def test_the_2048_position_limit_is_enforced_with_a_clear_message(model):
    state = model.make_state(4096, "cpu", torch.float32)
    assert state.max_len == 2048 and model.max_context == 2048
    ids = torch.zeros(1, 2040, dtype=torch.long)
    with torch.inference_mode():
        model(ids, state)
        with pytest.raises(ContextFull, match="2048"):
            model(torch.zeros(1, 9, dtype=torch.long), state)
        with pytest.raises(ContextFull, match="RoPE table covers 2048 positions"):
            model(torch.zeros(1, 2049, dtype=torch.long))
    assert state.length == 2040


def test_the_real_tensor_inventory_loads_on_meta(fx):
    inventory = json.loads((fx / "real_tensors.json").read_text())
    weights = {name: torch.empty(spec["shape"], dtype=torch.float16, device="meta")
               for name, spec in inventory["tensors"].items()}
    assert all(spec["dtype"] == "F16" for spec in inventory["tensors"].values())
    model = build_model(REAL_CONFIG)
    sanitized = check_inventory(model, weights)
    assert sum(t.numel() for t in sanitized.values()) == inventory["notes"]["total_params_stored"] == 138_451_232
    assert sum(p.numel() for p in model.parameters()) == 138_451_232


def _meta_weights(fx):
    inventory = json.loads((fx / "real_tensors.json").read_text())
    return {n: torch.empty(s["shape"], dtype=torch.float16, device="meta") for n, s in inventory["tensors"].items()}


@pytest.mark.parametrize("edit", ["scalar-gates", "fused-gate-up", "embed-tokens-name", "tied-head-stored",
                                  "rope-buffers", "no-model-prefix", "per-channel-gates"])
def test_loader_accepts_the_storage_variants_the_spec_lists(fx, edit):
    w = _meta_weights(fx)
    if edit == "scalar-gates":
        w = {k: (torch.empty((), dtype=v.dtype, device="meta") if k.endswith(("gate_attn", "gate_ffn")) else v)
             for k, v in w.items()}
    elif edit == "fused-gate-up":
        for i in range(16):
            p = f"model.layers.{i}.mlp."
            w.pop(p + "gate_proj.weight"), w.pop(p + "up_proj.weight")
            w[p + "w_gate_up.weight"] = torch.empty(4096, 768, dtype=torch.float16, device="meta")
    elif edit == "embed-tokens-name":
        w["model.embed_tokens.weight"] = w.pop("model.embeddings.weight")
    elif edit == "tied-head-stored":
        w["lm_head.weight"] = w["model.embeddings.weight"]
    elif edit == "rope-buffers":
        w["model.layers.0.attn.rotary.inv_freq"] = torch.empty(64, device="meta")
        w["model.rope_cos"] = torch.empty(2048, 64, device="meta")
    elif edit == "no-model-prefix":
        w = {k.removeprefix("model."): v for k, v in w.items()}
    elif edit == "per-channel-gates":
        w = {k: (torch.empty(768, dtype=v.dtype, device="meta") if k.endswith(("gate_attn", "gate_ffn")) else v)
             for k, v in w.items()}
    model = build_model(REAL_CONFIG)
    check_inventory(model, w)
    assert model.lm_head is None
    if edit == "per-channel-gates":
        assert model.model.layers[5].gate_ffn.shape == (768,)


@pytest.mark.parametrize("edit,needle", [("drop", "model.layers.3.attn.g_norm.weight"),
                                         ("extra", "model.lower_bounds"),
                                         ("shape", "model.layers.0.mlp.down_proj.weight")])
def test_loader_is_strict_about_everything_else(fx, edit, needle):
    w = _meta_weights(fx)
    if edit == "drop":
        w.pop(needle)
    elif edit == "extra":
        w[needle] = torch.empty(16, 768, dtype=torch.float16, device="meta")
    else:
        w[needle] = torch.empty(768, 1024, dtype=torch.float16, device="meta")
    with pytest.raises(LoadError, match=needle.replace(".", r"\.")):
        check_inventory(build_model(REAL_CONFIG), w)


def test_storage_variants_load_to_the_same_numbers(fx, golden, tmp_path):
    # Rewrite the fixture with 0-dim gates, a fused gate|up, another embedding name and a stored tied head.
    w = load_file(str(fx / "model.safetensors"))
    out = {}
    for k, v in w.items():
        if k.endswith(("gate_attn", "gate_ffn")):
            out[k] = v.reshape(())
        elif k.endswith("mlp.gate_proj.weight"):
            out[k.replace("gate_proj", "w_gate_up")] = torch.cat([v, w[k.replace("gate_proj", "up_proj")]])
        elif not k.endswith("mlp.up_proj.weight"):
            out[k.replace("model.embeddings", "model.embed_tokens")] = v
    out["lm_head.weight"] = w["model.embeddings.weight"].clone()
    save_file(out, str(tmp_path / "model.safetensors"))
    shutil.copy(fx / "config.json", tmp_path / "config.json")
    tensors, meta = golden
    with torch.inference_mode():
        got = load_model(tmp_path, "cpu", torch.float32)(tensors["input_ids"])
    close(got, tensors["logits"], meta["suggested_tolerance"]["logits_fp32"])


def test_sanitize_is_idempotent_on_our_own_state_dict(model):
    own = {k: v.clone() for k, v in model.state_dict().items()}
    again = model.sanitize(dict(own))
    assert again.keys() == own.keys() and all(torch.equal(again[k], own[k]) for k in own)


def test_config_aliases_and_bad_options():
    aliased = {"model_type": "odinnext", "vocab_size": 512, "d_model": 64, "n_layers": 2, "n_heads": 2,
               "head_f_dim": 32, "ffn_dim": 96, "max_seq_len": 1024, "rms_norm_eps": 1e-5}
    a = build_model(aliased).args
    assert (a.hidden_size, a.num_hidden_layers, a.num_heads, a.head_f_dim, a.intermediate_size) == (64, 2, 2, 32, 96)
    assert (a.max_position_embeddings, a.norm_eps) == (1024, 1e-5)
    with pytest.raises(LoadError, match="ffn_variant"):
        build_model(aliased, {"ffn_variant": "geglu"})
    with pytest.raises(LoadError, match="unknown option"):
        build_model(aliased, {"ffn_kind": "plain"})
    # Without num_heads, FLA derives it from the expand ratio.
    derived = {k: v for k, v in aliased.items() if k != "n_heads"}
    assert build_model({**derived, "d_model": 128}).args.num_heads == 4


def test_g_norm_absent_changes_the_inventory(fx):
    model = build_model(REAL_CONFIG, {"g_norm": "absent"})
    assert not any("g_norm" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="reload"):
        model.set_options(g_norm="standard")


def test_naive_op_path_gives_the_same_model_output(model, golden, monkeypatch):
    tensors, meta = golden
    monkeypatch.setenv("SMOLLCHAT_OPS", "naive")
    with torch.inference_mode():
        got = model(tensors["input_ids"])
    close(got, tensors["logits"], meta["suggested_tolerance"]["logits_fp32"])


def test_bf16_compute_agrees_with_fp32_on_argmax(fx, golden):
    # The fixture's note: reduced-precision compute is a smoke test (argmax agreement), not values.
    tensors, _ = golden
    with torch.inference_mode():
        got = load_model(fx, "cpu", torch.bfloat16)(tensors["input_ids"])
    agree = (got.argmax(-1) == tensors["logits"].argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_demo_entry_streams_through_the_engine_with_a_constant_state():
    engine = demo_engine("odinnext-tiny")  # the demo checkpoint and Engine the CLI uses
    assert engine.context_limit == 2048
    tok = engine.tokenizer
    ids = tok.render([{"role": "user", "content": "hi"}], system="Be brief.")
    assert ids[0] == 258 and tok.stop_ids == (259, 256)
    assert tok.render_text([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    settings = engine.default_settings().with_overrides(seed=3, max_new_tokens=12)
    events = list(engine.generate(ids, settings))
    done = events[-1]
    assert done.new_tokens == len(events) - 1 and done.stop_reason in ("max_tokens", "eos")
    a = engine.model.args
    formula = a.num_hidden_layers * a.num_heads * a.head_f_dim * a.head_i_dim * 4
    mem = engine.memory()
    assert mem.allocated == mem.used == {"recurrent": formula}
    # A longer second turn continues the same state; its size does not move.
    longer = ids + [e.token_id for e in events[:-1]] + tok.encode("<|im_end|>\n<|im_start|>user\n" + "more " * 60)
    again = list(engine.generate(longer, settings))
    assert again[-1].reused_tokens == len(ids) + done.new_tokens - 1
    assert engine.state.length > 300 and engine.memory().allocated == {"recurrent": formula}


def test_fixture_passes_on_the_triton_kernels(fx):
    """The GPU path end to end (chunked prefill + in-place fused step); on CPU through the interpreter, in a
    fresh process because Triton reads TRITON_INTERPRET when it is first imported."""
    pytest.importorskip("triton")
    env = {**os.environ, "SMOLLCHAT_OPS": "triton", "OMP_NUM_THREADS": "1"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-m", "chatapp", "verify", str(fx)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "greedy_ids           match" in res.stdout and res.stdout.rstrip().endswith("PASS")


def _byte_level_tokenizer_json(path: Path, chatml: bool) -> None:
    """A minimal odin-32k-shaped tokenizer.json: <|endoftext|> = 0, <|pad|> = 1, the 256 byte symbols, then
    (optionally) the ChatML pair appended at ids that differ from the catalog's guess."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    symbols = sorted(ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, **{s: i + 2 for i, s in enumerate(symbols)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|pad|>"] + (["<|im_start|>", "<|im_end|>"] if chatml else []))
    tok.save(str(path / "tokenizer.json"))


def test_chatml_ids_come_from_the_downloaded_tokenizer_not_the_guess(tmp_path):
    from chatapp.catalog import get_entry
    from chatapp.engine.tokenizer import load_tokenizer

    entry = get_entry("odinnext")
    assert entry.tokenizer.specials["<|im_start|>"] == 32768  # the spec's guess, kept only as a fallback
    _byte_level_tokenizer_json(tmp_path, chatml=True)
    tok = load_tokenizer(entry, tmp_path)
    assert tok.specials["<|im_start|>"] == 258 and tok.specials["<|im_end|>"] == 259
    assert tok.stop_ids == (259, 0)
    ids = tok.render([{"role": "user", "content": "Hi <|im_end|>"}])
    # User text that spells a special token stays text; only the template's specials are special ids.
    assert ids.count(259) == 1 and ids[0] == 258
    assert tok.decode(tok.encode("Héllo wörld", allow_special=False)) == "Héllo wörld"
    assert tok.render_text([{"role": "user", "content": "x"}]) == "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"


def test_a_tokenizer_file_without_chatml_ids_must_agree_with_the_model(tmp_path):
    from chatapp.catalog import get_entry
    from chatapp.engine.tokenizer import TokenizerError, load_tokenizer

    # Appending the ChatML pair to this 258-id vocabulary would give 258/259, not the model's 32768/32769.
    _byte_level_tokenizer_json(tmp_path, chatml=False)
    with pytest.raises(TokenizerError, match="does not match this model"):
        load_tokenizer(get_entry("odinnext"), tmp_path)
