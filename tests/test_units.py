"""One unit system for sizes: `smollchat models`, the TUI's models screen and the engine's messages
write bytes with the same binary-unit formatter (issue 13: the CLI said GB where the TUI said GiB)."""
from __future__ import annotations

from chatapp.catalog import load_catalog
from chatapp.cli import main
from chatapp.units import human_bytes, human_count


def test_binary_units_and_decimal_counts():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(6 * 2**20) == "6.0 MiB"
    assert human_bytes(3 * 2**40) == "3072.0 GiB"
    assert human_count(138_500_000) == "138.5M" and human_count(512) == "512" and human_count(3_000) == "3K"


def test_the_cli_catalog_writes_sizes_as_the_tui_does(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    axiom = load_catalog()["axiom"]
    row = next(line for line in out.splitlines() if line.startswith("axiom "))
    assert human_bytes(axiom.source.size_bytes) in row and human_count(axiom.params) in row
    assert " GB" not in out and " MB" not in out
