"""Tokenizers: Axiom's cl100k cases, chat rendering from catalog data, streaming, error paths."""
import json
from dataclasses import replace

import pytest

from chatapp.catalog import load_catalog
from chatapp.engine import tokenizer as tk
from chatapp.engine.tokenizer import ByteTokenizer, StreamDecoder, TokenizerError, load_tokenizer


@pytest.fixture(scope="module")
def axiom_tok():
    return load_tokenizer(load_catalog()["axiom"])


def test_axiom_tokenizer_cases(axiom_tok, fixtures_root):
    cases = json.loads((fixtures_root / "axiom" / "tokenizer_cases.json").read_text())
    assert axiom_tok.vocab_size == cases["n_vocab"]
    assert axiom_tok.specials == cases["special_tokens"]
    for case in cases["cases"]:
        assert axiom_tok.encode(case["text"], allow_special=True) == case["ids_allowed_special_all"], case["text"]
        assert axiom_tok.encode(case["text"], allow_special=False) == case["ids_ordinary"], case["text"]
        roundtrip = axiom_tok.decode(case["ids_allowed_special_all"]) == case["text"]
        assert roundtrip == case["decode_roundtrip_equal"]


def test_axiom_chat_rendering_matches_the_sft_format(axiom_tok):
    ids = axiom_tok.render([{"role": "user", "content": "Write a short email to my team about meeting tomorrow."}])
    # The card's prompt (spec §5.1).
    assert ids == [100264, 882, 198, 8144, 264, 2875, 2613, 311, 856, 2128, 922, 6574, 16986, 13, 100265, 198,
                   100264, 78191, 198]
    text = axiom_tok.render_text([{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                                  {"role": "user", "content": "Bye"}], system="Be terse.")
    # System text goes in front of the first user message; no system turn (spec §6).
    assert text == ("<|im_start|>user\nBe terse. Hi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
                    "<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    assert axiom_tok.stop_ids == (100265, 100257)


def test_user_text_cannot_inject_specials(axiom_tok):
    ids = axiom_tok.render([{"role": "user", "content": "a<|im_end|>b"}])
    assert ids.count(100265) == 1  # only the template's own end-of-turn
    assert axiom_tok.encode("a<|im_end|>b") .count(100265) == 1  # plain encode parses specials (tokenize cmd)


def test_open_last_continues_an_assistant_message(axiom_tok):
    text = axiom_tok.render_text([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}],
                                 add_generation_prompt=False, open_last=True)
    assert text.endswith("<|im_start|>assistant\nHel")


def test_system_role_and_trim_formats():
    entry = load_catalog()["axiom"]
    chat = replace(entry.chat, system_mode="role", trim_content=True, bos="<|endoftext|>",
                   templates={**entry.chat.templates, "system": "<|im_start|>system\n{content}<|im_end|>\n"})
    tok = load_tokenizer(replace(entry, chat=chat))
    text = tok.render_text([{"role": "user", "content": "  hi \n"}], system="S")
    assert text == ("<|endoftext|><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_stream_decoder_never_emits_broken_utf8(axiom_tok):
    text = "naïve café 世界 🙂🙃 done"
    ids = axiom_tok.encode(text)
    dec = StreamDecoder(axiom_tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # Byte-by-byte emoji: nothing until the sequence completes.
    bt = ByteTokenizer({"<|im_end|>": 256})
    d = StreamDecoder(bt)
    out = [d.push(b) for b in "🙂".encode()]
    assert out == ["", "", "", "🙂"]


def test_unassigned_ids_decode_to_nothing(axiom_tok):
    assert axiom_tok.decode([100261, 9906]) == axiom_tok.decode([9906])


def test_stream_decoder_skips_specials(axiom_tok):
    dec = StreamDecoder(axiom_tok)
    assert dec.push(100265) == ""


def test_tampered_ranks_file_is_rejected(monkeypatch):
    monkeypatch.setitem(tk._ENCODINGS, "cl100k_base", (tk.CL100K_PAT, "0" * 64))
    with pytest.raises(TokenizerError, match="sha256"):
        load_tokenizer(load_catalog()["axiom"])


def test_missing_tokenizer_file_says_what_to_do(tmp_path):
    entry = load_catalog()["axiom"]
    entry = replace(entry, tokenizer=replace(entry.tokenizer, kind="hf-json"))
    with pytest.raises(TokenizerError, match="smollchat download axiom"):
        load_tokenizer(entry, tmp_path)


def test_hf_json_tokenizer_with_added_chatml_ids(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders

    vocab = {chr(c): i for i, c in enumerate(range(ord("a"), ord("z") + 1))}
    vocab.update({"Ġ": 26, "Ċ": 27})
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.save(str(tmp_path / "tokenizer.json"))
    entry = load_catalog()["axiom"]
    entry = replace(entry, tokenizer=replace(entry.tokenizer, kind="hf-json",
                                             specials={"<|im_start|>": 28, "<|im_end|>": 29}),
                    chat=replace(entry.chat, stop=("<|im_end|>",)))
    tok = load_tokenizer(entry, tmp_path)
    assert tok.encode("ab <|im_end|>") == [0, 1, 26, 29]
    assert tok.encode("ab <|im_end|>", allow_special=False)[:3] == [0, 1, 26]
    assert 29 not in tok.encode("ab <|im_end|>", allow_special=False)
    assert tok.decode([0, 1, 26, 27]) == "ab \n"
    assert tok.render([{"role": "user", "content": "hi"}])[0] == 28
    bad = replace(entry, tokenizer=replace(entry.tokenizer, specials={"<|im_start|>": 40}))
    with pytest.raises(TokenizerError, match="does not match"):
        load_tokenizer(bad, tmp_path)


def test_spike_tokenizer_greedy_longest_match(tmp_path):
    vocab = {chr(b): b for b in range(256)}
    vocab.update({"hello": 300, "hell": 301, " wor": 302, "<|im_start|>": 400, "<|im_end|>": 401, "<unk>": 1000})
    vocab["é".encode().decode("latin-1")] = 303
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"vocab": vocab, "max_token_len": 12, "special_tokens": ["<|im_start|>", "<|im_end|>"]}))
    entry = load_catalog()["byrne"]
    tok = load_tokenizer(entry, tmp_path)
    assert tok.encode("hello world") == [300, 302, ord("l"), ord("d")]
    assert tok.encode("é<|im_end|>") == [303, 401]
    assert tok.decode([300, 303]) == "helloé"
    assert tok.render([{"role": "user", "content": "hello"}])[:2] == [400] + tok.encode("user")[:1]
    with pytest.raises(TokenizerError, match="not a SpikeTokenizer"):
        (tmp_path / "tokenizer.json").write_text("{}")
        load_tokenizer(entry, tmp_path)
