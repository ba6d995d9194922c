"""The generate loop and the Engine handle: stop reasons, streaming, cancellation, prefix reuse."""
from dataclasses import dataclass, replace

import pytest
import torch

from chatapp.catalog import load_catalog
from chatapp.contract import Done, SamplingSettings, StepEvent
from chatapp.engine.arch.base import ArchModel
from chatapp.engine.generate import StopStrings
from chatapp.engine.loader import load_model
from chatapp.engine.runtime import Engine
from chatapp.engine.state import KVState, RecurrentState, StateList
from chatapp.engine.tokenizer import ByteTokenizer

EOS = 300


@dataclass
class _Args:
    vocab_size: int = 320
    n_layers: int = 1
    dim: int = 4


class Scripted(ArchModel):
    """Emits a fixed script: after absorbing n tokens it predicts script[n - prompt_len]."""

    def __init__(self, script, prompt_len, recurrent=False):
        super().__init__()
        self.args = _Args()
        self.script, self.prompt_len, self.recurrent = script, prompt_len, recurrent
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.calls = []
        self.inference_mode = []

    @property
    def max_context(self):
        return 64

    def forward(self, ids, state=None, last_only=False):
        t = ids.shape[1]
        state.check_room(t)
        self.calls.append(t)
        self.inference_mode.append(torch.is_inference_mode_enabled())
        if self.recurrent:
            state[0].state += ids.sum()
        else:
            state[0].update(torch.zeros(1, t, 1, 1), torch.zeros(1, t, 1, 1))
        state.advance(t)
        i = state.length - self.prompt_len
        tok = self.script[i] if 0 <= i < len(self.script) else 0
        logits = torch.full((1, 1, 320), -10.0)
        logits[0, 0, tok] = 10.0
        return logits

    def make_state(self, max_len, device, dtype):
        part = RecurrentState((1, 1), device) if self.recurrent else KVState(max_len, 1, 1, device, dtype)
        return StateList([part], max_len=max_len)


def _engine(script, prompt_len, context=64, recurrent=False):
    entry = load_catalog()["axiom-tiny"]
    entry = replace(entry, context=context, chat=replace(entry.chat, stop=("<|im_end|>",)))
    tok = ByteTokenizer({"<|im_end|>": EOS}, entry.chat)
    return Engine(Scripted(script, prompt_len, recurrent), tok, entry, torch.device("cpu"), torch.float32, context)


GREEDY = SamplingSettings(temperature=0, max_new_tokens=50)


def _run(engine, ids, settings=GREEDY):
    events = list(engine.generate(ids, settings))
    assert isinstance(events[-1], Done) and all(isinstance(e, StepEvent) for e in events[:-1])
    return "".join(e.text for e in events), events[-1], events[:-1]


def test_eos_stops_and_is_not_streamed():
    text, done, steps = _run(_engine(list(b"hi") + [EOS], 3), [1, 2, 3])
    assert text == "hi" and done.stop_reason == "eos" and done.new_tokens == 3
    assert steps[-1].token_id == EOS and steps[-1].text == ""
    assert done.ttft_s > 0 and done.prompt_tokens == 3


def test_stop_string_cuts_text_and_holds_back_prefixes():
    text, done, steps = _run(_engine(list(b"ab##cd"), 1), [1], replace(GREEDY, stop_strings=("##c",)))
    assert text == "ab" and done.stop_reason == "stop_string"
    assert [e.text for e in steps] == ["a", "b", "", "", ""]


def test_stop_prefix_that_never_completes_is_released():
    text, done, _ = _run(_engine(list(b"ab#") + [EOS], 1), [1], replace(GREEDY, stop_strings=("##",)))
    assert text == "ab#" and done.stop_reason == "eos" and done.text == "#"


def test_max_tokens():
    text, done, _ = _run(_engine(list(b"abcdef"), 1), [1], replace(GREEDY, max_new_tokens=4))
    assert text == "abcd" and done.stop_reason == "max_tokens" and done.new_tokens == 4


def test_context_full_is_reported_not_raised():
    engine = _engine(list(b"x" * 40), 5, context=10)
    text, done, _ = _run(engine, [1, 2, 3, 4, 5])
    assert done.stop_reason == "context_full" and done.new_tokens == 5 and text == "xxxxx"
    _, done, _ = _run(engine, list(range(1, 11)))
    assert done.stop_reason == "context_full" and done.new_tokens == 0 and "10 tokens" in done.detail


def test_cancel_between_tokens():
    engine = _engine(list(b"abcdefgh"), 1)
    got = []
    for ev in engine.generate([1], GREEDY):
        got.append(ev)
        if len(got) == 2:
            engine.cancel()
    assert got[-1].stop_reason == "cancelled" and got[-1].new_tokens == 2


def test_model_calls_run_in_inference_mode_but_the_consumer_between_events_does_not():
    engine = _engine(list(b"abcd"), 1)
    outside = [torch.is_inference_mode_enabled() for _ in engine.generate([1], GREEDY)]
    assert len(outside) > 1 and not any(outside)
    assert engine.model.inference_mode and all(engine.model.inference_mode)


def test_utf8_split_across_tokens_streams_whole_characters():
    script = list("é🙂".encode()) + [EOS]
    _, _, steps = _run(_engine(script, 1), [1])
    assert [e.text for e in steps] == ["", "é", "", "", "", "🙂", ""]


def test_kv_prefix_reuse_only_prefills_the_new_suffix():
    engine = _engine(list(b"ok") + [EOS], 3)
    _run(engine, [1, 2, 3])
    calls = engine.model.calls
    calls.clear()
    engine.model.prompt_len = 7
    _, done, _ = _run(engine, [1, 2, 3, ord("o"), ord("k"), 9, 9])
    # The state held 1,2,3,o,k (the EOS after k was sampled, never fed): only 9,9 run.
    assert calls[0] == 2 and done.reused_tokens == 5
    calls.clear()
    engine.model.prompt_len = 3
    _, done, _ = _run(engine, [1, 2, 3])  # regenerate: the cache is trimmed back
    assert calls[0] == 1 and done.reused_tokens == 2


def test_recurrent_state_restores_the_prompt_snapshot_on_regenerate():
    engine = _engine(list(b"ok") + [EOS], 3, recurrent=True)
    _run(engine, [1, 2, 3])
    engine.model.calls.clear()
    text, done, _ = _run(engine, [1, 2, 3])
    assert text == "ok" and done.reused_tokens == 3 and engine.model.calls == [1, 1]  # no prefill: o, k
    engine.model.calls.clear()
    engine.model.prompt_len = 2
    _run(engine, [1, 5])  # diverges: a recurrent state cannot trim, so it starts over
    assert engine.model.calls[0] == 2
    # The first prompt's snapshot is still in the prompt cache: coming back to it runs no prompt token.
    engine.model.calls.clear()
    engine.model.prompt_len = 3
    text, done, _ = _run(engine, [1, 2, 3])
    assert text == "ok" and done.reused_tokens == 3 and engine.model.calls == [1, 1]


def test_stop_strings_unit():
    s = StopStrings(("END",))
    assert s.feed("abcE") == ("abc", False)
    assert s.feed("N") == ("", False)
    assert s.feed("Dx") == ("", True)


@pytest.fixture(scope="module")
def axiom_engine(fixtures_root):
    entry = load_catalog()["axiom"]
    model = load_model(fixtures_root / "axiom")
    entry = replace(entry, chat=replace(entry.chat, stop=("<|im_end|>",)))
    tok = ByteTokenizer({"<|im_end|>": 300, "<|endoftext|>": 301}, entry.chat)
    return Engine(model, tok, entry, torch.device("cpu"), torch.float32, 64)


def test_real_model_reuse_gives_the_same_tokens_as_a_fresh_run(axiom_engine, fixtures_root):
    from safetensors.torch import load_file

    g = load_file(str(fixtures_root / "axiom" / "golden.safetensors"))
    ids = g["input_ids"][0].tolist()
    _, _, first = _run(axiom_engine, ids, replace(GREEDY, max_new_tokens=16))
    assert [e.token_id for e in first] == g["greedy_ids"][0].tolist()
    extended = ids + [e.token_id for e in first[:8]]
    _, done, second = _run(axiom_engine, extended, replace(GREEDY, max_new_tokens=8))
    assert done.reused_tokens == len(extended) - 1
    assert [e.token_id for e in second] == g["greedy_ids"][0].tolist()[8:]


def test_memory_report(axiom_engine):
    m = axiom_engine.memory()
    assert m.weights == sum(p.numel() * 4 for p in axiom_engine.model.parameters())
    assert set(m.allocated) == {"kv"} and m.context_limit == 64 and m.device == "cpu"
    assert m.used["kv"] == m.context_used * 2 * 3 * 2 * 16 * 4


def test_the_engine_and_the_fake_fit_the_same_protocol():
    """The chat layer and the TUI see nothing else of an engine (contract.EngineProtocol)."""
    import inspect

    from chatapp.chat.fake import FakeEngine
    from chatapp.contract import EngineProtocol

    members = [n for n in EngineProtocol.__annotations__] + ["info", "generate", "cancel", "memory"]
    for engine in (_engine([EOS], 1), FakeEngine()):
        assert all(hasattr(engine, n) for n in members), type(engine).__name__
        params = list(inspect.signature(engine.generate).parameters)
        assert params == list(inspect.signature(EngineProtocol.generate).parameters)[1:]
        assert {"model_id", "device", "dtype", "context_limit"} <= set(engine.info())
