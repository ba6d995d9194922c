"""`smollchat serve` through the official `openai` client, on the demo models (random weights: the text is
noise, but greedy decoding makes it repeatable, which is what these tests compare)."""
from __future__ import annotations

import pytest

from .conftest import wait_ready

openai = pytest.importorskip("openai")

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.base, api_key="unused-on-loopback", max_retries=0, timeout=120)


def _greedy(client, **kw):
    args = {"model": "axiom-tiny", "messages": HELLO, "max_tokens": 10, "temperature": 0, **kw}
    return client.chat.completions.create(**args)


def test_models_lists_the_served_ids(client):
    ids = {m.id for m in client.models.list()}
    assert ids == {"axiom-tiny", "huginn-tiny"}


def test_chat_non_streaming(client):
    r = _greedy(client)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "axiom-tiny" and r.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 10
    assert r.usage.prompt_tokens > 5 and r.usage.total_tokens == r.usage.prompt_tokens + 10
    assert _greedy(client).choices[0].message.content == choice.message.content  # greedy: repeatable
    assert _greedy(client, max_completion_tokens=3, max_tokens=None).usage.completion_tokens == 3


def test_chat_streaming_matches_non_streaming_and_reports_usage(client):
    whole = _greedy(client).choices[0].message.content
    chunks = list(_greedy(client, stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1  # one answer, never mixed with another
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    plain = list(_greedy(client, stream=True))
    assert all(c.usage is None for c in plain)  # usage only when asked for


def test_seed_makes_sampling_repeatable(client):
    a, b, c = (_greedy(client, temperature=1.5, top_p=0.95, seed=s).choices[0].message.content for s in (7, 7, 8))
    assert a == b
    assert a != c  # (random weights are peaked, but at temperature 1.5 two seeds part within 10 tokens)


def test_stop_string_ends_the_reply(client):
    whole = _greedy(client, max_tokens=20).choices[0].message.content
    cut = whole.strip()[len(whole.strip()) // 2:][:4]
    assert cut.strip()
    r = _greedy(client, max_tokens=20, stop=[cut])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == whole[:whole.index(cut)]


def test_logprobs_and_top_logprobs(client):
    # Without the card's repetition penalty and n-gram ban, greedy takes the raw distribution's top token.
    r = _greedy(client, logprobs=True, top_logprobs=3,
                extra_body={"smollchat": {"repetition_penalty": 1.0, "no_repeat_ngram": 0}})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 10
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        tops = [a.logprob for a in t.top_logprobs]
        assert tops == sorted(tops, reverse=True) and all(v <= 0 for v in tops)
        assert t.token == t.top_logprobs[0].token  # greedy picks the raw distribution's most likely token
        assert bytes(t.bytes).decode() == t.token
    assert _greedy(client).choices[0].logprobs is None


def test_raw_completion_has_no_template(client, served):
    prompt = "Once upon a time"
    r = client.completions.create(model="axiom-tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.choices[0].text
    tok = served.engine("axiom-tiny").tokenizer
    assert r.usage.prompt_tokens == len(tok.encode(prompt, allow_special=False))  # no chat template around it
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text and len(lp.top_logprobs) == len(lp.tokens)
    assert lp.text_offset[0] == 0
    streamed = client.completions.create(model="axiom-tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=HELLO)
    assert e.value.body["code"] == "model_not_found"


def test_unsupported_features_are_refused_with_a_reason(client):
    for kw, param in (({"n": 2}, "n"), ({"presence_penalty": 0.5}, "presence_penalty"),
                      ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools")):
        with pytest.raises(openai.BadRequestError) as e:
            _greedy(client, **kw)
        assert e.value.body["param"] == param and "not supported" in e.value.body["message"]
    r = _greedy(client, user="someone", metadata={"a": "b"}, store=False)  # fields that do not apply: ignored
    assert r.choices[0].message.content


def test_model_controls_in_the_extra_field_are_checked_and_echoed(served, client):
    wait_ready(served, "huginn-tiny")  # lazily loaded: answered 503 with Retry-After until then
    r = client.chat.completions.create(model="huginn-tiny", messages=HELLO, max_tokens=3, temperature=0,
                                       extra_body={"smollchat": {"controls": {"num_steps": "4"}}})
    controls = r.model_extra["smollchat"]["controls"]
    assert controls["num_steps"] == 4  # coerced like --control num_steps=4
    assert set(controls) == {c.name for c in served.engine("huginn-tiny").controls}  # the complete set
    stream = client.chat.completions.create(model="huginn-tiny", messages=HELLO, max_tokens=2, stream=True,
                                            extra_body={"smollchat": {"controls": {"num_steps": 3}}})
    first = next(iter(stream))
    assert first.model_extra["smollchat"]["controls"]["num_steps"] == 3
    stream.close()
    for bad, words in (({"num_steps": 0}, "num_steps"), ({"num_steps": "many"}, "integer"),
                       ({"warp_drive": 1}, "unknown control")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="huginn-tiny", messages=HELLO, max_tokens=2,
                                           extra_body={"smollchat": {"controls": bad}})
        assert words in e.value.body["message"] and e.value.body["param"] == "smollchat.controls"
    with pytest.raises(openai.BadRequestError, match="unknown control"):
        _greedy(client, extra_body={"smollchat": {"controls": {"num_steps": 4}}})  # axiom has no such control


def test_recorded_chats_continue_when_the_history_is_resent(served, client):
    first = [{"role": "user", "content": "Remember the number 42."}]
    r1 = client.chat.completions.create(model="axiom-tiny", messages=first, max_tokens=4, temperature=0)
    history = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                       {"role": "user", "content": "Which number?"}]
    client.chat.completions.create(model="axiom-tiny", messages=history, max_tokens=4, temperature=0)
    chats = [c for c in served.store.list_chats() if c.title == "Remember the number 42."]
    assert len(chats) == 1  # the second request continued the first chat
    conv = served.store.load(chats[0].id)
    assert [(m.role, m.content) for m in conv.path()][:3] == [(m["role"], m["content"]) for m in history]
    assert len(conv.path()) == 4 and conv.path()[-1].status == "ok" and conv.model_id == "axiom-tiny"
