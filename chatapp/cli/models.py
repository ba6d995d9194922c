"""`smollchat models [--json]`: the catalog, with sizes and what is downloaded."""
from __future__ import annotations

import json

from ..units import human_bytes, human_count
from .common import EXIT_OK, catalog

ORDER = 10


def register(sub) -> None:
    m = sub.add_parser("models", help="list the catalog")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=run)


def run(args) -> int:
    from .. import hub

    rows = []
    for e in catalog().values():
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
        print(f"{r['id']:<14} {r['name'][:34]:<34} {r['architecture']:<14} {human_count(r['params']):>8} "
              f"{human_bytes(r['download_bytes']) if r['download_bytes'] else '-':>9} {r['context']:>6}  {r['downloaded']}")
    return EXIT_OK
