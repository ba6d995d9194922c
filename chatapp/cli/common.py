"""What several commands share: the user-facing error, exit codes, catalog look-up, small formatting."""
from __future__ import annotations

import argparse
import codecs
import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

# Error types whose message is written for the user, with their exit code. Matched by (module, class
# name) along the exception's MRO, so the handler imports nothing (the engine's would pull in torch).
USER_ERRORS: dict[tuple[str, str], int] = {
    ("chatapp.catalog", "CatalogError"): EXIT_USAGE,
    ("chatapp.engine.arch.base", "UnknownArchitecture"): EXIT_USAGE,
    ("chatapp.engine.loader", "LoadError"): EXIT_FAIL,
    ("chatapp.engine.runtime", "NonFiniteOutput"): EXIT_FAIL,
    ("chatapp.engine.state", "ContextFull"): EXIT_FAIL,
    ("chatapp.engine.tokenizer", "TokenizerError"): EXIT_FAIL,
    ("chatapp.hub", "HubError"): EXIT_FAIL,
    ("chatapp.chat.session", "ContextOverflow"): EXIT_FAIL,
    ("chatapp.chat.store", "StoreError"): EXIT_FAIL,
    ("chatapp.netsafe", "KeyRequired"): EXIT_USAGE,
    ("chatapp.tui.keys", "KeymapError"): EXIT_FAIL,
    ("chatapp.tui.themes", "ThemeError"): EXIT_FAIL,
}


class CliError(Exception):
    """A user-facing error: printed as one line, exit code attached."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def describe(e: BaseException) -> tuple[str, int] | None:
    """The line for the user and the exit code of an error written for them; None for a bug."""
    if isinstance(e, CliError):
        return str(e), e.code
    for cls in type(e).__mro__:
        code = USER_ERRORS.get((cls.__module__, cls.__qualname__))
        if code is not None:
            return str(e), code
    if isinstance(e, OSError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}", EXIT_FAIL
    if isinstance(e, MemoryError):
        return "out of memory; close other programs or pick a smaller model", EXIT_FAIL
    return None


def bug_line(e: BaseException) -> str:
    """A bug, not bad input: still one line, with the way to the traceback."""
    return (f"internal error: {type(e).__name__}: {e} (a bug; SMOLLCHAT_DEBUG=1 shows the traceback, "
            "please report it)")


def is_utf8(stream) -> bool:
    """Whether a text stream takes any character (else JSON for it keeps \\u escapes)."""
    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "ascii").name == "utf-8"
    except LookupError:
        return False


def read_text(value: str) -> str:
    """The argument itself, or stdin when it is '-', as UTF-8 whatever the locale says."""
    if value != "-":
        try:
            value.encode("utf-8")  # undecodable argv bytes arrive as lone surrogates
        except UnicodeEncodeError as e:
            raise CliError(f"the text argument is not valid UTF-8 (at character {e.start})", EXIT_USAGE) from None
        return value
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text-only stdin (an embedding program's): already decoded
        return sys.stdin.read()
    data = stream.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"stdin is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                       "convert it first, e.g. with iconv -t UTF-8", EXIT_USAGE) from None


def catalog():
    from ..catalog import load_catalog
    return load_catalog()


def resolve_entry(model: str):
    """A catalog entry by id, or an entry built for a local model directory."""
    from ..catalog import CatalogError, get_entry

    if Path(model).is_dir():
        from ..engine.runtime import entry_for_directory
        return entry_for_directory(Path(model), catalog())
    try:
        return get_entry(model, catalog())
    except CatalogError as e:
        raise CliError(str(e), EXIT_USAGE) from None


def thread_count(text: str) -> int:
    """argparse type of --threads: a whole number of intra-op threads, at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of threads, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def memory_budget(text: str | None) -> int | None:
    """--memory-budget SIZE -> bytes (None: the pool's default from the memory available)."""
    if text is None:
        return None
    from ..chat.pool import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as e:
        raise CliError(f"--memory-budget: {e}", EXIT_USAGE) from None
