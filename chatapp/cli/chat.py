"""No subcommand: open the TUI, or with --prompt answer once on stdout (streamed).

The one-shot answer goes through the same chat Session as the TUI (chat template, settings and
controls merged by the contract, the engine's prompt cache); it stores the chat only with --save.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from ..contract import THREADS_ENV
from .common import EXIT_OK, EXIT_USAGE, CliError, memory_budget, read_text, resolve_entry, thread_count


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The top-level flags: model choice, the one-shot prompt, generation settings."""
    p.add_argument("--model", help="catalog id (see `smollchat models`) or a local model directory")
    p.add_argument("--system", help="system prompt for the new chat")
    p.add_argument("--prompt", help="answer this once on stdout and exit ('-' reads stdin)")
    p.add_argument("--stats", action="store_true", help="with --prompt: print timings to stderr")
    p.add_argument("--save", action="store_true", help="with --prompt: keep the chat in the chat store (opens in the TUI)")
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--show-probs", action="store_true",
                       help="with --prompt: colour each token by its probability (on a terminal; plain text otherwise)")
    shown.add_argument("--json", action="store_true",
                       help="with --prompt: one JSON object per token (text, id, prob, entropy, alternatives, steps), "
                            "then one for the end")
    p.add_argument("--fake", action="store_true",
                   help="open the TUI on a scripted fake engine (no model, no torch): try the interface")
    p.add_argument("--no-engine-process", dest="engine_process", action="store_false",
                   help="TUI: run the model in the app's own process (by default it runs in a child process, "
                        "so drawing the screen never slows generation)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="TUI: memory the loaded models may take together, e.g. 8GiB (default: 60%% of the memory "
                        "available at start); compare loads a second model only within it")
    g = p.add_argument_group("generation (defaults come from the model's catalog entry)")
    g.add_argument("--temperature", type=float, help="0 = greedy")
    g.add_argument("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass (1 = off)")
    g.add_argument("--min-p", type=float, help="drop tokens below min_p x the top probability (0 = off)")
    g.add_argument("--repetition-penalty", type=float, help="HF-style penalty on every token seen (1 = off)")
    g.add_argument("--no-repeat-ngram", type=int, help="ban repeating n-grams of this size (0 = off)")
    g.add_argument("--seed", type=int, help="sampling seed, for reproducible output")
    g.add_argument("--max-tokens", type=int, dest="max_new_tokens", help="new tokens at most")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--control", action="append", default=[], metavar="NAME=VALUE",
                   help="architecture compute control, e.g. num_steps=16 (repeatable)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    g.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="the decode step through torch.compile (auto: where it measured faster on this machine; a real-size "
                        "model's first load measures it, once)")
    g.add_argument("--eager", action="store_true", help="every fast path off: the reference numerics")
    g.add_argument("--quantize", choices=("none", "int8", "int4"), default=None,
                   help="weight-only quantization on CPU (default: the catalog's, none unless it says)")
    g.add_argument("--threads", type=thread_count, default=None,
                   help=f"the engine's intra-op threads (default: ${THREADS_ENV}, else the physical cores but one "
                        "for the interface, all of them on two cores or fewer)")


def run(args) -> int:
    if args.prompt is None and (args.show_probs or args.json):
        raise CliError("--show-probs and --json go with --prompt", EXIT_USAGE)
    if args.prompt is not None:
        if args.fake:
            raise CliError("--fake is for the TUI; --prompt needs a real model (--model ID)", EXIT_USAGE)
        if not args.model:
            raise CliError("--prompt needs --model (see `smollchat models`)", EXIT_USAGE)
        return run_prompt(args)
    return run_tui(args)


def _parse_controls(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise CliError(f"--control expects NAME=VALUE, got {item!r}", EXIT_USAGE)
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _settings(args) -> dict[str, Any]:
    """The sampling settings given on the command line (the chat's layer over the catalog's)."""
    given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "min_p": args.min_p,
             "repetition_penalty": args.repetition_penalty, "no_repeat_ngram": args.no_repeat_ngram,
             "seed": args.seed, "max_new_tokens": args.max_new_tokens,
             "stop_strings": list(args.stop) if args.stop else None}
    return {k: v for k, v in given.items() if v is not None}


def _check_eager(args) -> None:
    if args.eager and args.quantize not in (None, "none"):
        raise CliError("--eager runs the reference numerics, so it cannot be combined with --quantize", EXIT_USAGE)


def run_prompt(args) -> int:
    from ..chat.conversation import Conversation
    from ..chat.session import ContextOverflow, Session
    from ..contract import INSPECT_DETAIL, Done, resolve_controls
    from ..engine.loader import LoadError
    from ..engine.runtime import load_engine
    from ..engine.tokenizer import TokenizerError
    from .token_view import TokenWriter, legend

    entry = resolve_entry(args.model)
    conv = Conversation(system_prompt=args.system, settings=_settings(args), controls=_parse_controls(args.control))
    try:
        entry.sampling().with_overrides(**conv.settings).validate()  # before a model loads for nothing
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    _check_eager(args)
    text = read_text(args.prompt)
    if entry.demo:
        print(f"[{entry.id}: random weights — the output is noise, for trying smollchat offline]", file=sys.stderr)
    try:
        engine = load_engine(entry, device=args.device, dtype=args.dtype,
                             compile="off" if args.eager else args.compile,
                             quantize="none" if args.eager else args.quantize,
                             kernels="reference" if args.eager else "auto", threads=args.threads)
    except (LoadError, TokenizerError, ValueError) as e:
        raise CliError(str(e)) from None
    store = _open_store() if args.save else None
    # The alternatives only where they are kept or shown: --json, or a saved chat (the TUI's inspector).
    session = Session(engine, store=store, inspect=INSPECT_DETAIL if args.json or args.save else None)
    try:
        session.settings_for(conv)
        # The chat's layer tolerates other models' controls; names given here must be this model's.
        resolve_controls(engine.controls, entry.controls, call=conv.controls)
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    done = None
    writer = TokenWriter("json" if args.json else "probs" if args.show_probs else "plain", sys.stdout, engine.tokenizer)
    if writer.mode == "probs":
        print(legend(), file=sys.stderr)
    try:
        for ev in session.stream(conv, conv.add(None, "user", text).id):
            if isinstance(ev, Done):
                done = ev
            writer.write(ev)
    except ContextOverflow as e:
        raise CliError(str(e)) from None
    except TokenizerError as e:
        raise CliError(str(e)) from None
    finally:
        if store is not None:
            store.close()
    writer.end()
    if done is not None and done.stop_reason == "context_full" and done.new_tokens == 0:
        raise CliError(f"context full: {done.detail}")
    if args.stats and done is not None:
        print(f"[{done.new_tokens} tokens, stop: {done.stop_reason}, ttft {done.ttft_s * 1000:.0f} ms, "
              f"prefill {done.prefill_tok_s:.1f} tok/s, decode {done.decode_tok_s:.1f} tok/s, "
              f"{engine.compile.label}]", file=sys.stderr)
    if store is not None:
        print(f"[saved as chat {conv.id}]", file=sys.stderr)
    return EXIT_OK


def _open_store():
    from ..chat.store import Store, StoreError

    try:
        return Store()
    except StoreError as e:
        raise CliError(f"--save: {e}") from None


def run_tui(args) -> int:
    try:
        from ..tui.app import make_app
    except ImportError as e:
        raise CliError(f"the TUI cannot start: {e}") from None
    from ..tui.backend import LoadOptions

    _check_eager(args)
    engine = None
    if args.fake:
        # In this process: the scripted engine paces itself at 40 tok/s, which no UI slows, and its word
        # tokenizer hands out ids as it meets words, so a copy in another process would disagree.
        from ..chat.fake import scripted_demo
        engine = scripted_demo()
    options = LoadOptions(device=args.device, dtype=args.dtype, compile=args.compile, eager=args.eager,
                          quantize=args.quantize, engine_process=args.engine_process, threads=args.threads)
    make_app(engine=engine, model_id=None if args.fake else args.model, system_prompt=args.system,
             load_options=options, memory_budget=memory_budget(args.memory_budget)).run()
    return EXIT_OK
