"""`smollchat verify DIR...`: check golden fixture directories (exit 0 pass, 1 fail, 2 not a fixture)."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, bug_line, describe

ORDER = 40


def register(sub) -> None:
    v = sub.add_parser("verify", help="check golden fixture directories (fp32, CPU)")
    v.add_argument("dirs", nargs="+", type=Path)
    v.set_defaults(func=run)


def run(args) -> int:
    from ..engine.verify import verify

    code = EXIT_OK
    for d in args.dirs:
        if not (d / "golden.json").exists() or not (d / "golden.safetensors").exists():
            print(f"{d}: not a fixture directory (needs golden.json and golden.safetensors)", file=sys.stderr)
            code = max(code, EXIT_USAGE)
            continue
        try:
            report = verify(d)
        except BrokenPipeError:
            raise
        except Exception as e:  # one directory that cannot be checked does not stop the others
            message, err_code = describe(e) or (bug_line(e), EXIT_FAIL)
            if err_code == EXIT_USAGE:  # an architecture this version does not implement
                print(f"{d}: {message}", file=sys.stderr)
            else:
                print(f"{d}: FAIL: {message}", file=sys.stderr)
            code = max(code, err_code)
            continue
        print("\n".join(report.lines()))
        if not report.ok:
            code = max(code, EXIT_FAIL)
    return code
