"""Kill test: a child process streams replies into the store (message saves while a reply grows,
whole-chat saves for new turns and branches) and is SIGKILLed at random points. The reopened file
passes PRAGMA integrity_check and holds every write the child saw acknowledged.

A few kills by default; SMOLLCHAT_KILLS=200 for a long run."""
from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from chatapp.chat.store import Store

REPO = Path(__file__).resolve().parents[2]
KILLS = int(os.environ.get("SMOLLCHAT_KILLS", "4"))

_CHILD = r"""
import random, sys
from chatapp.chat.conversation import Conversation
from chatapp.chat.store import Store

def text(n):
    return "".join("t%d " % k for k in range(n))

rng = random.Random(int(sys.argv[2]))
s = Store(sys.argv[1])
c = Conversation(id="kill-%s" % sys.argv[2])
user = c.add(None, "user", "go")
s.save(c)
print("chat", c.id, len(c.messages), flush=True)
while True:
    parent = user.id if rng.random() < 0.3 else c.current_leaf  # sometimes a new branch
    m = c.add(parent, "assistant", "", status="streaming", token_ids=[])
    s.save(c)
    print("chat", c.id, len(c.messages), flush=True)
    for n in range(1, rng.randrange(2, 40)):
        m.content = text(n)
        m.token_ids.append(n)
        s.save_message(c.id, m)
        print("msg", m.id, n, flush=True)
    m.status = "ok"
    s.save_message(c.id, m, current_leaf=m.id)
    print("done", m.id, flush=True)
    user = c.add(m.id, "user", "more")
    s.save(c)
    print("chat", c.id, len(c.messages), flush=True)
"""


def _text(n: int) -> str:
    return "".join(f"t{k} " for k in range(n))


def test_a_writer_killed_at_random_points_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "chats.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = random.Random(1234)
    for run in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(run)], stdout=subprocess.PIPE,
                                text=True, env=env)
        acked: list[list[str]] = []
        deadline = None
        try:
            for line in proc.stdout:
                acked.append(line.split())
                if deadline is None:  # the child is up: kill it somewhere in the next 0.05-1.5 s
                    deadline = time.monotonic() + rng.uniform(0.05, 1.5)
                if time.monotonic() >= deadline:
                    break
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert acked, proc.returncode
        raw = sqlite3.connect(path)
        assert raw.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        raw.close()
        with Store(path) as store:
            chat_id = next(a[1] for a in acked if a[0] == "chat")
            conv = store.load(chat_id)
            assert conv.repairs == []
            chats = [int(a[2]) for a in acked if a[0] == "chat"]
            assert len(conv.messages) >= max(chats)
            for kind, mid, *rest in acked:
                if kind == "msg":
                    m = conv.get(mid)
                    n = int(rest[0])
                    # Whatever arrived later is a longer prefix of the same stream, never less than acknowledged.
                    assert m.content.startswith(_text(n)) and m.token_ids[:n] == list(range(1, n + 1))
                elif kind == "done":
                    assert conv.get(mid).status == "ok"
            # Nothing reopens as still streaming: a reply cut off by the kill is marked interrupted.
            assert all(m.status != "streaming" for m in conv.messages.values())
