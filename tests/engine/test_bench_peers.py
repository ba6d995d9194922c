"""The peers of `smollchat bench` (engine/bench_peers.py), without llama.cpp or the `bench` extra.

The GGUF that llama.cpp benchmarks must be *our* Axiom model: a reference forward written with llama.cpp's
`llama` semantics (separate q/k/v and gate/up tensors by GGUF name, ggml's normal RoPE on adjacent pairs,
query head h on kv head h // group, a missing output.weight meaning the tied embedding) over the tensors
`axiom_gguf` returns gives our model's logits. With the gguf package present, the file round-trips.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from chatapp.engine.bench_peers import (PeerRun, PlainHGRN2, axiom_gguf, find_llama_bench, llama_cpp,
                                        parse_llama_bench, plain_hgrn2, write_gguf)
from chatapp.engine.loader import build_model

from .closeness import assert_close

AXIOM = {"model_type": "axiom", "vocab_size": 300, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
         "max_seq_len": 64, "rope_theta": 10000.0, "norm_eps": 1e-5}
ODIN = {"model_type": "odinnext", "vocab_size": 260, "hidden_size": 64, "num_hidden_layers": 4, "num_heads": 2,
        "expand_ratio": 32, "intermediate_size": 128}


def _axiom(untied: bool) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(AXIOM, {}, device="cpu").float()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0))  # norms too: a swap shows
        if untied:
            model.lm_head = nn.Linear(64, 300, bias=False)
    return model.eval()


def _llama_reference(meta: dict, t: dict, ids: list[int]) -> torch.Tensor:
    """Logits [T, V] of llama.cpp's llama architecture from GGUF metadata and tensors (fp64, plain code)."""
    w = {k: torch.from_numpy(v).double() for k, v in t.items()}
    n_layers, h, hkv = meta["llama.block_count"], meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    hd, eps = meta["llama.rope.dimension_count"], meta["llama.attention.layer_norm_rms_epsilon"]
    n = len(ids)

    def rms(x, g):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g

    inv = meta["llama.rope.freq_base"] ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv  # [T, hd/2]

    def rope_normal(x):  # [T, heads, hd]: ggml's mode 0 rotates (x[2j], x[2j+1])
        a, b = x[..., 0::2], x[..., 1::2]
        c, s = ang.cos()[:, None], ang.sin()[:, None]
        return torch.stack((a * c - b * s, a * s + b * c), -1).flatten(-2)

    x = w["token_embd.weight"][ids]
    mask = torch.ones(n, n).tril().bool()
    for i in range(n_layers):
        p = f"blk.{i}."
        y = rms(x, w[p + "attn_norm.weight"])
        q = rope_normal((y @ w[p + "attn_q.weight"].T).view(n, h, hd))
        k = rope_normal((y @ w[p + "attn_k.weight"].T).view(n, hkv, hd))
        v = (y @ w[p + "attn_v.weight"].T).view(n, hkv, hd)
        heads = []
        for j in range(h):
            kv = j // (h // hkv)
            s = (q[:, j] @ k[:, kv].T) / math.sqrt(hd)
            heads.append(s.masked_fill(~mask, float("-inf")).softmax(-1) @ v[:, kv])
        x = x + torch.cat(heads, -1) @ w[p + "attn_output.weight"].T
        y = rms(x, w[p + "ffn_norm.weight"])
        x = x + (F.silu(y @ w[p + "ffn_gate.weight"].T) * (y @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
    head = w.get("output.weight", w["token_embd.weight"])
    return rms(x, w["output_norm.weight"]) @ head.T


@pytest.mark.parametrize("untied", [False, True])
def test_the_gguf_tensors_are_our_model_under_llama_cpp_semantics(untied):
    model = _axiom(untied)
    meta, tensors = axiom_gguf(model)
    layer = {"attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"}
    want = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{n}.weight" for i in range(2) for n in layer}
    assert set(tensors) == want | ({"output.weight"} if untied else set())
    assert tensors["blk.0.attn_k.weight"].shape == (2 * 16, 64) and tensors["blk.1.ffn_down.weight"].shape == (64, 256)
    ids = [5, 17, 250, 3, 99, 42, 7]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).double()[0]
    assert_close(_llama_reference(meta, tensors, ids), ours, dtype=torch.float32, what="llama.cpp reading vs ours")


def test_the_gguf_file_round_trips(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package is in the optional `bench` extra")
    meta, tensors = axiom_gguf(_axiom(untied=False))
    path = tmp_path / "axiom.gguf"
    write_gguf(path, meta, tensors)
    r = gguf.GGUFReader(str(path))
    back = {t.name: t for t in r.tensors}
    assert set(back) == set(tensors)
    for name, arr in tensors.items():
        got = back[name]
        assert got.tensor_type == gguf.GGMLQuantizationType.F32
        assert list(got.shape) == list(reversed(arr.shape))  # GGUF lists dims innermost first
        assert (got.data.reshape(arr.shape) == arr).all(), name
    fields = r.fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["llama.rope.freq_base"].contents() == pytest.approx(10000.0)
    assert fields["tokenizer.ggml.model"].contents() == "none"


def test_llama_bench_json_is_read_per_test():
    text = json.dumps([
        {"build_commit": "0c1e570", "n_threads": 2, "model_type": "llama ?B Q8_0", "n_prompt": 128, "n_gen": 0,
         "n_depth": 0, "avg_ts": 90.0, "stddev_ts": 1.0, "samples_ts": [89.0, 91.0, 95.0]},
        {"build_commit": "0c1e570", "n_threads": 2, "model_type": "llama ?B Q8_0", "n_prompt": 0, "n_gen": 128,
         "n_depth": 128, "avg_ts": 30.0, "stddev_ts": 0.5, "samples_ts": [30.5, 29.5, 30.0]}])
    pre, dec = parse_llama_bench(text)
    assert (pre["n_prompt"], pre["n_gen"], pre["tok_s"]) == (128, 0, 91.0)
    assert (dec["n_gen"], dec["n_depth"], dec["tok_s"], dec["tok_s_all"]) == (128, 128, 30.0, [30.5, 29.5, 30.0])


def test_a_missing_llama_bench_says_how_to_get_one(tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLLCHAT_LLAMA_BENCH", str(tmp_path / "nowhere"))
    assert find_llama_bench(None) == tmp_path / "nowhere"
    assert find_llama_bench(str(tmp_path / "given")) == tmp_path / "given"  # the option wins
    run = PeerRun("axiom", AXIOM, torch.float32, "none", 1, [1, 2], 4, 1, [2], lambda: _axiom(False))
    why = llama_cpp(run, lambda _m: None)
    assert isinstance(why, str) and "bench/README.md" in why and "SMOLLCHAT_LLAMA_BENCH" in why


def test_the_plain_hgrn2_recurrence_carries_its_state():
    """Prefill then one token at a time gives the logits of one pass over the whole sequence: the peer decodes
    what it claims to (its state and positions carried right)."""
    peer = PlainHGRN2(ODIN, torch.float32)
    ids = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    with torch.no_grad():
        whole, _ = peer.forward(ids, peer.new_state(), 0)
        logits, state = peer.forward(ids[:5], peer.new_state(), 0)
        for pos in range(5, 8):
            logits, state = peer.forward(ids[pos:pos + 1], state, pos)
    assert_close(logits, whole, what="stepwise vs one pass")
    assert torch.isfinite(whole).all() and whole.std() > 0


def test_a_peer_is_timed_like_ours():
    run = PeerRun("odinnext", ODIN, torch.bfloat16, "none", 1, list(range(12)), 6, 2, [12], lambda: None)
    rec = plain_hgrn2(run)
    assert rec["dtype"] == "bfloat16" and len(rec["decode_tok_s_all"]) == 2
    assert rec["decode_tok_s"] > 0 and rec["prefill_tok_s"] > 0 and rec["prefill_tokens"] == 12


def test_an_int4_run_also_decodes_llama_cpp_s_q8_0_interleaved_with_ours(tmp_path):
    """The int4 target is to beat llama.cpp's Q8_0, so an int4 run decodes Q4_0 (its nearest type) and Q8_0,
    each quantized from the same F32 GGUF, and each round runs ours, then each type once (stand-in llama-bench
    and llama-quantize that log what they ran)."""
    pytest.importorskip("gguf", reason="the gguf package is in the optional `bench` extra")
    log = tmp_path / "calls.txt"
    (tmp_path / "llama-quantize").write_text(f'#!/bin/sh\necho "quantize $3" >> {log}\ncp "$1" "$2"\n')
    rate = {"q4_0": 80.0, "q8_0": 50.0}
    cases = " ".join(f'*{k}*) ts={v};;' for k, v in rate.items())
    (tmp_path / "llama-bench").write_text(
        f'#!/bin/sh\necho "bench $*" >> {log}\ncase "$2" in {cases} *) ts=1;; esac\n'
        'echo "[{\\"build_commit\\": \\"x\\", \\"n_threads\\": 1, \\"n_prompt\\": 0, \\"n_gen\\": 4, \\"n_depth\\": 2, '
        '\\"avg_ts\\": $ts, \\"samples_ts\\": [$ts]}]"\n')
    for f in ("llama-quantize", "llama-bench"):
        (tmp_path / f).chmod(0o755)
    ours = iter([60.0, 62.0])

    def ours_decode() -> float:
        with log.open("a") as f:
            f.write("ours\n")
        return next(ours)
    run = PeerRun("axiom", AXIOM, torch.float32, "int4", 1, [1, 2], 4, 2, [2], lambda: _axiom(False),
                  str(tmp_path / "llama-bench"), ours_decode)
    got = llama_cpp(run, lambda _m: None)
    assert isinstance(got, dict), got
    assert (got["type"], got["decode_tok_s"], got["ours_interleaved_tok_s"]) == ("Q4_0", 80.0, [60.0, 62.0])
    assert got["also"] == {"Q8_0": {"decode_tok_s": 50.0, "decode_tok_s_all": [50.0, 50.0],
                                    "ours_interleaved_tok_s": [60.0, 62.0]}}
    calls = log.read_text().splitlines()
    assert [c for c in calls if c.startswith("quantize")] == ["quantize Q4_0", "quantize Q8_0"]
    decodes = [c.split()[0] if c == "ours" else c.split("axiom-")[1].split(".")[0] for c in calls
               if c == "ours" or "-n 4" in c]
    assert decodes == ["ours", "q4_0", "q8_0"] * 2
    assert all("-r 1 " in c for c in calls if "-n 4" in c)
