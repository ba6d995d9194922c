"""Command line: `smollchat` (TUI), one-shot answers, and the model/fixture subcommands.

    smollchat [--model ID|DIR] [--system TEXT]            open the TUI
    smollchat --model ID --prompt TEXT|- [flags]          answer once on stdout (streamed)
    smollchat models | download ID | tokenize | verify DIR | selftest ID

One module per command. A subcommand is a module in this package with `register(subparsers)`, which
adds its parser and sets `func`, and an optional `ORDER` for its place in --help: adding a command
is adding a module. Every module here is imported to build the parser, so none imports torch or
Textual at its top: they are imported inside the commands that need them, and `models`, `tokenize`
and the TUI's first frame start fast.
"""
from __future__ import annotations

import argparse
import importlib
import io
import os
import pkgutil
import sys
from typing import Sequence

from . import chat
from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError, bug_line, describe, is_utf8

__all__ = ["main", "build_parser", "CliError", "EXIT_OK", "EXIT_FAIL", "EXIT_USAGE"]


def _command_modules() -> list:
    mods = []
    for info in pkgutil.iter_modules(__path__):
        mod = importlib.import_module(f"{__name__}.{info.name}")
        if callable(getattr(mod, "register", None)):
            mods.append(mod)
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smollchat", description="Chat with small experimental language models.")
    chat.add_arguments(p)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        mod.register(sub)
    return p


def _tolerant_output() -> None:
    """Under a locale whose encoding is not UTF-8, characters it cannot show print as escapes instead of
    ending the command with UnicodeEncodeError."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict" and not is_utf8(stream):
            stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. The only exception handler: every failure ends as one line on stderr and the
    documented exit code (1 failure, 2 usage, 130 interrupted); SMOLLCHAT_DEBUG=1 lets bugs raise."""
    _tolerant_output()
    args = build_parser().parse_args(argv)
    try:
        if args.command:
            return args.func(args)
        return chat.run(args)
    except KeyboardInterrupt:
        print("\nsmollchat: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:
        described = describe(e)
        if described is None and os.environ.get("SMOLLCHAT_DEBUG") == "1":
            raise
        message, code = described or (bug_line(e), EXIT_FAIL)
        print(f"smollchat: {message}", file=sys.stderr)
        return code
