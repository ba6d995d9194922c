"""Loader errors name the problem; variants the Axiom spec lists load; the real inventory loads on meta."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from chatapp.engine.arch.base import UnknownArchitecture
from chatapp.engine.loader import LoadError, build_model, check_inventory, load_model, read_config

# Axiom's real config.json values (spec §2.2).
AXIOM_REAL = {"model_type": "axiom", "vocab_size": 100277, "dim": 1024, "n_layers": 24, "n_heads": 16,
              "n_kv_heads": 8, "ffn_dim_multiplier": 2.6667, "max_seq_len": 1024, "rope_theta": 10000.0,
              "norm_eps": 1e-5}


@pytest.fixture
def axiom_copy(fixture_dir, tmp_path):
    src = fixture_dir("axiom")
    dst = tmp_path / "axiom"
    dst.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(src / name, dst / name)
    return dst


def _rewrite(d: Path, fn):
    w = load_file(str(d / "model.safetensors"))
    save_file(fn(w), str(d / "model.safetensors"))


def test_real_inventory_loads_on_meta(fixture_dir):
    inventory = json.loads((fixture_dir("axiom") / "real_tensors.json").read_text())
    inventory = inventory.get("tensors", inventory)
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    weights = {k: torch.empty(v["shape"], dtype=dtypes[v["dtype"]], device="meta") for k, v in inventory.items()}
    model = build_model(AXIOM_REAL)
    out = check_inventory(model, weights)
    assert sum(t.numel() for t in out.values()) == 385_849_344  # the card's parameter count
    assert model.args.ffn_dim == 2816


def test_missing_tensor_is_named(axiom_copy):
    _rewrite(axiom_copy, lambda w: {k: v for k, v in w.items() if k != "layers.1.ffn_norm.weight"})
    with pytest.raises(LoadError, match="layers.1.ffn_norm.weight"):
        load_model(axiom_copy)


def test_unexpected_tensor_is_named(axiom_copy):
    _rewrite(axiom_copy, lambda w: {**w, "layers.0.attn.bias": torch.zeros(3)})
    with pytest.raises(LoadError, match="unexpected.*layers.0.attn.bias"):
        load_model(axiom_copy)


def test_wrong_shape_is_named(axiom_copy):
    _rewrite(axiom_copy, lambda w: {**w, "norm.weight": torch.ones(65)})
    with pytest.raises(LoadError, match=r"norm.weight has shape \[65\], expected \[64\]"):
        load_model(axiom_copy)


def test_integer_tensor_is_rejected(axiom_copy):
    _rewrite(axiom_copy, lambda w: {**w, "norm.weight": torch.ones(64, dtype=torch.int32)})
    with pytest.raises(LoadError, match="norm.weight has dtype"):
        load_model(axiom_copy)


def test_half_of_a_fused_group_missing_is_named(axiom_copy):
    _rewrite(axiom_copy, lambda w: {k: v for k, v in w.items() if k != "layers.0.attn.wk.weight"})
    with pytest.raises(LoadError, match="wk"):
        load_model(axiom_copy)


def test_truncated_file(axiom_copy):
    p = axiom_copy / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-1000])
    with pytest.raises(LoadError, match="truncated"):
        load_model(axiom_copy)


def test_corrupt_header(axiom_copy):
    p = axiom_copy / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:20] = b"not json!!!!"
    p.write_bytes(bytes(data))
    with pytest.raises(LoadError, match="corrupt|not a safetensors"):
        load_model(axiom_copy)


def test_pickles_are_never_loaded(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(AXIOM_REAL))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(LoadError, match="pickled weights are never loaded"):
        load_model(tmp_path)


def test_unknown_model_type(axiom_copy):
    cfg = json.loads((axiom_copy / "config.json").read_text())
    (axiom_copy / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(UnknownArchitecture, match="llama"):
        load_model(axiom_copy)


def test_missing_config(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(LoadError, match="no config.json"):
        read_config(tmp_path)


def test_config_missing_required_key(axiom_copy):
    cfg = json.loads((axiom_copy / "config.json").read_text())
    del cfg["n_heads"]
    (axiom_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match="n_heads"):
        load_model(axiom_copy)


def _logits(d):
    model = load_model(d)
    ids = torch.arange(10)[None] % 500
    with torch.inference_mode():
        return model(ids)


def test_prefixed_and_untied_exports_load_identically(axiom_copy, tmp_path):
    ref = _logits(axiom_copy)
    # (a) save_pretrained-style "model." prefix without the duplicate head (spec §2.3).
    pre = tmp_path / "prefixed"
    shutil.copytree(axiom_copy, pre)
    _rewrite(pre, lambda w: {f"model.{k}": v for k, v in w.items() if k != "lm_head.weight"})
    # Exact by construction: sanitize maps both layouts to the same tensors, so the same kernels run.
    assert torch.equal(_logits(pre), ref)
    # (b) no embed.weight, only the head.
    head_only = tmp_path / "head_only"
    shutil.copytree(axiom_copy, head_only)
    _rewrite(head_only, lambda w: {k: v for k, v in w.items() if k != "embed.weight"})
    assert torch.equal(_logits(head_only), ref)


def test_sanitize_is_idempotent(axiom_copy):
    model = load_model(axiom_copy)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(model.sanitize(dict(sd))) == set(sd)


def test_sanitize_changes_only_the_dict_and_fit_checkpoint_the_modules(axiom_copy):
    # A head that really differs from the embedding: sanitize keeps the tensor, the untied module comes later.
    weights = load_file(str(axiom_copy / "model.safetensors"))
    weights["lm_head.weight"] = weights["embed.weight"] + 1.0
    model = build_model(json.loads((axiom_copy / "config.json").read_text()))
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="untied head"):
        sanitized = model.sanitize(dict(weights))
    assert model.lm_head is None and {k: tuple(v.shape) for k, v in model.state_dict().items()} == before
    assert "lm_head.weight" in sanitized
    model.fit_checkpoint(sanitized)
    assert model.lm_head is not None and model.lm_head.weight.is_meta
    assert set(model.state_dict()) == set(sanitized)


def test_weights_are_cast_to_the_requested_dtype(axiom_copy):
    model = load_model(axiom_copy, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("native", [False, True], ids=["no-bf16-hw", "bf16-hw"])
def test_cpu_bf16_prefill_upcast_only_without_bf16_hardware(axiom_copy, monkeypatch, native):
    from chatapp.engine import kernels
    from chatapp.engine.layers import CpuLinear

    # A model too small to measure takes the default: without bf16 instructions, many-row bf16 GEMMs run in
    # fp32 tiles; with them oneDNN's bf16 GEMM is faster.
    monkeypatch.setattr(kernels, "cpu_has_native_bf16", lambda: native)
    model = load_model(axiom_copy, dtype="bfloat16")
    assert model.kernel_choice.source == "default"
    classes = {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert classes == ({torch.nn.Linear} if native else {CpuLinear})
    ids = torch.arange(24).view(1, 24)
    with torch.inference_mode():
        assert torch.isfinite(model(ids)).all()


# Config values: every field's type and range, checked where the architecture reads them (issue 11 §5).

@pytest.mark.parametrize("arch, key, value, words", [
    ("axiom", "n_kv_heads", 0, "'n_kv_heads' must be >= 1, got 0"),
    ("axiom", "dim", 64.5, "'dim' must be a whole number, got 64.5"),
    ("axiom", "norm_eps", float("inf"), "'norm_eps' must be a finite number, got inf"),
    ("axiom", "rope_theta", -1.0, "'rope_theta' must be > 0, got -1.0"),
    ("huginn", "qk_bias", "yes", "'qk_bias' must be true or false, got 'yes'"),
    ("huginn", "num_key_value_heads", -4, "'num_key_value_heads' must be >= 1"),
    ("odinnext", "rope_layout", 3, "'rope_layout' must be a string, got 3"),
    ("genesis", "gla_expand_k", float("nan"), "'gla_expand_k' must be a finite number, got nan"),
    ("byrne", "rms_norm_eps", 0.0, "'rms_norm_eps' must be > 0, got 0.0"),
    # A million layers is refused at once (it used to spend minutes building modules on the meta device).
    ("axiom", "n_layers", 10**6, "'n_layers' must be in [1, 1024], got 1000000"),
    ("genesis", "n_layer", 10**6, "'n_layer' must be in [1, 1024]"),
    ("huginn", "n_layers_in_recurrent_block", 10**6, "'n_layers_in_recurrent_block' must be in [1, 1024]"),
    ("odinnext", "num_hidden_layers", 10**6, "'num_hidden_layers' must be in [1, 1024]"),
    ("byrne", "num_hidden_layers", 10**6, "'num_hidden_layers' must be in [1, 1024]"),
])
def test_config_values_are_checked_by_type_and_range(fixture_dir, arch, key, value, words):
    config = read_config(fixture_dir(arch))
    with pytest.raises(LoadError, match=f"config does not fit architecture .*: config key {re.escape(words)}"):
        build_model({**config, key: value})


def test_config_values_that_are_fine_load_as_their_type(fixture_dir):
    config = read_config(fixture_dir("axiom"))
    # An int written as 2.0 is an int; a float field takes an int; a zero default means zero is allowed.
    model = build_model({**config, "n_layers": 3.0, "rope_theta": 10000, "norm_eps": 1e-5})
    assert model.args.n_layers == 3 and isinstance(model.args.n_layers, int)
    assert model.args.rope_theta == 10000.0 and isinstance(model.args.rope_theta, float)
    assert build_model({**read_config(fixture_dir("odinnext")), "logit_softcap": 0.0}).args.logit_softcap == 0.0
    # None stays allowed where the field's type says `| None`.
    assert build_model({**read_config(fixture_dir("huginn")), "num_key_value_heads": None}).args.n_kv_heads == 4


# Non-finite weights, and models that do not fit in memory, are refused at load.

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_named(axiom_copy, bad):
    def poison(w):
        w["layers.2.attn.wo.weight"][5, 7] = bad
        return w
    _rewrite(axiom_copy, poison)
    with pytest.raises(LoadError, match=r"tensor layers.2.attn.wo.weight in .* holds 1 NaN/Inf value\(s\)"):
        load_model(axiom_copy)


def test_weights_that_overflow_the_target_dtype_are_named(axiom_copy):
    _rewrite(axiom_copy, lambda w: {**w, "norm.weight": torch.full((64,), 1e6)})  # finite in fp32, Inf in fp16
    with pytest.raises(LoadError, match="tensor norm.weight .* overflows float16"):
        load_model(axiom_copy, dtype=torch.float16)
    assert load_model(axiom_copy, dtype=torch.bfloat16).norm.weight.isfinite().all()


def test_a_model_that_does_not_fit_is_refused_before_its_weights_are_read(axiom_copy, monkeypatch):
    from chatapp.engine import loader

    model = build_model(read_config(axiom_copy))  # on meta: figures without allocating
    weights = sum(t.numel() * 4 for t in [*model.parameters(), *model.buffers()])
    state = sum(model.make_state(64, torch.device("meta"), torch.float32).bytes().allocated.values())
    monkeypatch.setattr(loader, "_read_tensors", lambda *a: pytest.fail("weights read before the memory check"))
    monkeypatch.setattr(loader, "available_memory", lambda device: weights + state - 1)
    with pytest.raises(LoadError, match=r"needs .* of weights in float32 \+ .* of state for 64 tokens.*MemAvailable"):
        load_model(axiom_copy, state_tokens=10_000)  # the state is capped at the model's 64-token context
    monkeypatch.setattr(loader, "available_memory", lambda device: weights + state)
    with pytest.raises(pytest.fail.Exception, match="weights read"):
        load_model(axiom_copy, state_tokens=64)  # it fits exactly: the check lets it through


def test_available_memory_reads_meminfo():
    from chatapp.engine.loader import available_memory

    avail = available_memory(torch.device("cpu"))
    assert avail is not None and 0 < avail <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def test_config_is_read_as_utf8_whatever_the_locale(axiom_copy):
    # Fixture configs carry non-ASCII comments; under an ASCII locale (no UTF-8 mode) they must still load.
    cfg = json.loads((axiom_copy / "config.json").read_text(encoding="utf-8"))
    (axiom_copy / "config.json").write_text(json.dumps({**cfg, "_comment": "tiny — values"}, ensure_ascii=False),
                                            encoding="utf-8")
    code = f"from chatapp.engine.loader import read_config; print(read_config({str(axiom_copy)!r})['dim'])"
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "64", r.stderr


def _raw_safetensors(path: Path, header) -> None:
    import struct
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + bytes(64))


@pytest.mark.parametrize("header, words", [
    ([1, 2], "corrupt safetensors header"),
    ({"a": {"dtype": "F32", "shape": [2]}}, "corrupt safetensors header"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": "x"}}, "corrupt safetensors header"),
    ({"__metadata__": {"genesis_config_json": "[1, 2]"}, "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
     "genesis_config_json is not a JSON object"),
], ids=["header-list", "no-offsets", "offsets-string", "genesis-meta-list"])
def test_a_header_of_the_wrong_layout_is_a_load_error(tmp_path, header, words):
    _raw_safetensors(tmp_path / "model.safetensors", header)
    (tmp_path / "config.json").write_text(json.dumps(AXIOM_REAL))
    with pytest.raises(LoadError, match=words):
        load_model(tmp_path)


def test_an_index_of_the_wrong_layout_is_a_load_error(axiom_copy):
    (axiom_copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["model.safetensors"]}))
    with pytest.raises(LoadError, match="not a valid safetensors index .*weight_map must map"):
        load_model(axiom_copy)
