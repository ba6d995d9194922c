"""What this machine is, for the choices measured on it, and the files that remember those choices.

Two choices are measured once per machine and then read back: whether the compiled decode step pays
(graphs.py) and which weight layout and matmul path each dtype takes (kernels.py). Both key their records
by `machine_key`: the CPU model and ISA flags, PyTorch's kernel family and the environment variables that
steer it (ATEN_CPU_CAPABILITY, MKL_*, ONEDNN_*/DNNL_*), the torch version and the intra-op thread count,
so a record made under another capability or another torch is never reused. Also here: the default
thread count (physical cores minus one for the UI, all of them on a machine of two or fewer).
"""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..contract import THREADS_ENV

#: ISA flags worth recording (from /proc/cpuinfo), the ones that pick PyTorch's kernels.
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile",
         "amx_bf16", "amx_int8", "asimd", "sve")
#: Environment variables (by prefix) that change which kernels PyTorch, MKL and oneDNN run.
KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "MKL_", "ONEDNN_", "DNNL_")


def _cpuinfo() -> tuple[str, set[str], int | None]:
    """(model name, flags, physical cores) from /proc/cpuinfo; the cores None where it does not say."""
    model, flags, cores = "", set(), set()
    phys = core = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and not model:
                    model = value
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif key == "physical id":
                    phys = value
                elif key == "core id":
                    core = value
                elif not key and core is not None:  # a blank line ends one logical CPU's block
                    cores.add((phys, core))
                    core = None
            if core is not None:
                cores.add((phys, core))
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), flags, len(cores) or None


def cpu_info() -> dict[str, Any]:
    """CPU model, the ISA flags above that it has, PyTorch's kernel family, cores and load."""
    model, flags, _ = _cpuinfo()
    return {"model": model, "flags": [f for f in FLAGS if f in flags], "aten_cpu_capability":
            torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(), "torch": torch.__version__,
            "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else []}


#: A timed call counts only if the process got at least this share of its intra-op threads' time.
MIN_CPU_SHARE = 0.75
#: Calls shorter than this are always kept where only CPU time can judge them: its reading is too coarse.
SHARE_MIN_WALL_S = 5e-4


def run_delay_s() -> float | None:
    """Seconds this process's threads have spent runnable but waiting for a CPU (Linux schedstat, ns
    resolution), or None where the kernel does not say."""
    total = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
        except (OSError, ValueError, IndexError):
            return None
    return total / 1e9


def usage() -> tuple[float, float | None]:
    """(process CPU seconds, run-delay seconds or None): what cpu_share compares across a call."""
    return time.process_time(), run_delay_s()


def cpu_share(wall_s: float, cpu_s: float, waited_s: float | None = None) -> float:
    """The share of its intra-op threads' time the process had a CPU: near 1 on a machine to itself.

    With `waited_s` (run_delay_s across the call): 1 - waited / (wall x threads), time kept off a CPU by other
    processes. Otherwise CPU time over wall x threads, which also reads low when a kernel is single-threaded
    on an idle machine (MKL's fp32 GEMV is, on a Zen 4: share 0.50 at 2 threads, quiet), so it is only the
    fallback where the kernel keeps no run delay."""
    span = max(wall_s, 1e-9) * torch.get_num_threads()
    if waited_s is not None:
        return 1.0 - waited_s / span
    return cpu_s / span


def share_between(start: tuple[float, float | None], end: tuple[float, float | None], wall_s: float) -> float:
    """cpu_share over a span whose ends usage() read as `start` and `end`."""
    waited = end[1] - start[1] if start[1] is not None and end[1] is not None else None
    return cpu_share(wall_s, end[0] - start[0], waited)


def timed(fn: Any, wall: Any = time.perf_counter, clock: Any = usage) -> float:
    """Seconds one call of `fn` takes, or NaN where the machine was too busy for the figure to mean anything.

    Busy means the process had a CPU for under MIN_CPU_SHARE of (wall time x intra-op threads) (cpu_share).
    Another process holding a core does not just slow a multi-threaded kernel down by its share: each OpenMP
    region waits at its barrier for the thread that lost its core (2-vCPU Zen 3, the other core busy:
    OdinNext's compiled step 30 ms at share 0.96-0.99, 560-680 ms at share 0.51), so a choice measured then is
    noise. `clock` returns (CPU seconds, run-delay seconds or None), as usage() does.
    """
    w, start = wall(), clock()
    fn()
    w, end = wall() - w, clock()
    judged = end[1] is not None and start[1] is not None or w >= SHARE_MIN_WALL_S
    if judged and share_between(start, end, w) < MIN_CPU_SHARE:
        return math.nan
    return w


def cpu_model() -> str:
    return _cpuinfo()[0]


def kernel_env() -> dict[str, str]:
    """The set variables that steer PyTorch's, MKL's and oneDNN's kernel choice."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(KERNEL_ENV)}


def machine_key(device: torch.device) -> str:
    """Names what a measured choice depends on besides the model: the machine, its kernel family and
    environment, torch, and (on CPU) the intra-op threads."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}|torch {torch.__version__}"
    info = cpu_info()
    env = ",".join(f"{k}={v}" for k, v in kernel_env().items())
    return (f"{info['model']}|{'+'.join(info['flags'])}|{info['aten_cpu_capability']}|{env}|"
            f"torch {torch.__version__}|{torch.get_num_threads()}t")


class DecisionFile:
    """A JSON object of measured decisions by key. Reads forgive a missing or damaged file (nothing is
    known then); writes are atomic (a temporary file renamed over it), so two loads never leave half a file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key: str) -> Any:
        return self.read().get(key)

    def record(self, key: str, value: Any) -> None:
        data = self.read()
        data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def physical_cores() -> int:
    """Cores this process may run on, counting a core's hyper-threads once where /proc/cpuinfo tells."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    _, _, cores = _cpuinfo()
    logical = os.cpu_count() or usable
    if cores and logical > cores:  # SMT: scale the usable logical CPUs by threads per core
        return max(1, usable * cores // logical)
    return usable


def default_threads(cores: int | None = None) -> int:
    """Intra-op threads when none is asked: all physical cores but one, which the UI (and the OS) keep.
    On two cores or fewer, every core: Axiom's bf16 decode (the catalog's CPU dtype) ran 10.7 tok/s on one
    thread and 18 on two on a 2-vCPU EPYC (bench/axiom.md; fp32 the same on both), a loss the UI's few per
    cent of a core does not repay."""
    cores = physical_cores() if cores is None else cores
    return cores - 1 if cores > 2 else max(1, cores)


def resolve_threads(asked: int | None = None) -> int:
    """The thread count to use: `asked`, else $SMOLLCHAT_THREADS, else default_threads(). ValueError for a
    count below 1 or an unreadable variable, saying what to set."""
    if asked is None:
        raw = os.environ.get(THREADS_ENV, "").strip()
        if not raw:
            return default_threads()
        try:
            asked = int(raw)
        except ValueError:
            raise ValueError(f"${THREADS_ENV} must be a whole number of threads, not {raw!r}") from None
    if asked < 1:
        raise ValueError(f"the thread count must be at least 1, not {asked}")
    return asked
