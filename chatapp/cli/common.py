"""What several commands share: the user-facing error, exit codes, catalog look-up, small formatting."""
from __future__ import annotations

import sys
from pathlib import Path

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A user-facing error: printed as one line, exit code attached."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


def read_text(value: str) -> str:
    """The argument itself, or stdin when it is '-'."""
    return sys.stdin.read() if value == "-" else value


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


def human(n: float, unit: str) -> str:
    """1234567 -> '1.2M' (decimal prefixes)."""
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{suffix}{unit}" if suffix == "" else f"{n:.1f}{suffix}{unit}"
        n /= 1000
    return f"{n:.1f}P{unit}"
