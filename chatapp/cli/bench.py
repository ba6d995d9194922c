"""`smollchat bench MODEL`: the model at its real size (random weights) on this CPU; figures and a JSON record."""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from ..units import human_bytes
from .common import EXIT_OK, EXIT_USAGE, CliError, resolve_entry

ORDER = 60


def register(sub) -> None:
    b = sub.add_parser("bench", help="benchmark a model at its real size on this CPU (random weights)")
    b.add_argument("model", help="catalog id (a -tiny demo benches its tiny config)")
    b.add_argument("--quantize", choices=("none", "int8", "int4"), default="none")
    b.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="weights and activations (auto: the catalog's CPU dtype)")
    b.add_argument("--threads", type=int,
                   help="intra-op threads (default: the app's: $SMOLLCHAT_THREADS, else the physical cores but one)")
    b.add_argument("--eager", action="store_true",
                   help="every fast path off: no compiled decode step, the reference kernels")
    b.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="the decode step: auto (compiled where an earlier 'on' measured it faster on this machine), "
                        "on (compile, measure against eager and remember which won), off")
    b.add_argument("--remeasure", action="store_true",
                   help="measure this machine's kernel choice and compiled step again for this model and keep the new "
                        "result (for a first measurement taken while the machine was busy)")
    b.add_argument("--control", action="append", default=[], metavar="NAME=VALUE",
                   help="a model control over the catalog's for the whole run (e.g. huginn: num_steps=4)")
    b.add_argument("--quick", action="store_true", help="short prompts and runs: a smoke test, not figures")
    b.add_argument("--json", metavar="FILE", help="write the record here too")
    b.add_argument("--llama-bench", metavar="PATH",
                   help="llama.cpp's llama-bench binary, for the Axiom peer (default: $SMOLLCHAT_LLAMA_BENCH, then PATH; "
                        "llama-quantize is taken from the same folder; bench/README.md says how to build both)")
    b.set_defaults(func=run)


def run(args) -> int:
    from ..engine.bench import BenchOptions, run as bench
    from ..engine.decisions import MIN_CPU_SHARE
    from .chat import _parse_controls

    entry = resolve_entry(args.model)
    if args.threads is not None and args.threads < 1:
        raise CliError("--threads must be at least 1", EXIT_USAGE)
    opts = BenchOptions(args.quantize, args.dtype, args.threads, args.eager, args.quick, compile=args.compile,
                        remeasure=args.remeasure, controls=_parse_controls(args.control),
                        llama_bench=args.llama_bench)
    try:
        rec = bench(entry, opts, progress=lambda m: print(f"[bench {entry.id}] {m}", file=sys.stderr))
    except ValueError as e:
        raise CliError(str(e), EXIT_USAGE) from None
    if args.json:
        _write_json(Path(args.json), rec)
    pre = ", ".join(f"{p['tokens']} tok {p['tok_s']:.0f} tok/s (TTFT {p['ttft_s']:.2f} s)" for p in rec["prefill"])
    st = rec["state"]["used_bytes"]
    print(f"{entry.id} {rec['dtype']} quantize={rec['quantize']} threads={rec['threads']} compile: {rec['compile']}"
          + (f" controls: {', '.join(f'{k}={v}' for k, v in rec['controls'].items())}" if rec["controls"] else ""))
    k = rec["kernels"]
    print(f"  kernels    widening {k['widening']}, narrowing {k['narrowing']} ({k['source']})")
    print(f"  cpu        {rec['cpu']['model']} [{' '.join(rec['cpu']['flags'])}] {rec['cpu']['aten_cpu_capability']}, "
          f"load {rec['cpu']['loadavg'][0] if rec['cpu']['loadavg'] else '?'}")
    print(f"  load       {rec['load_s']:.2f} s, peak RSS {human_bytes(rec['peak_rss_bytes'])}, "
          f"weights {human_bytes(rec['weight_bytes'])} ({human_bytes(rec['weight_bytes_per_token'])} read a token)")
    print(f"  prefill    {pre}")
    print(f"  decode     {rec['decode_tok_s']:.2f} tok/s (runs {rec['decode_tok_s_all']}), "
          f"{rec['outside_model_ms']:.2f} ms a token outside the model ({rec['outside_model_cpu_ms']:.2f} ms CPU), "
          f"CPU share {rec['decode_cpu_share']}"
          + (" (another process held a core: the figure is noise)" if min(rec["decode_cpu_share"]) < MIN_CPU_SHARE
             else ""))
    print(f"  state      {human_bytes(st['0'])} / {human_bytes(st['quarter'])} / {human_bytes(st['full'])} "
          f"at 0 / 1/4 / full context ({rec['state']['context']})")
    print(f"  bandwidth  DRAM read {human_bytes(rec['dram_read_gbs'] * 1e9)}/s, "
          f"GEMV ({rec.get('gemv_product', 'F.linear')}) {human_bytes(rec['gemv_gbs'] * 1e9)}/s, "
          f"roofline fraction {rec['roofline_fraction']:.2f}")
    for name, peer in rec.get("peers", {}).items():
        print(f"  peer       {name}: {_peer_line(peer)}")
    return EXIT_OK


def _peer_line(peer) -> str:
    """A peer's figures in one line, or why it did not run."""
    if not isinstance(peer, dict):
        return str(peer)
    what = peer.get("type") or peer.get("dtype", "")
    def ratio(f: dict) -> str:
        mine = f.get("ours_interleaved_tok_s")
        return (f"ours/peer {f.get('ours_over_peer', 0):.2f}x"
                + (f", runs interleaved with ours at {statistics.median(mine):.2f}" if mine else ""))
    also = "".join(f"; {kind}: {f['decode_tok_s']:.2f} tok/s ({ratio(f)})" for kind, f in peer.get("also", {}).items())
    return f"{peer['decode_tok_s']:.2f} tok/s decode ({what}; {ratio(peer)}), {peer['impl']}{also}"


def _write_json(path: Path, rec: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
