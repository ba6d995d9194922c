"""The command line, run as a user would (subprocess where start-up behaviour matters)."""
import json
import subprocess
import sys


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
    import shutil
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
