"""Exact replay of a reply from its run card (issue 15): regenerate it on the recorded path and say
*identical*, or name the first token that differs and the likely reason.

The run card (chat/session.py) records the model and revision, the checkpoint's sha256, dtype,
quantization, compiled or eager decode, the kernel choice (weight layouts and products, engine/kernels.py)
and thread count, the kernel family and machine, the seed and every sampling
setting, the complete controls (and any changed while the reply streamed, with the token where each
began) and the sha256 of the prompt ids. The replay renders the same conversation up to the reply's
parent (spliced reply ids included), checks that it gives the same prompt ids, and generates with the
recorded settings and controls. Torch-free: the caller loads the engine (cli/replay.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..contract import ControlChannel, Done, SamplingSettings, StepEvent, TokenDetail
from .conversation import Conversation, Message
from .session import Session, prompt_hash


@dataclass
class ReplayResult:
    """What a replay found.

    Attributes:
        identical: every recorded token came again, in order.
        compared: how many recorded tokens were compared (every generated part of the reply).
        index: the first differing token (0-based, in the whole reply), else None.
        recorded, replayed: (id, text) at that index; None where one side had ended.
        reasons: recorded path vs this one, most likely first (empty when nothing differs).
        prompt_same: whether the prompt rendered to the recorded ids (by their sha256).
    """

    identical: bool
    compared: int
    index: int | None = None
    recorded: tuple[int, str] | None = None
    replayed: tuple[int, str] | None = None
    reasons: list[str] = field(default_factory=list)
    prompt_same: bool = True


def pick_reply(conv: Conversation, message_id: str | None) -> Message:
    """The reply to replay: `message_id`, else the last reply on the branch on screen."""
    if message_id is not None:
        if message_id not in conv.messages:
            raise ValueError(f"no message {message_id!r} in this chat")
        msg = conv.get(message_id)
    else:
        msg = next((m for m in reversed(conv.path()) if m.role == "assistant"), None)
        if msg is None:
            raise ValueError("this chat has no reply to replay")
    if msg.role != "assistant" or not msg.run.get("settings") or msg.token_ids is None:
        raise ValueError(f"message {msg.id} is not a generated reply with a run card and token ids; "
                         "pick one with --message ID")
    return msg


def recorded_path(card: dict[str, Any]) -> dict[str, Any]:
    """How to load the engine as the run card says: model id, device kind, dtype, quantization, compile, the
    kernel choice ("auto" where the card has none) and the thread count (None: the default)."""
    engine = card.get("engine", {})
    compiled = str(engine.get("compile", "")).startswith("compiled")
    return {"model_id": card.get("model_id"), "device": str(engine.get("device", "cpu")).split(":")[0] or "cpu",
            "dtype": engine.get("dtype") or "auto", "quantize": engine.get("quantize", "none"),
            "compile": "on" if compiled else "off", "kernels": engine.get("kernels") or "auto",
            "threads": engine.get("threads")}


def replay(session: Session, conv: Conversation, msg: Message) -> ReplayResult:
    """Regenerate `msg` with `session`'s engine on its run cards' settings and controls; compare.

    A reply is one call or several: a branch's first tokens were chosen (Session.branch_at), the first call
    generated the rest of its first part, and each continuation (`continued`, one run card each) resumed
    from the text so far. Every generated part is replayed from its own prompt under its own card."""
    ids = list(msg.token_ids or [])
    compared, prompt_same, reasons = 0, True, []
    for card, start, end in _parts(msg.run, len(ids)):
        expected = ids[start:end]
        settings = _settings(card["settings"])
        # The prompt under the recorded budget (it decides what trimming leaves room for), the run to the
        # recorded tokens only.
        prompt = _branch_prompt(session, conv, msg, start, settings) if start else \
            session.prompt(conv, leaf=msg.parent_id, settings=settings)
        same = prompt_hash(prompt.ids) == card.get("prompt_sha256", prompt_hash(prompt.ids))
        prompt_same = prompt_same and same
        got = _generate(session, prompt.ids, settings.with_overrides(max_new_tokens=len(expected)), card)
        for i, want in enumerate(expected):
            have = got[i] if i < len(got) else None
            if have != want:
                tok = session.tokenizer
                return ReplayResult(False, compared + len(expected), start + i, (want, tok.decode([want])),
                                    None if have is None else (have, tok.decode([have])),
                                    _differences(card, session.info(), same) or
                                    [("nothing recorded differs: the same path chose another token (a "
                                      "nondeterministic kernel or thread count)")], prompt_same)
        compared += len(expected)
        reasons = reasons or _differences(card, session.info(), same)
    if not compared:
        raise ValueError(f"reply {msg.id} has no recorded tokens to compare")
    return ReplayResult(True, compared, reasons=reasons, prompt_same=prompt_same)


def _parts(card: dict[str, Any], total: int) -> list[tuple[dict[str, Any], int, int]]:
    """(run card, first token, end) of each generated part of a reply of `total` tokens: the first call's
    part (after a branch's chosen prefix), then one per continuation, in order. A continuation's card holds
    its own `new_tokens`; the top-level card's `new_tokens` is the sum over every call."""
    later = [(seg, int(seg.get("new_tokens", 0))) for seg in card.get("continued", [])]
    start = int(card["branched_from"]["prefix_tokens"]) if card.get("branched_from") else 0
    end = max(total - sum(n for _, n in later), start)
    parts = [(card, start, end)] if end > start else []
    for seg, n in later:
        if n > 0:
            parts.append((seg, end, min(end + n, total)))
        end = min(end + n, total)
    return parts


def _generate(session: Session, prompt_ids: list[int], settings: SamplingSettings, card: dict[str, Any]) -> list[int]:
    """The ids one call draws with the card's controls and the depth changes it recorded mid-reply."""
    controls = session.controls_for(Conversation(), card.get("controls", {}))
    channel = ControlChannel(schedule={int(c["token"]): dict(c["controls"]) for c in card.get("control_changes", [])})
    got: list[int] = []
    for ev in session.engine.generate(prompt_ids, settings, controls, detail=TokenDetail(), channel=channel):
        if isinstance(ev, StepEvent):
            got.append(ev.token_id)
        elif isinstance(ev, Done):
            break
    return got


def _branch_prompt(session: Session, conv: Conversation, msg: Message, start: int,
                   settings: SamplingSettings) -> Any:
    """The prompt a branch was continued from: the conversation with the reply's chosen prefix left open."""
    ids, content = msg.token_ids or [], msg.content
    specials = session.tokenizer.special_ids
    msg.token_ids, msg.content = ids[:start], session.tokenizer.decode([i for i in ids[:start] if i not in specials])
    try:
        return session.prompt(conv, continue_from=msg.id, settings=settings)
    finally:
        msg.token_ids, msg.content = ids, content


def _settings(recorded: dict[str, Any]) -> SamplingSettings:
    try:
        return SamplingSettings().with_overrides(**recorded)
    except TypeError as e:
        raise ValueError(f"the run card's settings are not this version's: {e}") from None


def _differences(card: dict[str, Any], info: dict[str, Any], prompt_same: bool) -> list[str]:
    """What differs between the recorded path and this one, the likeliest cause of a change first."""
    was, machine_was = card.get("engine", {}), card.get("engine", {}).get("machine", {})
    machine_now = info.get("machine", {})
    out = []

    def differ(what: str, old: Any, new: Any, short: bool = False) -> None:
        if old and new and old != new:
            out.append(f"different {what} (recorded {str(old)[:12] if short else old}, now "
                       f"{str(new)[:12] if short else new})")

    differ("checkpoint", was.get("checkpoint_sha256"), info.get("checkpoint_sha256"), short=True)
    differ("model", card.get("model_id"), info.get("model_id"))
    if not prompt_same:
        out.append("different prompt ids (the tokenizer or chat template changed)")
    differ("dtype", was.get("dtype"), info.get("dtype"))
    differ("quantization", was.get("quantize"), info.get("quantize"))
    differ("kernel family", machine_was.get("kernels"), machine_now.get("kernels"))
    differ("kernel choice", _paths(was.get("kernels")), _paths(info.get("kernels")))
    differ("decode step", str(was.get("compile", "")).split(" ")[0], str(info.get("compile", "")).split(" ")[0])
    differ("thread count", was.get("threads"), info.get("threads"))
    differ("machine", machine_was.get("cpu"), machine_now.get("cpu"))
    differ("torch", machine_was.get("torch"), machine_now.get("torch"))
    return out


def _paths(kernels: Any) -> str | None:
    """A kernel choice's paths without how it was reached (a measured and a cached choice are the same path)."""
    if not isinstance(kernels, dict) or "widening" not in kernels:
        return None
    return f"{kernels.get('dtype')} widening {kernels['widening']}, narrowing {kernels.get('narrowing')}"
