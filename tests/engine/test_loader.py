"""Loader errors name the problem; variants the Axiom spec lists load; the real inventory loads on meta."""
import json
import shutil
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


def test_weights_are_cast_to_the_requested_dtype(axiom_copy):
    model = load_model(axiom_copy, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("native", [False, True], ids=["no-bf16-hw", "bf16-hw"])
def test_cpu_bf16_prefill_upcast_only_without_bf16_hardware(axiom_copy, monkeypatch, native):
    from chatapp.engine import loader

    monkeypatch.setattr(loader, "cpu_has_native_bf16", lambda: native)
    model = load_model(axiom_copy, dtype="bfloat16")
    classes = {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    # Without bf16 instructions, many-row bf16 GEMMs run upcast to fp32; with them oneDNN's bf16 GEMM is faster.
    assert classes == ({torch.nn.Linear} if native else {loader._CpuBf16Linear})
    ids = torch.arange(24).view(1, 24)
    with torch.inference_mode():
        assert torch.isfinite(model(ids)).all()
