"""Markdown table rows from `smollchat bench --json` records, for bench/README.md.

    python bench/summarise.py bench/results/*-t2.json
"""
from __future__ import annotations

import json
import statistics
import sys


def row(rec: dict) -> str:
    mode = f"{rec['model']} {rec['dtype']}" + ("" if rec["quantize"] == "none" else f" {rec['quantize']}")
    steps = (rec.get("controls") or {}).get("num_steps")
    mode += f", {steps} steps" if steps is not None else ""
    mode += ", --quick" if rec.get("quick") else ""
    runs = ", ".join(f"{x:.2f}" for x in rec["decode_tok_s_all"])
    share = ", ".join(f"{x:.2f}" for x in rec.get("decode_cpu_share", []))
    peers = []
    for name, p in (rec.get("peers") or {}).items():
        if isinstance(p, dict) and p.get("decode_tok_s"):
            for kind, f in {p.get("type") or p.get("dtype", ""): p, **p.get("also", {})}.items():
                mine = f.get("ours_interleaved_tok_s")
                between = f", ours between its runs {statistics.median(mine):.2f}" if mine else ""
                peers.append(f"{name} {kind} {f['decode_tok_s']:.2f} (**{f['ours_over_peer']:.2f}x**{between})")
        elif isinstance(p, dict):
            peers.append(f"{name}: {p.get('error') or p.get('skipped') or 'no figure'}")
    pre = " / ".join(f"{p['tok_s']:.0f} at {p['tokens']} ({p['ttft_s']:.2f} s)" for p in rec["prefill"])
    mb = 2 ** 20
    load = rec["cpu"].get("loadavg", [0])[0], rec["cpu"].get("loadavg_end", [0])[0] if rec["cpu"].get("loadavg_end") else 0
    return (f"| {mode} | {rec['decode_tok_s']:.2f} ({runs}; share {share}) | {'; '.join(peers) or '-'} | {pre} | "
            f"{rec['model_ms']:.1f} | {rec['outside_model_ms']:.2f} | {rec['weight_bytes'] / mb:.0f} / "
            f"{rec['weight_bytes_per_token'] / mb:.0f} | {rec['roofline_fraction']:.2f} | {rec['compile']} | "
            f"{load[0]:.1f}-{load[1]:.1f} |")


def main() -> None:
    print("| model, mode | ours decode tok/s (runs; CPU share) | peers, same run: decode tok/s (ours / peer) | "
          "prefill tok/s at N (TTFT) | model ms a step | outside the model ms | weights MiB / read a token | "
          "roofline | decode step | load avg start-end |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        with open(path) as f:
            print(row(json.load(f)))


if __name__ == "__main__":
    main()
