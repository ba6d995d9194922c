"""Time from `smollchat` start to its first frame, and whether torch was imported by then.

    python bench/tui_startup.py [--runs 5] [--json out.json]

Two measurements, each in fresh processes with an empty SMOLLCHAT_HOME:
- terminal: runs the `smollchat` command in a pseudo-terminal (80x24) and times from spawn until
  the first frame is on the terminal (the footer's "Commands" has been written), then sends Ctrl+Q;
  this includes interpreter start-up and every import, as a user sees it.
- in-process: `python -c` builds the app with make_app() and records, when the first screen has
  been painted (call_after_refresh from on_mount), the wall-clock seconds since the process was
  spawned and whether `torch` is in sys.modules.
"""
from __future__ import annotations

import argparse
import json
import os
import pty
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, sys, time
from chatapp.tui.app import SmollChat, make_app
mount = SmollChat.on_mount

def on_mount(self):
    mount(self)
    def painted():
        print(json.dumps({"first_frame_at": time.time(), "torch_imported": "torch" in sys.modules}),
              file=open(sys.argv[1], "w"))
        self.exit()
    self.call_after_refresh(lambda: self.screen.call_after_refresh(painted))

SmollChat.on_mount = on_mount
make_app().run(headless=True)
"""


def terminal_run(cmd: list[str], env: dict) -> float:
    """Seconds from spawn to the first frame on a pseudo-terminal."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(cmd[0], cmd, env)
    start = time.perf_counter()
    seen = b""
    try:
        while b"Commands" not in seen:
            ready, _, _ = select.select([fd], [], [], 30)
            if not ready:
                raise TimeoutError("no first frame within 30 s")
            seen += os.read(fd, 65536)
        elapsed = time.perf_counter() - start
        os.write(fd, b"\x11")  # Ctrl+Q
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    os.read(fd, 65536)
                except OSError:
                    break
    finally:
        os.waitpid(pid, 0)
        os.close(fd)
    return elapsed


def probe_run(env: dict) -> dict:
    out = Path(tempfile.mkdtemp()) / "probe.json"
    spawned = time.time()
    subprocess.run([sys.executable, "-c", PROBE, str(out)], env=env, cwd=REPO, check=True, capture_output=True,
                   timeout=120)
    result = json.loads(out.read_text())
    return {"first_frame_s": result["first_frame_at"] - spawned, "torch_imported": result["torch_imported"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "80", "LINES": "24"}
    terminal, probes = [], []
    command = shutil.which("smollchat")
    for _ in range(a.runs):
        env["SMOLLCHAT_HOME"] = tempfile.mkdtemp()
        if command:
            terminal.append(terminal_run([command], env))
        env["SMOLLCHAT_HOME"] = tempfile.mkdtemp()
        probes.append(probe_run(env))
    result = {
        "runs": a.runs,
        "terminal_first_frame_s": {"median": round(statistics.median(terminal), 3), "min": round(min(terminal), 3),
                                   "max": round(max(terminal), 3)} if terminal else "smollchat not installed",
        "headless_chat_screen_painted_s": round(statistics.median(r["first_frame_s"] for r in probes), 3),
        "torch_imported_before_first_frame": any(r["torch_imported"] for r in probes),
    }
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
