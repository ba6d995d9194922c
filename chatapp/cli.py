"""Command line: `smollchat` (TUI), one-shot answers, and the model/fixture subcommands.

    smollchat [--model ID|DIR] [--system TEXT]            open the TUI
    smollchat --model ID --prompt TEXT|- [flags]          answer once on stdout (streamed)
    smollchat models | download ID | tokenize | verify DIR | selftest ID

torch is imported only by the commands that run a model, so `models`, `tokenize` and the TUI's
first frame start fast.
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit code attached."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def _add_model_flags(p: argparse.ArgumentParser) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smollchat", description="Chat with small experimental language models.")
    p.add_argument("--model", help="catalog id (see `smollchat models`) or a local model directory")
    p.add_argument("--system", help="system prompt for the new chat")
    p.add_argument("--prompt", help="answer this once on stdout and exit ('-' reads stdin)")
    p.add_argument("--stats", action="store_true", help="with --prompt: print timings to stderr")
    p.add_argument("--fake", action="store_true",
                   help="open the TUI on a scripted fake engine (no model, no torch): try the interface")
    _add_model_flags(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    m = sub.add_parser("models", help="list the catalog")
    m.add_argument("--json", action="store_true")

    d = sub.add_parser("download", help="download a model into the Hugging Face cache")
    d.add_argument("model_id")

    t = sub.add_parser("tokenize", help="show how a model's tokenizer sees text")
    t.add_argument("--model", required=True, dest="tok_model")
    t.add_argument("--chat", action="store_true", help="render TEXT as a one-turn chat prompt")
    t.add_argument("--system", dest="tok_system", help="with --chat: system prompt")
    t.add_argument("--json", action="store_true")
    t.add_argument("text", help="the text ('-' reads stdin)")

    v = sub.add_parser("verify", help="check golden fixture directories (fp32, CPU)")
    v.add_argument("dirs", nargs="+", type=Path)

    s = sub.add_parser("selftest", help="score a downloaded model on built-in text (misread checkpoints show)")
    s.add_argument("model_id")
    s.add_argument("--device", dest="st_device", choices=("auto", "cpu", "cuda"), default="cpu")
    return p


def _read_text(value: str) -> str:
    return sys.stdin.read() if value == "-" else value


def _catalog():
    from .catalog import load_catalog
    return load_catalog()


def _resolve_entry(model: str):
    """A catalog entry by id, or an entry built for a local model directory."""
    from .catalog import CatalogError, get_entry

    if Path(model).is_dir():
        from .engine.runtime import entry_for_directory
        return entry_for_directory(Path(model), _catalog())
    try:
        return get_entry(model, _catalog())
    except CatalogError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def _parse_controls(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise CliError(f"--control expects NAME=VALUE, got {item!r}", EXIT_USAGE)
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def cmd_models(args) -> int:
    from . import hub

    rows = []
    for e in _catalog().values():
        state = "demo (random)" if e.demo else ("yes" if hub.is_downloaded(e) else "no")
        size = 0 if e.demo else (e.source.size_bytes if e.source else 0)
        rows.append({"id": e.id, "name": e.name, "architecture": e.architecture, "params": e.params,
                     "download_bytes": size, "downloaded": state, "context": e.context})
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    head = f"{'id':<14} {'name':<34} {'arch':<14} {'params':>8} {'download':>9} {'ctx':>6}  downloaded"
    print(head)
    for r in rows:
        print(f"{r['id']:<14} {r['name'][:34]:<34} {r['architecture']:<14} {_human(r['params'], ''):>8} "
              f"{_human(r['download_bytes'], 'B') if r['download_bytes'] else '-':>9} {r['context']:>6}  {r['downloaded']}")
    return EXIT_OK


def _human(n: float, unit: str) -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"


def cmd_download(args) -> int:
    from . import hub

    entry = _resolve_entry(args.model_id)
    if entry.demo:
        path = hub.ensure_demo(entry)
        print(f"{entry.id} is a demo checkpoint (random weights), ready at {path}")
        return EXIT_OK
    cancel = threading.Event()
    bar = _ProgressBar()
    try:
        path = hub.download(entry, progress=bar.update, cancel=cancel)
    except KeyboardInterrupt:
        cancel.set()
        bar.close()
        raise CliError("download interrupted; run the same command again to resume") from None
    except (hub.OfflineError, hub.HubError) as e:
        bar.close()
        raise CliError(str(e)) from None
    bar.close()
    print(f"{entry.id} downloaded to {path}")
    return EXIT_OK


class _ProgressBar:
    """A one-line stderr progress bar for downloads."""

    def __init__(self) -> None:
        self.shown = False

    def update(self, p) -> None:
        frac = p.done_bytes / p.total_bytes if p.total_bytes else 0.0
        width = 28
        fill = int(frac * width)
        eta = f"{p.eta_s:.0f}s" if p.eta_s is not None else "?"
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}%  "
                         f"{_human(p.done_bytes, 'B')}/{_human(p.total_bytes, 'B')}  "
                         f"{_human(p.speed_bps, 'B')}/s  ETA {eta}  {p.file[:40]:<40}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


def cmd_tokenize(args) -> int:
    from .engine.tokenizer import TokenizerError, load_tokenizer

    entry = _resolve_entry(args.tok_model)
    text = _read_text(args.text)
    try:
        tok = load_tokenizer(entry, *_tokenizer_location(entry))
        if args.chat:
            messages = [{"role": "user", "content": text}]
            ids = tok.render(messages, add_generation_prompt=True, system=args.tok_system)
            rendered = tok.render_text(messages, add_generation_prompt=True, system=args.tok_system)
        else:
            ids, rendered = tok.encode(text, allow_special=True), text
    except TokenizerError as e:
        raise CliError(str(e)) from None
    pieces = [tok.piece(i) for i in ids]
    if args.json:
        print(json.dumps({"model": entry.id, "ids": ids, "pieces": pieces, "count": len(ids), "text": rendered},
                         ensure_ascii=False))
        return EXIT_OK
    if args.chat:
        print(rendered)
        print("-" * 40)
    for i, piece in zip(ids, pieces):
        print(f"{i:>7}  {piece!r}")
    print(f"{len(ids)} tokens")
    return EXIT_OK


def _tokenizer_location(entry) -> tuple[Path | None, Path | None]:
    """(model_dir, tokenizer_file) for load_tokenizer, without loading weights."""
    if entry.tokenizer.kind in ("tiktoken", "bytes"):
        return None, None
    if entry.path and entry.path.is_dir():
        return entry.path, None
    from . import hub

    return hub.local_dir(entry), hub.file_path(entry, entry.tokenizer.file)


def cmd_verify(args) -> int:
    from .engine.arch.base import UnknownArchitecture
    from .engine.loader import LoadError
    from .engine.verify import verify

    code = EXIT_OK
    for d in args.dirs:
        if not (d / "golden.json").exists() or not (d / "golden.safetensors").exists():
            print(f"{d}: not a fixture directory (needs golden.json and golden.safetensors)", file=sys.stderr)
            code = max(code, EXIT_USAGE)
            continue
        try:
            report = verify(d)
        except UnknownArchitecture as e:
            print(f"{d}: {e}", file=sys.stderr)
            code = max(code, EXIT_USAGE)
            continue
        except (LoadError, ValueError) as e:
            print(f"{d}: FAIL: {e}", file=sys.stderr)
            code = max(code, EXIT_FAIL)
            continue
        print("\n".join(report.lines()))
        if not report.ok:
            code = max(code, EXIT_FAIL)
    return code


def cmd_selftest(args) -> int:
    from .engine.selftest import format_report, run_selftest

    report = run_selftest(args.model_id, device=args.st_device)
    print(format_report(report))
    return EXIT_OK if getattr(report, "ok", True) else EXIT_FAIL


def _sampling(args, entry):
    s = entry.sampling()
    try:
        s = s.with_overrides(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                             repetition_penalty=args.repetition_penalty, no_repeat_ngram=args.no_repeat_ngram,
                             seed=args.seed, max_new_tokens=args.max_new_tokens, stop_strings=args.stop)
        s.validate()
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    return s


def cmd_prompt(args) -> int:
    from .engine.api import Done
    from .engine.loader import LoadError
    from .engine.runtime import load_engine
    from .engine.tokenizer import TokenizerError

    entry = _resolve_entry(args.model)
    settings = _sampling(args, entry)
    controls = _parse_controls(args.control)
    text = _read_text(args.prompt)
    if entry.demo:
        print(f"[{entry.id}: random weights — the output is noise, for trying smollchat offline]", file=sys.stderr)
    try:
        engine = load_engine(entry, device=args.device, dtype=args.dtype)
        if controls:
            engine.model.set_controls(controls)
        ids = engine.tokenizer.render([{"role": "user", "content": text}], add_generation_prompt=True,
                                      system=args.system)
    except (LoadError, TokenizerError, ValueError) as e:
        raise CliError(str(e)) from None
    done = None
    out = sys.stdout
    for ev in engine.generate(ids, settings):
        if isinstance(ev, Done):
            done = ev
        out.write(ev.text)
        out.flush()
    out.write("\n")
    if done is not None and done.stop_reason == "context_full" and done.new_tokens == 0:
        raise CliError(f"context full: {done.detail}")
    if args.stats and done is not None:
        print(f"[{done.new_tokens} tokens, stop: {done.stop_reason}, ttft {done.ttft_s * 1000:.0f} ms, "
              f"prefill {done.prefill_tok_s:.1f} tok/s, decode {done.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    return EXIT_OK


def cmd_tui(args) -> int:
    try:
        from .tui.app import make_app
    except ImportError as e:
        raise CliError(f"the TUI cannot start: {e}") from None
    engine = None
    if args.fake:
        from .chat.fake import scripted_demo
        engine = scripted_demo()
    make_app(engine=engine, model_id=None if args.fake else args.model, system_prompt=args.system).run()
    return EXIT_OK


COMMANDS = {"models": cmd_models, "download": cmd_download, "tokenize": cmd_tokenize, "verify": cmd_verify,
            "selftest": cmd_selftest}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command:
            return COMMANDS[args.command](args)
        if args.prompt is not None:
            if args.fake:
                raise CliError("--fake is for the TUI; --prompt needs a real model (--model ID)", EXIT_USAGE)
            if not args.model:
                raise CliError("--prompt needs --model (see `smollchat models`)", EXIT_USAGE)
            return cmd_prompt(args)
        return cmd_tui(args)
    except CliError as e:
        print(f"smollchat: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("\nsmollchat: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
