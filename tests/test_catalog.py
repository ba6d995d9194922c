"""The catalog: every shipped entry validates; malformed entries get clear errors."""
import pytest

from chatapp.catalog import CatalogError, get_entry, load_catalog

GOOD = '''
id = "m"
name = "M"
architecture = "axiom"
summary = "s"
params = 1
context = 8
license = "x"
[source]
repo = "a/b"
[tokenizer]
kind = "bytes"
specials = { "<|im_end|>" = 256 }
[chat]
system_mode = "drop"
generation_prompt = "A:"
stop = ["<|im_end|>"]
[chat.templates]
user = "U:{content}<|im_end|>"
assistant = "A:{content}<|im_end|>"
'''


def _write(tmp_path, text, name="m"):
    (tmp_path / f"{name}.toml").write_text(text)
    return tmp_path


def test_shipped_catalog_is_valid():
    cat = load_catalog()
    assert "axiom" in cat and "axiom-tiny" in cat
    tiny = cat["axiom-tiny"]
    assert tiny.demo and tiny.source is None and "RANDOM WEIGHTS" in tiny.summary
    assert tiny.chat == cat["axiom"].chat and tiny.tokenizer == cat["axiom"].tokenizer
    for e in cat.values():
        e.sampling().validate()
        if not e.demo:
            assert not any(p.endswith((".py", ".bin")) for p in e.source.allow)


def test_axiom_defaults_follow_the_card():
    s = load_catalog()["axiom"].sampling()
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.no_repeat_ngram, s.max_new_tokens) == \
        (0.2, 0.85, 50, 1.15, 3, 128)


def test_good_entry_loads(tmp_path):
    assert load_catalog([_write(tmp_path, GOOD)])["m"].chat.system_mode == "drop"


@pytest.mark.parametrize("edit,match", [
    (lambda s: 'colour = "red"\n' + s, "unknown key"),
    (lambda s: s.replace('license = "x"\n', ""), "missing key"),
    (lambda s: s.replace('user = "U:{content}<|im_end|>"', 'user = "U:"'), "must contain"),
    (lambda s: s.replace('repo = "a/b"', 'repo = "a/b"\nallow = ["*.py"]'), "code or pickles"),
    (lambda s: s.replace('kind = "bytes"', 'kind = "sentencepiece"'), "tokenizer.kind"),
    (lambda s: s.replace("[chat]", "[generation]\ntop_p = 2.0\n[chat]"), "top_p"),
    (lambda s: s.replace('id = "m"', 'id = "other"'), "file name"),
    (lambda s: s + "[[[", "m.toml"),
    (lambda s: 'quantize = "int3"\n' + s, "quantize must be one of"),
    (lambda s: s + "[bench_config]\ndim = 8\n", "model_type included"),
])
def test_bad_entries_are_rejected(tmp_path, edit, match):
    with pytest.raises(CatalogError, match=match):
        load_catalog([_write(tmp_path, edit(GOOD))])


def test_demo_needs_config_and_known_base(tmp_path):
    _write(tmp_path, GOOD)
    _write(tmp_path, 'id = "d"\nextends = "m"\ndemo = true\n', "d")
    with pytest.raises(CatalogError, match="demo_config"):
        load_catalog([tmp_path])
    _write(tmp_path, 'id = "d"\nextends = "nope"\n', "d")
    with pytest.raises(CatalogError, match="extends unknown"):
        load_catalog([tmp_path])


def test_unknown_id_lists_known_ones():
    with pytest.raises(CatalogError, match="axiom-tiny"):
        get_entry("gpt-5")
