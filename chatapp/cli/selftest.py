"""`smollchat selftest ID`: score a downloaded model on built-in text (misread checkpoints show)."""
from __future__ import annotations

from .common import EXIT_FAIL, EXIT_OK

ORDER = 50


def register(sub) -> None:
    s = sub.add_parser("selftest", help="score a downloaded model on built-in text (misread checkpoints show)")
    s.add_argument("model_id")
    s.add_argument("--device", dest="st_device", choices=("auto", "cpu", "cuda"), default="cpu")
    s.set_defaults(func=run)


def run(args) -> int:
    from ..engine.selftest import format_report, run_selftest

    report = run_selftest(args.model_id, device=args.st_device)
    print(format_report(report))
    return EXIT_OK if getattr(report, "ok", True) else EXIT_FAIL
