"""`smollchat download ID`: into the Hugging Face cache (resumable), with a stderr progress bar."""
from __future__ import annotations

import sys
import threading

from ..units import human_bytes
from .common import EXIT_OK, CliError, resolve_entry

ORDER = 20


def register(sub) -> None:
    d = sub.add_parser("download", help="download a model into the Hugging Face cache")
    d.add_argument("model_id")
    d.set_defaults(func=run)


def run(args) -> int:
    from .. import hub

    entry = resolve_entry(args.model_id)
    if entry.demo:
        from ..engine.demo import ensure_demo

        path = ensure_demo(entry)
        print(f"{entry.id} is a demo checkpoint (random weights), ready at {path}")
        return EXIT_OK
    cancel = threading.Event()
    bar = _ProgressBar()
    try:
        path = hub.download(entry, progress=bar.update, cancel=cancel)
    except KeyboardInterrupt:
        cancel.set()
        bar.close()
        raise CliError("download interrupted; run the same command again to resume") from None
    except (hub.OfflineError, hub.HubError) as e:
        bar.close()
        raise CliError(str(e)) from None
    bar.close()
    print(f"{entry.id} downloaded to {path}")
    return EXIT_OK


class _ProgressBar:
    """A one-line stderr progress bar for downloads."""

    def __init__(self) -> None:
        self.shown = False

    def update(self, p) -> None:
        frac = p.done_bytes / p.total_bytes if p.total_bytes else 0.0
        width = 28
        fill = int(frac * width)
        eta = f"{p.eta_s:.0f}s" if p.eta_s is not None else "?"
        sys.stderr.write(f"\r[{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}%  "
                         f"{human_bytes(p.done_bytes)}/{human_bytes(p.total_bytes)}  "
                         f"{human_bytes(p.speed_bps)}/s  ETA {eta}  {p.file[:40]:<40}")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
