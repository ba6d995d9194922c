"""Importing the engine asks PyTorch's allocator for transparent huge pages (chatapp/engine/__init__.py), and
an explicit THP_MEM_ALLOC_ENABLE in the environment wins. Checked in fresh processes: PyTorch reads the
variable once, at its first allocation."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROBE = """
import chatapp.engine, torch
x = torch.empty(64 * 2**20, dtype=torch.uint8); x.fill_(1)
print(sum(int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')))
"""


def huge_kib(env: dict) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not MODE.is_file() or "[never]" in MODE.read_text(), reason="no transparent huge pages here")
def test_the_engine_s_large_buffers_get_huge_pages_unless_told_not_to():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert huge_kib(env) >= 32 * 1024
    assert huge_kib({**env, "THP_MEM_ALLOC_ENABLE": "0"}) == 0 or "[always]" in MODE.read_text()
