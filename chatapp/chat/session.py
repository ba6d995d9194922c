"""A loaded engine bound to conversations: prompt building, streaming into the tree, run cards.

The session renders a conversation to ids and records results; what the engine reuses of earlier
prompts is the engine's prompt cache alone. Prompts are rendered with the model's own chat format
(`tokenizer.render`), with one refinement: the ids an assistant reply was generated as are spliced
back in verbatim instead of re-encoding its text (when they still spell it and fit the vocabulary),
so the engine sees every new prompt as an extension of a state it passed through (re-encoding could
pick different BPE merges and force a full re-prefill). When the context would overflow, the oldest
whole turns are left out (templates are rendered whole, so a header is never cut), with headroom and a
start that stays put over the next turns, and the prompt says what was dropped. `complete` streams a
reply to raw text (no chat template), for callers such as an OpenAI-style completions endpoint.
"""
from __future__ import annotations

import hashlib
import random
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterator, Mapping, Sequence

from ..catalog import ModelEntry
from ..contract import (INSPECT_DETAIL, RUN_CARD_DETAIL, ControlChannel, ControlSpec, Controls, Done, EngineProtocol,
                        MemoryReport, SamplingSettings, StepEvent, TokenDetail, check_live, resolve_controls)
from . import token_record
from .conversation import Conversation, Message
from .presets import builtin_preset

_SETTING_NAMES = frozenset(f.name for f in fields(SamplingSettings))
#: How often (seconds) a streaming reply is written to the store.
SAVE_EVERY_S = 0.5
#: Rendered prompt prefixes kept (the next turn, a regenerate and a trimmed view each reuse one).
MEMO_SIZE = 8
#: Share of the context left free when turns must be dropped, so the next turns keep the same start.
TRIM_HEADROOM = 0.25


class ContextOverflow(ValueError):
    """Even the latest turn alone does not fit the model's context."""


@dataclass
class Prompt:
    """A rendered prompt and how it was made.

    Attributes:
        ids: the token ids sent to the engine.
        messages: the messages rendered (the path minus what was left out).
        dropped: ids of the oldest messages left out to fit the context.
        dropped_turns: how many whole turns that was.
        reused: ids of assistant replies whose generated token ids were spliced in verbatim.
        reserve: tokens kept free for the reply when trimming.
    """

    ids: list[int]
    messages: list[Message]
    dropped: list[str] = field(default_factory=list)
    dropped_turns: int = 0
    reused: list[str] = field(default_factory=list)
    reserve: int = 0


class Session:
    """One engine (real or fake) serving any number of conversations.

    Args:
        engine: anything that fits `contract.EngineProtocol`.
        tokenizer: the engine's tokenizer (`engine.tokenizer` when omitted).
        entry: the catalog entry (defaults, chat format, revision); `engine.entry` when omitted.
        store: when given, the chat is saved as the reply streams (every SAVE_EVERY_S) and at the end,
            and presets named in a chat's settings are read from it.
        inspect: the per-token figures each reply keeps for the token inspector (chat/token_record.py,
            stored with the reply); None keeps only the run card's. Asking costs a few passes over the
            vocabulary per token (engine/token_detail.detail_cost measures it).
    """

    def __init__(self, engine: EngineProtocol, tokenizer: Any = None, entry: ModelEntry | None = None, *,
                 store: Any = None, inspect: TokenDetail | None = INSPECT_DETAIL) -> None:
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else engine.tokenizer
        self.entry: ModelEntry = entry if entry is not None else engine.entry
        self.store = store
        self.last_prompt: Prompt | None = None
        self.inspect = inspect
        self._records: OrderedDict[str, dict[str, Any]] = OrderedDict()  # the latest replies' token records
        self._cancel = threading.Event()
        self._channel: ControlChannel | None = None
        self._memo: OrderedDict[int, tuple[list[int], list[str], list | None]] = OrderedDict()
        self._trim_starts: dict[str, str] = {}  # chat id -> first message kept by the last trimmed prompt

    # Settings.
    def settings_for(self, conv: Conversation) -> SamplingSettings:
        """Catalog defaults, then the chat's preset (`settings["preset"]`: a built-in, else one saved in the
        store), then the chat's own overrides."""
        settings = self.entry.sampling()
        overrides = dict(conv.settings)
        preset = overrides.pop("preset", None)
        layers: list[dict[str, Any]] = []
        found = builtin_preset(preset) if preset else None
        if found is not None:
            layers.append(found)
        elif preset:
            if self.store is None:
                raise ValueError(f"this chat uses preset {preset!r}, but the session has no store to read it from")
            found = self.store.get_preset(preset)
            if found is None:
                raise ValueError(f"preset {preset!r} does not exist (any more); pick another in the chat settings")
            layers.append(found)
        layers.append(overrides)
        for layer in layers:
            unknown = set(layer) - _SETTING_NAMES
            if unknown:
                raise ValueError(f"unknown sampling setting(s): {', '.join(sorted(unknown))}")
            settings = settings.with_overrides(**layer)
        settings.validate()
        return settings

    def controls_for(self, conv: Conversation, call: dict[str, Any] | None = None) -> Controls:
        """Every control this model declares: architecture < catalog entry < chat < `call` (contract)."""
        return resolve_controls(self.engine.controls, self.entry.controls, conv.controls, call)

    # Prompts.
    def prompt_ids(self, conv: Conversation, leaf: str | None = None) -> list[int]:
        """Ids of the path root..leaf ready for a reply (see `prompt` for the details)."""
        return self.prompt(conv, leaf).ids

    def prompt(self, conv: Conversation, leaf: str | None = None, continue_from: str | None = None,
               settings: SamplingSettings | None = None) -> Prompt:
        """Render root..leaf with the generation prompt, or root..continue_from left open.

        Leaves room for `settings.max_new_tokens` (at most half the context) by dropping the oldest
        whole turns; raises ContextOverflow when the latest turn alone does not fit.
        """
        if continue_from is not None:
            return self._build(conv, conv.path(continue_from), False, True, settings)
        return self._build(conv, conv.path(leaf) if leaf is not None or conv.current_leaf else [], True, False,
                           settings)

    def _build(self, conv: Conversation, path: list[Message], gen: bool, open_last: bool,
               settings: SamplingSettings | None) -> Prompt:
        settings = settings or self.settings_for(conv)
        limit = self.engine.context_limit
        reserve = min(settings.max_new_tokens, limit // 2)
        system = conv.system_prompt
        n_sys = next((i for i, m in enumerate(path) if m.role != "system"), len(path))
        head, body = path[:n_sys], path[n_sys:]
        starts = [i for i, m in enumerate(body) if m.role == "user" and i > 0]

        def render(k: int) -> tuple[list[Message], list[int], list[str]]:
            # k = how many of the oldest turns to leave out.
            kept = head + (body[starts[k - 1]:] if k else body)
            ids, reused = self._render(kept, gen, open_last, system)
            return kept, ids, reused

        kept, ids, reused = render(0)
        k = 0
        if len(ids) + reserve > limit and starts:
            tried: dict[int, tuple[list[Message], list[int], list[str]]] = {}

            def size(n: int) -> int:
                if n not in tried:
                    tried[n] = render(n)
                return len(tried[n][1]) + reserve

            # Keep the start of the last trimmed prompt while it fits: the engine's state then still
            # holds that prompt, and a recurrent state can continue instead of starting over.
            sticky = next((j + 1 for j, i in enumerate(starts) if body[i].id == self._trim_starts.get(conv.id)), 0)
            if sticky and size(sticky) <= limit:
                k = sticky
            else:
                # Otherwise drop the fewest oldest turns that leave headroom for the next turns.
                guesses = self._turn_sizes(body, starts)
                k = (_fewest(size, guesses, len(ids) + reserve, limit - int(limit * TRIM_HEADROOM))
                     or _fewest(size, guesses, len(ids) + reserve, limit) or len(starts))
            self._trim_starts[conv.id] = body[starts[k - 1]].id
            size(k)
            kept, ids, reused = tried[k]
        if len(ids) >= limit:
            raise ContextOverflow(
                f"The latest message needs {len(ids)} tokens but {self.entry.name} holds {limit}; "
                "shorten it (or the system prompt) and send again.")
        kept_ids = {m.id for m in kept}
        dropped = [m.id for m in path if m.id not in kept_ids]
        self.last_prompt = Prompt(ids, kept, dropped, k, reused, reserve)
        return self.last_prompt

    def _turn_sizes(self, body: list[Message], starts: list[int]) -> list[int]:
        """Tokens of each droppable turn rendered alone (a guess of what dropping it saves)."""
        bounds = [0, *starts]
        return [len(self.tokenizer.render(_dicts(body[bounds[t]:bounds[t + 1]]), add_generation_prompt=False,
                                          system="")) for t in range(len(starts))]

    def _render(self, msgs: Sequence[Message], gen: bool, open_last: bool, system: str | None
                ) -> tuple[list[int], list[str]]:
        """Ids of msgs with reusable reply ids spliced in; returns (ids, ids of the reused replies)."""
        tok = self.tokenizer
        dicts = _dicts(msgs)

        def plain() -> tuple[list[int], list[str]]:
            return tok.render(dicts, add_generation_prompt=gen, system=system, open_last=open_last), []

        # keys[k] names the prefix msgs[:k + 1]; the ids up to a splice point depend on nothing else.
        keys, key = [], hash(("system", system))
        for m in msgs:
            key = hash((key, m.id, m.role, m.content, len(m.token_ids or ())))
            keys.append(key)
        ids: list[int] = []
        reused: list[str] = []
        opened: list | None = None
        start = 0
        for k in range(len(msgs) - 1, -1, -1):
            if keys[k] in self._memo:
                # The last prompt's splice points are still valid: start after them.
                ids, reused, opened = self._memo[keys[k]]
                ids, reused, start = list(ids), list(reused), k + 1
                self._memo.move_to_end(keys[k])
                break
        last_splice = None
        for k in range(start, len(msgs)):
            generated = self._reusable(msgs[k])
            if generated is None:
                continue
            before = _after(opened, tok.render_parts(dicts[:k], add_generation_prompt=True, system=system))
            if before is None:
                return plain()
            ids += self._encode(before) + generated
            opened = tok.render_parts(dicts[:k + 1], add_generation_prompt=False, system=system, open_last=True)
            reused.append(msgs[k].id)
            last_splice = k
        if last_splice is not None:
            self._memo[keys[last_splice]] = (list(ids), list(reused), opened)
            while len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)
        rest = _after(opened, tok.render_parts(dicts, add_generation_prompt=gen, system=system, open_last=open_last))
        if rest is None:
            return plain()
        return ids + self._encode(rest), reused

    def _reusable(self, m: Message) -> list[int] | None:
        """A reply's generated ids without the trailing stop token, if they fit this model's vocabulary
        (an imported chat or another model's reply may hold any ids) and still spell its text."""
        if m.role != "assistant" or not m.token_ids:
            return None
        ids = list(m.token_ids)
        vocab, specials = self.tokenizer.vocab_size, self.tokenizer.special_ids
        if not all(isinstance(i, int) and (0 <= i < vocab or i in specials) for i in ids):
            return None
        try:
            stops = set(self.tokenizer.stop_ids)
        except Exception:
            stops = set()
        while ids and ids[-1] in stops:
            ids.pop()
        # Specials the model emitted mid-reply are not shown (the stream skips them) but stay in the ids.
        return ids if self.tokenizer.decode([i for i in ids if i not in specials]) == m.content else None

    def _encode(self, parts: Sequence[str | int]) -> list[int]:
        out: list[int] = []
        for p in parts:
            if isinstance(p, int):
                out.append(p)
            elif p:
                out.extend(self.tokenizer.encode(p, allow_special=False))
        return out

    def context_usage(self, conv: Conversation, leaf: str | None = None) -> tuple[int, int]:
        """(tokens the next prompt would use, the model's context) for the context meter."""
        try:
            return len(self.prompt(conv, leaf).ids), self.engine.context_limit
        except ContextOverflow:
            return self.engine.context_limit, self.engine.context_limit

    # Generation.
    def stream(self, conv: Conversation, parent_id: str | None, continue_from: str | None = None,
               channel: ControlChannel | None = None, *, _branch: dict[str, Any] | None = None
               ) -> Iterator[StepEvent | Done]:
        """Generate a reply under `parent_id` (a new assistant message, the new current leaf), or append
        to the reply `continue_from`; yields the engine's StepEvents and its final Done.

        With a `channel`, `change_controls` changes the reply's controls while it streams (from the next
        token on; the run card's "control_changes" records each with the token where it began). Without
        one the engine may draft ahead (Huginn's speculative greedy), which a change would overtake.

        The message's text, token ids and run card fill in as tokens arrive. Stopping (`cancel()`, or
        closing this generator) keeps the partial reply, marked "stopped"; an engine error marks it
        "error", saves it and re-raises.
        """
        self._cancel = cancel = threading.Event()  # this reply's own: a late stop of another one cannot reach it
        self._channel = channel
        settings = self.settings_for(conv)
        if settings.seed is None:
            # The run card must name the seed, so a replay draws the same tokens.
            settings = settings.with_overrides(seed=random.SystemRandom().randrange(2**31))
        controls = self.controls_for(conv)
        if continue_from is not None:
            msg = conv.get(continue_from)
            if msg.role != "assistant":
                raise ValueError("only an assistant reply can be continued")
            if parent_id is not None and parent_id != msg.parent_id:
                raise ValueError("continue_from must be a child of parent_id")
            if conv.children(msg.id):
                raise ValueError("this reply already has answers below it; continue the last reply of a branch")
            prompt = self.prompt(conv, continue_from=msg.id, settings=settings)
        else:
            prompt = self._build(conv, conv.path(parent_id) if parent_id else [], True, False, settings)
        segment = self._run_card(conv, settings, controls, prompt)
        if _branch is not None:
            # A branch (branch_at) is a new reply whose first tokens were chosen: this is its first run card.
            msg.status = "streaming"
            msg.run = {**segment, **_branch}
            conv.current_leaf = msg.id
        elif continue_from is not None:
            msg.status = "streaming"
            msg.run.setdefault("continued", []).append(segment)
            conv.current_leaf = msg.id
        else:
            msg = conv.add(parent_id, "assistant", "", status="streaming", run=dict(segment), token_ids=[])
        if conv.model_id is None:
            conv.model_id = self.entry.id
        per_token = msg.run.setdefault("tokens", {"logprob": [], "entropy": []})
        want = RUN_CARD_DETAIL
        record = None
        if self.inspect is not None:
            want = TokenDetail(True, True, max(want.alternatives, self.inspect.alternatives), self.inspect.final)
            record = token_record.new_record(want)
            if continue_from is not None:
                # A continued reply keeps its record only if that covers every token so far, alike.
                earlier = self._records.pop(msg.id, None) or self.token_record(conv, msg.id)
                same = earlier is not None and earlier["distribution"] == record["distribution"]
                record = earlier if same and len(earlier["ids"]) == len(msg.token_ids or ()) else None
            if record is not None:
                self._remember(msg.id, record)
        if self.store is not None:
            self.store.save(conv)
        last_save = time.monotonic()
        # Only a caller that wants live changes passes a channel (an engine wrapper may not take one).
        live = {"channel": channel} if channel is not None else {}
        events = self.engine.generate(prompt.ids, settings, controls, cancel=cancel, detail=want, **live)
        changes_at = segment if continue_from is not None and _branch is None else msg.run
        index = 0
        try:
            for ev in events:
                if isinstance(ev, Done):
                    self._finish(conv, msg, ev, segment)
                    yield ev
                    return
                msg.content += ev.text
                if msg.token_ids is not None:
                    msg.token_ids.append(ev.token_id)
                per_token["logprob"].append(round(ev.logprob, 4))
                per_token["entropy"].append(round(ev.entropy, 4))
                if ev.steps is not None:
                    msg.run.setdefault("steps", []).append(ev.steps)
                if record is not None:
                    token_record.add(record, ev)
                if ev.controls_changed:
                    changes_at.setdefault("control_changes", []).append(
                        {"token": index, "controls": dict(ev.controls_changed)})
                index += 1
                if self.store is not None and time.monotonic() - last_save >= SAVE_EVERY_S:
                    self.store.save_message(conv.id, msg)
                    last_save = time.monotonic()
                yield ev
        except Exception as e:
            msg.status = "error"
            msg.run["stop_reason"] = "error"
            msg.run["error"] = f"{type(e).__name__}: {e}"
            self._save_end(conv, msg)
            raise
        finally:
            events.close()
            if msg.status == "streaming":
                # The consumer stopped iterating before Done: keep what arrived, marked stopped.
                cancel.set()
                msg.status = "stopped"
                msg.run["stop_reason"] = "cancelled"
                self._save_end(conv, msg)

    def complete(self, text: str, settings: SamplingSettings | None = None, controls: Mapping[str, Any] | None = None,
                 *, cancel: threading.Event | None = None, detail: TokenDetail = TokenDetail()
                 ) -> Iterator[StepEvent | Done]:
        """Continue raw `text` (no chat template; the format's BOS, if any, leads): the path of a
        completions endpoint. Settings and controls are merged over the catalog's; nothing is stored."""
        settings = self.entry.sampling() if settings is None else settings
        settings.validate()
        ids = self._encode([*self.tokenizer.split_specials(self.entry.chat.bos), text])
        if not text or not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.engine.context_limit:
            raise ContextOverflow(f"The prompt needs {len(ids)} tokens but {self.entry.name} holds "
                                  f"{self.engine.context_limit}; shorten it.")
        resolved = resolve_controls(self.engine.controls, self.entry.controls, call=controls)
        return self.engine.generate(ids, settings, resolved, cancel=cancel, detail=detail)

    def branch_at(self, conv: Conversation, message_id: str, index: int, token_id: int | Sequence[int] | None,
                  channel: ControlChannel | None = None) -> Iterator[StepEvent | Done]:
        """A new sibling of the reply `message_id` that keeps its tokens before `index`, puts `token_id`
        there (an alternative the inspector shows, or any id; a sequence of ids: a typed replacement;
        None: nothing, so the model draws token `index` anew, e.g. under the other compute controls the
        chat now has) and continues from it; streams like `stream`.

        The engine's prompt cache skips what it holds of that prefix (a KV cache is trimmed to it; a
        recurrent state resumes from its nearest snapshot: the prompt's end or one taken inside the reply):
        Done.reused_tokens and the run card say how much. The run card's "branched_from" names the source
        reply, the index and the chosen (a list for a typed replacement) and replaced ids.
        """
        src = conv.get(message_id)
        tok = self.tokenizer
        if src.role != "assistant" or not src.token_ids:
            raise ValueError("branch at a token works on a generated reply with its token ids")
        if not 0 <= index < len(src.token_ids):
            raise ValueError(f"token {index} is outside this reply's {len(src.token_ids)} tokens (0-based)")
        chosen = [] if token_id is None else [token_id] if isinstance(token_id, int) else list(token_id)
        if token_id is not None and not chosen:
            raise ValueError("the replacement is empty: type some text, or pick an alternative")
        for t in chosen:
            if isinstance(t, bool) or not isinstance(t, int) or not (0 <= t < tok.vocab_size or t in tok.special_ids):
                raise ValueError(f"token id {t!r} is not in {self.entry.name}'s vocabulary")
            if t in set(tok.stop_ids):
                raise ValueError("that token ends the reply: there is nothing to continue after it")
        ids = [*src.token_ids[:index], *chosen]
        text = tok.decode([i for i in ids if i not in tok.special_ids])
        before = tok.decode([i for i in ids[:index] if i not in tok.special_ids])
        new = conv.add(src.parent_id, "assistant", text, status="stopped", token_ids=ids)
        picked: Any = chosen[0] if isinstance(token_id, int) else (chosen or None)
        branch: dict[str, Any] = {"branched_from": {"message": src.id, "token": index, "chosen": picked,
                                                    "replaced": src.token_ids[index], "prefix_tokens": len(ids)},
                                  "tokens": {"logprob": [None] * len(ids), "entropy": [None] * len(ids)}}
        record = self.token_record(conv, src.id)
        if record is not None and len(record["ids"]) == len(src.token_ids):
            record = token_record.branch(record, index, chosen, text[len(before):] if text.startswith(before) else "")
            self._remember(new.id, record)
            branch["tokens"] = {"logprob": list(record["logprob"]), "entropy": list(record["entropy"])}
        steps = src.run.get("steps")
        if steps and len(steps) == len(src.token_ids) and len(chosen) <= 1:
            # The forward that gave token `index` its distribution ran for the chosen token too.
            branch["steps"] = list(steps[:index + len(chosen)])
        return self.stream(conv, src.parent_id, continue_from=new.id, channel=channel, _branch=branch)

    def keep(self, conv: Conversation, reply: Message, store: Any = None, note: Mapping[str, Any] | None = None
             ) -> Message:
        """Put a finished reply this session streamed on a scratch copy of `conv` (a compare run) into `conv`
        under the same parent: a new sibling with its text, token ids, run card (plus `note` as the card's
        "compare" entry) and token record, saved to `store` (this session's when None); the new current leaf."""
        if reply.role != "assistant" or reply.status == "streaming":
            raise ValueError("only a finished reply can be kept")
        if reply.parent_id is None or reply.parent_id not in conv.messages:
            raise ValueError("the reply answers a message this chat does not have (any more)")
        run = {**reply.run, **({"compare": dict(note)} if note else {})}
        kept = conv.add(reply.parent_id, "assistant", reply.content, status=reply.status, run=run,
                        token_ids=None if reply.token_ids is None else list(reply.token_ids),
                        **({} if reply.id in conv.messages else {"id": reply.id}))
        if conv.model_id is None:
            conv.model_id = self.entry.id
        conv.touch()
        store = store if store is not None else self.store
        record = self._records.get(reply.id)
        if store is not None:
            store.save(conv)
            if record is not None:
                store.save_token_record(kept.id, record)
        if record is not None:
            self._remember(kept.id, record)
        return kept

    def regenerate(self, conv: Conversation, message_id: str) -> Iterator[StepEvent | Done]:
        """A new sibling reply for the assistant message `message_id` (the old one stays)."""
        msg = conv.get(message_id)
        if msg.role != "assistant":
            raise ValueError("regenerate works on an assistant reply")
        return self.stream(conv, msg.parent_id)

    def cancel(self) -> None:
        """Stop the reply being streamed before its next token (the partial text is kept)."""
        self._cancel.set()

    def change_controls(self, values: Mapping[str, Any]) -> None:
        """Change controls of the reply streaming now, from its next token on (it must have been started
        with a ControlChannel); ValueError for a name or value this model refuses."""
        resolve_controls(self.engine.controls, call=values)
        check_live(tuple(self.engine.controls), values)
        if self._channel is None:
            raise ValueError("this reply was started without a control channel; the change applies from the next reply")
        self._channel.set(values)

    def memory(self) -> MemoryReport:
        return self.engine.memory()

    def info(self) -> dict[str, Any]:
        """The engine's figures for the UI (see contract.EngineProtocol.info)."""
        return dict(self.engine.info())

    @property
    def controls(self) -> tuple[ControlSpec, ...]:
        """The compute controls this model declares (the TUI renders its panel from these)."""
        return tuple(self.engine.controls)

    @property
    def context_limit(self) -> int:
        return self.engine.context_limit

    # Run cards.
    def _run_card(self, conv: Conversation, settings: SamplingSettings, controls: Controls,
                  prompt: Prompt) -> dict[str, Any]:
        e = self.entry
        eng = self.engine
        info = eng.info()
        return {
            "model_id": e.id, "model_name": e.name,
            "revision": e.source.revision if e.source else None,
            "demo": e.demo,
            **({"demo_seed": e.demo_seed} if e.demo else {}),
            "app_version": _app_version(),
            # What else decides the tokens, for an exact replay (chat/replay.py): the weights, their
            # quantization, compiled or eager decode, the kernel choice and threads, the kernel family and machine.
            "engine": {"device": info.get("device", ""), "dtype": info.get("dtype", ""),
                       "context_limit": eng.context_limit, "quantize": info.get("quantize", "none"),
                       "compile": info.get("compile", ""), "kernels": dict(info.get("kernels") or {}),
                       "threads": info.get("threads"), "checkpoint_sha256": info.get("checkpoint_sha256", ""),
                       "machine": dict(info.get("machine", {}))},
            "settings": _jsonable(asdict(settings)),
            "seed": settings.seed,
            "controls": dict(controls),
            "system_prompt": conv.system_prompt if conv.system_prompt is not None else e.chat.default_system,
            "prompt_tokens": len(prompt.ids),
            "prompt_sha256": prompt_hash(prompt.ids),
            "context": {"dropped_messages": list(prompt.dropped), "dropped_turns": prompt.dropped_turns,
                        "reused_replies": len(prompt.reused)},
            "started_at": time.time(),
        }

    def _finish(self, conv: Conversation, msg: Message, done: Done, segment: dict[str, Any]) -> None:
        msg.content += done.text
        msg.status = "stopped" if done.stop_reason == "cancelled" else "ok"
        result = {
            "stop_reason": done.stop_reason, "detail": done.detail, "new_tokens": done.new_tokens,
            "reused_tokens": done.reused_tokens, "finished_at": time.time(),
            "timings": {"ttft_s": done.ttft_s, "prefill_tok_s": done.prefill_tok_s, "decode_tok_s": done.decode_tok_s},
        }
        segment.update(result)
        if "continued" in msg.run:
            total = msg.run.get("new_tokens", 0) + done.new_tokens
            msg.run.update(result, new_tokens=total)
        else:
            msg.run.update(result)
        self._save_end(conv, msg)

    def _save_end(self, conv: Conversation, msg: Message) -> None:
        conv.touch()
        if self.store is not None:
            self.store.save_message(conv.id, msg, current_leaf=conv.current_leaf)
            record = self._records.get(msg.id)
            if record is not None:
                self.store.save_token_record(msg.id, record)

    # Token records.
    def token_record(self, conv: Conversation, message_id: str) -> dict[str, Any] | None:
        """A reply's per-token record (chat/token_record.py) from this session or the store; None when the
        reply was generated without one (or another program wrote it)."""
        record = self._records.get(message_id)
        if record is None and self.store is not None and message_id in conv.messages:
            record = self.store.token_records([message_id]).get(message_id)
        return record

    def _remember(self, message_id: str, record: dict[str, Any]) -> None:
        self._records[message_id] = record
        self._records.move_to_end(message_id)
        while len(self._records) > MEMO_SIZE:
            self._records.popitem(last=False)


def prompt_hash(ids: Sequence[int]) -> str:
    """sha256 of a prompt's token ids (a run card names its prompt by it)."""
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def _after(opened: list | None, full: list) -> list | None:
    """The parts of `full` that follow the open render `opened` (None if `full` does not extend it)."""
    if not opened:
        return list(full)
    n = len(opened)
    if len(full) < n or full[:n - 1] != opened[:n - 1]:
        return None
    last, same = opened[-1], full[n - 1]
    if isinstance(last, int) or isinstance(same, int):
        return list(full[n:]) if last == same else None
    if not same.startswith(last):
        return None
    rest = same[len(last):]
    return ([rest] if rest else []) + list(full[n:])


def _fewest(size: Any, guesses: list[int], total: int, target: int) -> int | None:
    """The fewest oldest turns (>= 1) whose removal brings size(n) to `target`, or None.

    `guesses` (each turn's size alone) give a first n; real sizes then confirm it, usually in one or
    two renders. size(n) falls as n grows.
    """
    k = 0
    while k < len(guesses) and total > target:
        total -= guesses[k]
        k += 1
    k = min(max(k, 1), len(guesses))
    while k < len(guesses) and size(k) > target:
        k += 1
    while k > 1 and size(k - 1) <= target:
        k -= 1
    return k if size(k) <= target else None


def _app_version() -> str:
    try:
        from importlib.metadata import version
        return version("smollchat")
    except Exception:
        return "unknown"


def _dicts(msgs: Sequence[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in msgs]


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
