"""`smollchat serve`: the OpenAI-compatible HTTP server (chatapp/server) on uvicorn."""
from __future__ import annotations

import argparse
import sys

from ..chat.pool import DEFAULT_SHARE
from .common import EXIT_OK, EXIT_USAGE, CliError, catalog, memory_budget, thread_count

ORDER = 50


def register(sub) -> None:
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat and raw completions)",
                       description="Serve the catalog's downloaded models and the demos over the OpenAI API. "
                       "Loopback only unless --host says otherwise; a non-loopback bind needs an API key from "
                       "$SMOLLCHAT_API_KEY or --api-key-file, sent by clients as 'Authorization: Bearer KEY'.")
    s.add_argument("--model", action="append", dest="serve_models", default=[], metavar="ID",
                   help="load this model before serving (repeatable); others load on their first request")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--api-key-file", help="file whose first line is the API key (else $SMOLLCHAT_API_KEY)")
    s.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from this origin, e.g. http://localhost:3000 (repeatable; default none)")
    s.add_argument("--memory-budget", metavar="SIZE", help="memory the loaded models may take, e.g. 8GiB (default: "
                   f"{int(DEFAULT_SHARE * 100)}%% of the memory available at start); the least recently used idle "
                   "model unloads to make room")
    s.add_argument("--max-models", type=int, default=None, help="also cap the number of models loaded at once")
    s.add_argument("--record", action="store_true", help="save served chats in the chat store (they open in the TUI)")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    s.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto")
    s.add_argument("--quantize", choices=("none", "int8", "int4"), default=None,
                   help="weight-only quantization of every served model on CPU (default: each catalog entry's)")
    s.add_argument("--no-engine-process", dest="engine_process", action="store_false", default=argparse.SUPPRESS,
                   help="run the models in the server's own process (by default each runs in a child process, "
                        "as in the TUI)")
    s.add_argument("--threads", type=thread_count, default=None,
                   help="the engine's intra-op threads (default: $SMOLLCHAT_THREADS, else the physical cores but one)")
    s.set_defaults(func=run)


def served_entries() -> dict:
    """Every downloaded catalog model plus the demos."""
    from .. import hub

    return {k: e for k, e in catalog().items() if e.demo or hub.is_downloaded(e)}


def run(args) -> int:
    from ..netsafe import KeyRequired, key_for_bind

    if not 0 < args.port < 65536:
        raise CliError(f"--port must be in 1..65535, got {args.port}", EXIT_USAGE)
    if args.max_models is not None and args.max_models < 1:
        raise CliError("--max-models must be at least 1", EXIT_USAGE)
    budget = memory_budget(args.memory_budget)
    try:
        key = key_for_bind(args.host, args.api_key_file)
    except KeyRequired as e:
        raise CliError(str(e), EXIT_USAGE) from None
    try:
        import uvicorn
    except ImportError as e:
        raise CliError(f"smollchat serve needs uvicorn and starlette ({e}); install smollchat with its dependencies")
    from ..engine.loader import LoadError
    from ..engine.runtime import load_engine
    from ..chat.pool import PoolError
    from ..units import human_bytes
    from ..engine.runtime import footprint
    from ..server import ModelPool, create_app

    entries = served_entries()
    for mid in args.serve_models:
        if mid not in entries:
            known = ", ".join(sorted(entries))
            raise CliError(f"--model {mid}: not a downloaded catalog model or demo (served here: {known}); "
                           f"`smollchat download {mid}` first", EXIT_USAGE)
    if args.max_models is not None and len(args.serve_models) > args.max_models:
        raise CliError(f"{len(args.serve_models)} --model flags but --max-models {args.max_models}", EXIT_USAGE)

    def load(entry, progress):
        options = dict(device=args.device, dtype=args.dtype, quantize=args.quantize, threads=args.threads)
        if getattr(args, "engine_process", True):
            # The same engine process as the TUI's (chat/engine_host.py); in this process where none starts.
            from ..chat.engine_host import EngineProcessUnavailable, load_engine_process
            try:
                return load_engine_process(entry, progress, **options)
            except EngineProcessUnavailable as e:
                print(f"smollchat serve: {e}; {entry.id} runs in the server's process", file=sys.stderr)
        return load_engine(entry, progress=progress, **options)

    def estimate(entry):
        return footprint(entry, device=args.device, dtype=args.dtype, quantize=args.quantize)

    pool = ModelPool(entries, load, budget=budget, estimate=estimate, max_loaded=args.max_models)
    for mid in args.serve_models:
        print(f"smollchat serve: loading {mid}...", file=sys.stderr)
        try:
            pool.preload(mid)
        except PoolError as e:
            raise CliError(f"--model {mid}: {e}", EXIT_USAGE) from None
        except (LoadError, ValueError, OSError) as e:
            raise CliError(f"{mid} failed to load: {e}") from None
    recorder = None
    if args.record:
        from ..chat.store import Store, StoreError
        from ..server.record import Recorder
        try:
            recorder = Recorder(Store())
        except StoreError as e:
            raise CliError(f"--record: {e}") from None
    app = create_app(pool, key=key, cors_origins=tuple(args.cors_origin), recorder=recorder)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"smollchat serve: OpenAI API at http://{host}:{args.port}/v1 ({len(entries)} models, "
          f"memory budget {human_bytes(pool.budget)}; "
          f"{'API key required' if key else 'no key: this machine only'}); Ctrl+C stops", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    finally:
        pool.close()
    return EXIT_OK
