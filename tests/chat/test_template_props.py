"""Property test: no text in any message, of any content, ever becomes a special token of the prompt.

Runs on the tokenizers of the demo models (cl100k_base for Axiom, the byte tokenizers with each
model's specials for the others), so it needs no download. The messages are drawn with the models'
own special strings and pieces of them mixed into arbitrary text."""
from __future__ import annotations

from functools import lru_cache

from hypothesis import given
from hypothesis import strategies as st

from chatapp.catalog import load_catalog
from chatapp.engine.tokenizer import Tokenizer, load_tokenizer
from props import PROPS

DEMOS = sorted(k for k, e in load_catalog().items() if e.demo)


@lru_cache(maxsize=None)
def tokenizer(model_id: str) -> Tokenizer:
    return load_tokenizer(load_catalog()[model_id])


@st.composite
def hostile_text(draw, specials: list[str]) -> str:
    """Text with special strings, halves of them and neighbours of their characters mixed in."""
    atoms = st.sampled_from(specials) | st.sampled_from([s[:len(s) // 2] for s in specials] +
                                                        [s[len(s) // 2:] for s in specials]) | st.text(max_size=8)
    return "".join(draw(st.lists(atoms, max_size=6)))


@st.composite
def prompts(draw):
    model_id = draw(st.sampled_from(DEMOS))
    tok = tokenizer(model_id)
    specials = sorted(tok.specials)
    n = draw(st.integers(1, 5))
    roles = (["system"] if draw(st.booleans()) else []) + ["user" if i % 2 == 0 else "assistant" for i in range(n)]
    msgs = [{"role": r, "content": draw(hostile_text(specials))} for r in roles]
    system = draw(st.none() | hostile_text(specials))
    open_last = roles[-1] == "assistant" and draw(st.booleans())
    return model_id, msgs, system, open_last


def _special_ids(tok: Tokenizer, ids: list[int]) -> list[int]:
    return [i for i in ids if i in tok.special_ids]


@PROPS
@given(prompts())
def test_message_text_never_becomes_a_special_token(case):
    model_id, msgs, system, open_last = case
    tok = tokenizer(model_id)
    ids = tok.render(msgs, add_generation_prompt=not open_last, system=system, open_last=open_last)
    # The same conversation with a neutral "x" for every text (and a system block exactly where the real one
    # has one): every special id must come from the format's templates.
    effective = system if system is not None else msgs[0]["content"] if msgs[0]["role"] == "system" else None
    effective = tok.chat.default_system if effective is None else effective
    neutral = [{**m, "content": "x"} for m in msgs]
    template_only = tok.render(neutral, add_generation_prompt=not open_last, system="x" if effective else "",
                               open_last=open_last)
    assert _special_ids(tok, ids) == _special_ids(tok, template_only)
    # And the ids say exactly what the rendered text says (no text lost, none turned into a token).
    assert tok.decode(ids) == tok.render_text(msgs, add_generation_prompt=not open_last, system=system,
                                              open_last=open_last)
    assert all(0 <= i < tok.vocab_size for i in ids)
