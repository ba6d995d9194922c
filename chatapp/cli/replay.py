"""`smollchat replay EXPORT.json [--message ID]`: regenerate a reply from its run card and say *identical*,
or the first token that differs and the likely reason (chat/replay.py)."""
from __future__ import annotations

import json
from pathlib import Path

from .common import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError, resolve_entry

ORDER = 60


def register(sub) -> None:
    s = sub.add_parser("replay", help="regenerate a reply of a JSON chat export on its recorded path; "
                                      "report identical or the first differing token")
    s.add_argument("export", type=Path, help="a chat exported as JSON (the TUI's export to a .json file)")
    s.add_argument("--message", help="the reply's id (default: the last reply on the chat's current branch)")
    s.add_argument("--json", dest="replay_json", action="store_true", help="the report as one JSON object")
    s.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..chat.export import from_json
    from ..chat.replay import pick_reply, recorded_path, replay
    from ..chat.session import Session
    from ..engine.runtime import load_engine

    try:
        conv = from_json(args.export.read_text(encoding="utf-8"))
    except OSError as e:
        raise CliError(f"cannot read {args.export}: {e.strerror or e}") from None
    except ValueError as e:
        raise CliError(f"{args.export}: {e}", EXIT_USAGE) from None
    try:
        msg = pick_reply(conv, args.message)
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    path = recorded_path(msg.run)
    if not path["model_id"]:
        raise CliError(f"reply {msg.id}'s run card names no model", EXIT_USAGE)
    entry = resolve_entry(path["model_id"])
    # The recorded device when this machine has one, else the CPU (the report then names the machine).
    device = "cuda" if path["device"] == "cuda" and torch.cuda.is_available() else "cpu"
    # The recorded kernel choice only on the recorded device kind (a CUDA run's says "reference").
    kernels = path["kernels"] if device == path["device"] else "auto"
    engine = load_engine(entry, device=device, dtype=path["dtype"], quantize=path["quantize"],
                         compile=path["compile"], kernels=kernels, threads=path["threads"])
    result = replay(Session(engine, inspect=None), conv, msg)
    if args.replay_json:
        print(json.dumps({"message": msg.id, **result.__dict__}, ensure_ascii=False))
    else:
        print(f"replay of reply {msg.id} on {entry.id} ({engine.info()['dtype']}, {device}, "
              f"seed {msg.run.get('seed')}):")
        if result.identical:
            print(f"identical: {result.compared} of {result.compared} tokens")
        else:
            got = "the replay had ended" if result.replayed is None else f"replayed {result.replayed[0]} " \
                                                                         f"{result.replayed[1]!r}"
            print(f"differs at token {result.index} of {result.compared}: recorded {result.recorded[0]} "
                  f"{result.recorded[1]!r}, {got}")
        for reason in result.reasons:
            print(f"{'likely reason' if not result.identical else 'note'}: {reason}")
    return EXIT_OK if result.identical else EXIT_FAIL
