"""How sizes and counts are written, in one place for the TUI, the CLI and the engine's messages.

Bytes in binary units (KiB, MiB, GiB: memory is allocated in them, and a download read as "1.8 GB"
in one place and "1.7 GiB" in another looks like two different files); counts (parameters) in
decimal suffixes. Imports nothing, so every layer may use it.
"""
from __future__ import annotations


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'; whole bytes below 1 KiB, one decimal above, GiB the largest unit."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def human_count(n: float) -> str:
    """138_000_000 -> '138M'; 385_800_000 -> '385.8M'."""
    n = float(n)
    for suffix in ("", "K", "M", "B"):
        if abs(n) < 1000 or suffix == "B":
            return f"{n:.0f}{suffix}" if n == int(n) or suffix == "" else f"{n:.1f}{suffix}".replace(".0", "")
        n /= 1000
    return f"{n:.0f}B"
