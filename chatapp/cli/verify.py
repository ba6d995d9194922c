"""`smollchat verify DIR...`: check golden fixture directories (exit 0 pass, 1 fail, 2 not a fixture)."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE

ORDER = 40


def register(sub) -> None:
    v = sub.add_parser("verify", help="check golden fixture directories (fp32, CPU)")
    v.add_argument("dirs", nargs="+", type=Path)
    v.set_defaults(func=run)


def run(args) -> int:
    from ..engine.arch.base import UnknownArchitecture
    from ..engine.loader import LoadError
    from ..engine.verify import verify

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
