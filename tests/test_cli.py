"""The command line, run as a user would (subprocess where start-up behaviour matters)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatapp.cli import main


def run(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "chatapp", *args], capture_output=True, text=True, input=stdin,
                          timeout=300)


def test_tokenize_json_is_fast_and_torch_free():
    code = ("import sys; from chatapp.cli import main; rc = main(['tokenize', '--model', 'axiom', '--json', "
            "'<|im_start|>user\\nhi']); assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ids"] == [100264, 882, 198, 6151] and out["pieces"][0] == "<|im_start|>"


def test_tokenize_chat_renders_the_exact_prompt(capsys):
    assert main(["tokenize", "--model", "axiom", "--chat", "--json", "Write a short email to my team about "
                 "meeting tomorrow."]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ids"][-3:] == [100264, 78191, 198] and out["text"].endswith("<|im_start|>assistant\n")


def test_tokenize_reads_stdin():
    r = run("tokenize", "--model", "axiom", "--json", "-", stdin="hello")
    assert json.loads(r.stdout)["ids"] == [15339]


def test_unknown_model_is_a_usage_error(capsys):
    assert main(["tokenize", "--model", "nope", "x"]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def test_verify_passes_the_axiom_fixture(fixture_dir, capsys):
    assert main(["verify", str(fixture_dir("axiom"))]) == 0
    out = capsys.readouterr().out
    assert "logits" in out and "greedy_ids           match" in out and out.strip().endswith("PASS")


def test_verify_exit_codes(tmp_path, fixture_dir, capsys):
    assert main(["verify", str(tmp_path)]) == 2  # not a fixture directory
    bad = tmp_path / "bad"
    shutil.copytree(fixture_dir("axiom"), bad)
    # A perturbed weight fails by construction (a zero tolerance can be met bit for bit on some CPUs).
    from safetensors.torch import load_file, save_file
    weights_file = bad / "model.safetensors"
    weights = load_file(str(weights_file))
    name = next(k for k in sorted(weights) if k.endswith("norm.weight"))
    weights[name] = weights[name] * 3.0 + 1.0
    weights_file.chmod(0o644)
    save_file(weights, str(weights_file))
    assert main(["verify", str(bad)]) == 1  # logits off the fixture: FAIL, exit 1
    assert "FAIL" in capsys.readouterr().out


def test_prompt_needs_a_model(capsys):
    assert main(["--prompt", "hi"]) == 2
    assert "--prompt needs --model" in capsys.readouterr().err


def test_fake_engine_is_for_the_tui_only(capsys):
    assert main(["--fake", "--prompt", "hi"]) == 2
    assert "--fake is for the TUI" in capsys.readouterr().err


def test_bad_sampling_flag_is_a_usage_error(capsys):
    assert main(["--model", "axiom-tiny", "--prompt", "hi", "--top-p", "3"]) == 2
    assert "top_p" in capsys.readouterr().err


# Every failure a user can cause ends as one line on stderr with the documented exit code (issue 11 §5).

def one_line(err: str) -> str:
    """The single line a failure prints (demo notices aside); no traceback, no internal-error fallback."""
    lines = [ln for ln in err.splitlines() if ln.strip() and "random weights" not in ln]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("smollchat: ") and "internal error" not in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def axiom_demo(tmp_path_factory):
    """axiom-tiny's demo checkpoint, made once: a local axiom directory gets the real entry's tiktoken
    tokenizer, whose vocabulary this checkpoint has."""
    from chatapp.catalog import get_entry
    from chatapp.engine.demo import ensure_demo

    home = tmp_path_factory.mktemp("demo-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SMOLLCHAT_HOME", str(home))
        mp.setenv("HF_HOME", str(home / "hf"))
        return ensure_demo(get_entry("axiom-tiny"))


def model_dir(tmp_path: Path, demo: Path, config: dict | None = None, weights=None) -> Path:
    """A copy of the demo with config keys replaced (None deletes one) and the weights dict rewritten."""
    d = tmp_path / "model"
    d.mkdir()
    cfg = json.loads((demo / "config.json").read_text())
    for k, v in (config or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))  # NaN is written as the NaN literal json.loads reads
    if weights is None:
        (d / "model.safetensors").symlink_to(demo / "model.safetensors")
    else:
        from safetensors.torch import load_file, save_file
        save_file(weights(load_file(str(demo / "model.safetensors"))), str(d / "model.safetensors"))
    return d


def answer(d: Path, capsys, *extra: str) -> tuple[int, str]:
    code = main(["--model", str(d), "--prompt", "hi", "--max-tokens", "2", "--device", "cpu", *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("config, words", [
    ({"n_heads": 0}, "config key 'n_heads' must be >= 1, got 0"),
    ({"n_layers": 2.5}, "config key 'n_layers' must be a whole number, got 2.5"),
    ({"max_seq_len": -5}, "config key 'max_seq_len' must be >= 1"),
    ({"rope_theta": "10000"}, "config key 'rope_theta' must be a finite number"),
    ({"norm_eps": float("nan")}, "config key 'norm_eps' must be a finite number, got nan"),
    ({"vocab_size": True}, "config key 'vocab_size' must be a whole number"),
    ({"dim": None}, "lacks required key(s): dim"),
    ({"model_type": 5}, "model_type must be a string"),
], ids=["heads-0", "fractional-layers", "negative-context", "rope-theta-string", "norm-eps-nan", "bool-vocab",
        "missing-key", "model-type-int"])
def test_a_bad_config_is_one_line(tmp_path, axiom_demo, capsys, config, words):
    code, err = answer(model_dir(tmp_path, axiom_demo, config), capsys)
    assert code == 1 and words in one_line(err)


@pytest.mark.parametrize("write, words", [
    (lambda d: (d / "config.json").unlink(), "has no config.json"),
    (lambda d: (d / "config.json").write_text("{oops"), "is not valid JSON"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
    (lambda d: (d / "model.safetensors").write_bytes(b""), "empty or truncated"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage" * 100), "not a safetensors file"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:5000]), "is truncated"),
], ids=["no-config", "invalid-json", "json-list", "empty-weights", "garbage-weights", "truncated-weights"])
def test_a_broken_model_directory_is_one_line(tmp_path, axiom_demo, capsys, write, words):
    d = model_dir(tmp_path, axiom_demo, weights=lambda w: w)
    write(d)
    code, err = answer(d, capsys)
    assert code == 1 and words in one_line(err)


def test_nan_weights_are_refused_at_load(tmp_path, axiom_demo, capsys):
    def poison(w):
        w["layers.1.ffn_norm.weight"][3] = float("nan")
        return w
    code, err = answer(model_dir(tmp_path, axiom_demo, weights=poison), capsys)
    assert code == 1 and "layers.1.ffn_norm.weight" in one_line(err) and "NaN/Inf" in err


def test_nan_logits_are_refused_at_the_first_step(tmp_path, axiom_demo, capsys):
    # Finite weights whose product overflows: the final norm's gain times a normalised value passes float32's
    # largest number, so the first logits are Inf/NaN on every CPU, where the old code streamed noise with
    # exit 0. (Overflowing attention scores instead was machine-dependent: AVX-512 SDPA kept them finite.)
    def blow_up(w):
        return {k: v * 3e38 / v.abs().max() if k == "norm.weight" else v for k, v in w.items()}
    code, err = answer(model_dir(tmp_path, axiom_demo, weights=blow_up), capsys)
    assert code == 1 and "first logits are NaN/Inf" in one_line(err)
    assert capsys.readouterr().out.strip() == ""


def test_reference_layout_that_does_not_fuse_is_one_line(tmp_path, axiom_demo, capsys):
    def split(w):
        # The reference's separate q/k/v, with a k whose width no fused matrix can take.
        qkv = w.pop("layers.0.attn.wqkv.weight")
        q, k, v = qkv.split([64, 32, 32])
        w.update({"layers.0.attn.wq.weight": q, "layers.0.attn.wk.weight": k[:, :-1].contiguous(),
                  "layers.0.attn.wv.weight": v})
        return w
    code, err = answer(model_dir(tmp_path, axiom_demo, weights=split), capsys)
    line = one_line(err)
    assert code == 1 and "cannot fuse layers.0.attn.wqkv.weight" in line and "layers.0.attn.wk.weight [32, 63]" in line


def test_a_model_that_does_not_fit_in_memory_is_refused_before_loading(tmp_path, axiom_demo, capsys, monkeypatch):
    from chatapp.engine import loader

    monkeypatch.setattr(loader, "available_memory", lambda device: 10 * 2**20)
    monkeypatch.setattr(loader, "_read_tensors", lambda *a: pytest.fail("weights read before the memory check"))
    code, err = answer(model_dir(tmp_path, axiom_demo), capsys, "--dtype", "float32")
    line = one_line(err)
    # axiom-tiny in fp32: 6.5M parameters = 25 MiB of weights, plus its KV cache for 256 tokens.
    assert code == 1 and "needs 25." in line and "only 10.0 MiB is free (MemAvailable)" in line


def test_verify_a_damaged_fixture_is_a_fail_line(tmp_path, fixture_dir, capsys):
    truncated, misfit = tmp_path / "truncated", tmp_path / "misfit"
    for d in (truncated, misfit):
        shutil.copytree(fixture_dir("axiom"), d)
        for p in d.iterdir():
            p.chmod(0o644)
    golden = truncated / "golden.safetensors"
    golden.write_bytes(golden.read_bytes()[:3000])
    cfg = json.loads((misfit / "config.json").read_text())
    (misfit / "config.json").write_text(json.dumps({**cfg, "n_heads": 0}))
    assert main(["verify", str(truncated), str(misfit)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.splitlines()) == 2, err
    assert f"{truncated}: FAIL: " in err and "golden.safetensors is truncated" in err
    assert f"{misfit}: FAIL: " in err and "'n_heads' must be >= 1" in err


def test_selftest_on_a_model_not_downloaded(capsys):
    assert main(["selftest", "odinnext"]) == 1
    assert "odinnext is not downloaded yet; run `smollchat download odinnext`" in one_line(capsys.readouterr().err)


def test_seed_beyond_64_bits_is_a_usage_error(capsys):
    assert main(["--model", "axiom-tiny", "--prompt", "hi", "--seed", str(2**64)]) == 2
    assert "seed" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize("io_encoding", ["utf-8:strict", None], ids=["strict", "utf8-mode-surrogates"])
def test_invalid_utf8_on_stdin_under_a_strict_locale(io_encoding):
    env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
    env.pop("PYTHONIOENCODING", None)
    if io_encoding:
        env["PYTHONIOENCODING"] = io_encoding
    r = subprocess.run([sys.executable, "-m", "chatapp", "--model", "axiom-tiny", "--prompt", "-"],
                       input=b"h\xffi", capture_output=True, env=env, timeout=300)
    err = r.stderr.decode("utf-8", "replace")
    assert r.returncode == 2 and "stdin is not UTF-8 text (byte 0xff at offset 1)" in one_line(err)


def test_output_the_locale_cannot_encode_is_escaped_not_a_crash():
    env = {**os.environ, "PYTHONIOENCODING": "ascii:strict"}
    r = subprocess.run([sys.executable, "-m", "chatapp", "tokenize", "--model", "axiom", "--json", "café"],
                       capture_output=True, env=env, timeout=300)
    assert r.returncode == 0 and b"Traceback" not in r.stderr
    assert json.loads(r.stdout)["text"] == "café"  # valid JSON, with \u escapes
    r = subprocess.run([sys.executable, "-m", "chatapp", "tokenize", "--model", "axiom", "café"],
                       capture_output=True, env=env, timeout=300)
    assert r.returncode == 0 and b"'f\\xe9'" in r.stdout  # the piece 'fé', escaped instead of a crash


def test_a_bug_is_still_one_line_and_debug_shows_it(monkeypatch, capsys):
    import chatapp.cli.models as models_cmd

    def broken(args):
        raise ZeroDivisionError("boom")
    monkeypatch.setattr(models_cmd, "run", broken)
    assert main(["models"]) == 1
    line = capsys.readouterr().err.strip()
    assert line == ("smollchat: internal error: ZeroDivisionError: boom (a bug; SMOLLCHAT_DEBUG=1 shows the "
                    "traceback, please report it)")
    monkeypatch.setenv("SMOLLCHAT_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["models"])


def test_the_app_runs_under_an_ascii_locale_without_utf8_mode():
    # Catalog, demo stamp, tokenizer and cache records are read as UTF-8 whatever the locale says.
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    env.pop("PYTHONIOENCODING", None)
    for args in (["models"], ["--model", "axiom-tiny", "--prompt", "hi", "--max-tokens", "3", "--temperature", "0"]):
        r = subprocess.run([sys.executable, "-m", "chatapp", *args], capture_output=True, env=env, timeout=300)
        assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr.decode("utf-8", "replace")


def test_eager_keeps_the_reference_numerics_so_it_refuses_quantize(capsys):
    assert main(["--model", "axiom-tiny", "--prompt", "hi", "--eager", "--quantize", "int8"]) == 2
    assert "--eager" in one_line(capsys.readouterr().err)
    assert main(["--model", "axiom-tiny", "--eager", "--quantize", "int8"]) == 2  # the TUI refuses it too
    assert "--eager" in one_line(capsys.readouterr().err)


def test_the_tui_loads_models_as_the_command_line_says(monkeypatch):
    import chatapp.chat.engine_host as engine_host
    import chatapp.engine.runtime as runtime
    import chatapp.tui.app as tui_app

    made = {}

    class NoRun:
        def run(self):
            made["ran"] = True

    monkeypatch.setattr(tui_app, "make_app", lambda **kw: made.update(kw) or NoRun())
    assert main(["--device", "cpu", "--dtype", "bfloat16", "--quantize", "int4"]) == 0
    options = made["load_options"]
    assert made["ran"] and (options.device, options.dtype, options.quantize, options.eager) == ("cpu", "bfloat16", "int4", False)
    calls, hosted = [], []
    monkeypatch.setattr(runtime, "load_engine", lambda entry, **kw: calls.append(kw))
    monkeypatch.setattr(engine_host, "load_engine_process", lambda entry, **kw: hosted.append(kw))
    options.loader()("entry", print, "int8")
    assert not calls and options.engine_process  # by default the engine runs in its own process
    assert hosted[-1]["quantize"] == "int8" and hosted[-1]["device"] == "cpu" and hosted[-1]["compile"] == "auto"
    assert main(["--eager", "--no-engine-process"]) == 0
    assert not made["load_options"].engine_process
    made["load_options"].loader()("entry", print, None)
    assert calls[-1]["quantize"] == "none" and calls[-1]["compile"] == "off"  # every fast path off, in this process


def test_the_tuis_loader_gives_quantized_weight_bytes_to_the_memory_panel():
    """The models screen's choice reaches the engine: info() names the quantization, the linears are
    packed, and the memory report (what the panel draws) counts the model's weights as they are."""
    from chatapp.catalog import load_catalog
    from chatapp.tui.backend import LoadOptions

    entry = load_catalog()["axiom-tiny"]
    load = LoadOptions(device="cpu", compile="off", engine_process=False).loader()
    packed = load(entry, lambda stage: None, "int8")
    from chatapp.engine.quant import QuantLinear

    assert packed.info()["quantize"] == "int8"
    assert any(isinstance(m, QuantLinear) for m in packed.model.modules())
    assert packed.memory().weights == packed.model.weight_bytes()
