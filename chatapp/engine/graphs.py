"""The compiled decode step: one token through `torch.compile` (inductor), CPU C++ or a CUDA graph, or, for an
architecture with a fused CPU step (Axiom: dense_step.py, one C++ op a token), through that op instead of inductor.
The fused step is measured against eager and recorded like a compile, under its own key (with the build of our
kernels), and it costs no compile: on Axiom-380M int8 it took 15.8 ms a token where the inductor step took 17.6 and
eager 22.7 (2-vCPU Zen 4, one process: bench/README.md, fifth pass).

Only the one-token forward is compiled; prefill stays eager. The step is the model's own forward, so the
compiled and eager paths share every line of the architecture. The KV length is the one thing that changes
per step: dynamo specialises on it once, sees it change, and recompiles once with the length symbolic
(automatic dynamic shapes), so a whole reply runs on two compiled graphs, never one per position. Both
happen at load (`warm_up`), timed, so the first reply does not pay for them. Compiled artefacts (inductor's
FX graph and AOT autograd caches) live under smollchat's cache folder (`compile_cache_dir`), never beside a
checkpoint; a later load reuses them.

On CUDA the step runs under mode="reduce-overhead" (CUDA graphs). The state's buffers are marked as static
addresses: they never move (state.restore copies into them), so graphs that write the KV stay valid. A graph
is recorded per KV length met (the attention reads the filled prefix); one graph for every length would need
the architectures to attend over the whole preallocated cache under a key mask, with the position a tensor.

Modes: "off" is the eager reference; "on" compiles (and records whether it measured faster); "auto" compiles
only where a measurement found the compiled step faster for this CPU, torch, architecture, dtype and shape.
"auto" takes that measurement itself, once, for a model of AUTO_MEASURE_BYTES or more (the real checkpoints,
where compiling measured 1.7-2.1x faster on a 2-core AVX2 Zen 3: bench/README.md); a demo stays eager until
an "on" measured it (a compile costs a minute or more, its step a few ms). Steps the machine was too busy
to time (decisions.timed) do not count; a load with too few clean ones runs compiled and records nothing.
Anything that stops compilation (no C++ compiler, an inductor error) logs one line and the engine runs eager.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import threading
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .. import locations
from . import cpu_gemv, dense_step
from .arch.base import Forward
from .decisions import DecisionFile, machine_key, timed
from .generate import roll_back
from .state import StateList

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
#: Architectures whose one-token forward compiles as one graph (fullgraph=True) and matches eager; "auto" still
#: compiles one only where "on" measured it faster here. Byrne's derived caches are read unchecked inside a
#: compiled step (spike_whale_parts.param_key). Measured with inductor on the demos (fp32, 1 thread, load ~7):
#: byrne-tiny 13.5 -> 7.6 ms a step, odinnext-tiny 15.0 -> 4.9, genesis-tiny 14.0 -> 2.2 (bench/compile.md),
#: logits within 1e-6. Not Huginn: Python
#: control flow inside a step (adaptive exit, speculative drafts).
COMPILABLE = frozenset({"axiom", "spike_whale", "odinnext", "genesis"})
#: Timed steps per path when "on" measures compiled against eager (alternating; the fastest of each decides,
#: since another process's work only ever adds time, and it landed on single steps of either path here).
MEASURE_STEPS = 9
#: Timed steps (not spoilt by a busy machine) each path needs for a decision.
MIN_TIMED = 3
#: "auto" measures by itself (first load, then cached) a model holding at least this many weight bytes.
AUTO_MEASURE_BYTES = 64 * 2**20
#: The decision key's suffix for the fused step: its own measurement, taken again when our kernels' build changes.
FUSED = f"|fused-{cpu_gemv.digest()}"


@dataclass(frozen=True)
class CompileReport:
    """What became of the compile request: shown by `--stats`, recorded in the run card.

    Attributes:
        mode: what was asked ("auto", "on", "off").
        active: whether the decode step is compiled.
        reason: one line: why eager, or the backend used.
        compile_s: seconds the first use cost (tracing, inductor, C++ build or cache load), 0 if eager.
        eager_ms, compiled_ms: the fastest step times measured at load (when measured), else None.
    """

    mode: str
    active: bool
    reason: str
    compile_s: float = 0.0
    eager_ms: float | None = None
    compiled_ms: float | None = None

    @property
    def label(self) -> str:
        """e.g. "compiled (inductor cpp, 21.4 s first use)" or "eager (--compile off)"."""
        if self.active:
            return f"compiled ({self.reason}, {self.compile_s:.1f} s first use)"
        return f"eager ({self.reason})"


def compile_cache_dir() -> Path:
    """Inductor's on-disk cache for smollchat, per torch version (artefacts do not carry across versions)."""
    d = locations.cache_dir() / "compile" / f"torch-{torch.__version__}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def find_cxx() -> str | None:
    """The C++ compiler inductor would use (its configured names: $CXX, else g++), or None. A PATH lookup only:
    cheap enough for every load."""
    from torch._inductor import config

    names = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
    for name in names:
        if name and (found := shutil.which(name)):
            return found
    return None


def _decision_key(model, arch: str, device: torch.device, dtype: torch.dtype, backend: str = "") -> str:
    """What decides whether compiling pays: machine, kernels, torch, architecture, dtype, shape, the eager path's
    kernel choice (kernels.py) and, for the fused step, its name and the build of our kernels."""
    shape = hashlib.sha256(repr(sorted(vars(model.args).items())).encode()).hexdigest()[:12]
    choice = getattr(model, "kernel_choice", None)
    paths = f"|{choice.paths}" if choice is not None else ""
    return f"{machine_key(device)}|{arch}|{str(dtype).removeprefix('torch.')}|{shape}{paths}{backend}"


def _decisions() -> DecisionFile:
    return DecisionFile(compile_cache_dir() / "decisions.json")


def _read_decisions() -> dict[str, Any]:
    return _decisions().read()


def _record_decision(key: str, eager_ms: float, compiled_ms: float) -> None:
    _decisions().record(key, {"eager_ms": eager_ms, "compiled_ms": compiled_ms, "faster": compiled_ms < eager_ms})


def _point_caches_here() -> None:
    """Inductor's FX graph and AOT autograd caches (and Triton's) under smollchat's cache folder."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())
    # Dynamo's profile of which sizes varied is kept (in the same folder) only under a job id: with it, a
    # later load compiles the length-generic graph first instead of one for a single length, then it.
    torch.compiler.config.job_id = "smollchat-decode"
    config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True


class CompiledStep:
    """model.infer for one token through a compiled forward; falls back to eager for good if the compiled call
    ever fails (one log line), so a reply never dies of the compiler."""

    def __init__(self, model, device: torch.device, freezing: bool = False) -> None:
        self.model = model
        self.device = device
        self.freezing = freezing
        mode = "reduce-overhead" if device.type == "cuda" else None
        # Freezing folds the weights into the graph as constants, so inductor can prepack them for oneDNN/MKL.
        # No guards on the model's modules and parameters: checking them cost 0.9 ms of a 17 ms Axiom step
        # (0.2 ms without). That is sound because the model is never changed once its step is compiled (kernel
        # choice and quantization happen before) and because this step's graphs are reached by this model only:
        # dynamo keeps graphs and guards on the code object, and each CompiledStep compiles its own copy of it.
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        self._fn = torch.compile(self._own_forward(), fullgraph=True, mode=mode,
                                 options={**options, "freezing": True} if freezing else options)
        self.failed: str | None = None

    def _own_forward(self) -> Callable[[torch.Tensor, StateList], torch.Tensor]:
        """self._forward on a code object of its own (equal to the class's, so dynamo's profile of which sizes
        vary, keyed by file, line and name, still carries over)."""
        f = CompiledStep._forward
        return types.MethodType(types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__), self)

    def _forward(self, ids: torch.Tensor, state: StateList) -> torch.Tensor:
        return self.model(ids, state, last_only=True)

    def __call__(self, ids: torch.Tensor, state: StateList, controls: Mapping[str, Any] | None = None,
                 cancel: threading.Event | None = None, last_only: bool = True) -> Forward:
        if self.failed or ids.shape[1] != 1:
            return self.model.infer(ids, state, controls, cancel, last_only=last_only)
        state.check_room(1)  # ContextFull from eager Python, not from inside a traced graph
        length = state.length
        try:
            logits = self._fn(ids, state)
        except Exception as e:  # noqa: BLE001 - any compiler failure: eager from here on
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("compiled decode step failed, running eager from now on (%s)", self.failed)
            roll_back(state, length)
            return self.model.infer(ids, state, controls, cancel, last_only=last_only)
        # A CUDA graph reuses its output buffer on the next replay.
        return Forward(logits.clone() if self.device.type == "cuda" else logits)


def _step_ms(fn: Callable[[], Any], device: torch.device) -> float:
    """ms of one step; on CPU NaN where the machine was too busy to time it (decisions.timed)."""
    if device.type != "cuda":
        return timed(fn) * 1000
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t) * 1000


def warm_up(step: CompiledStep, state: StateList, device: torch.device, measure: bool) -> tuple[float, float, float]:
    """Compile both graphs (the first length, then the length-generic one) on the engine's own empty state,
    then, if asked, time eager and compiled steps alternately. Returns (compile seconds, eager ms, compiled
    ms: the fastest of MEASURE_STEPS each; NaN when not measured). Leaves the state empty."""
    model = step.model
    eager_ms: list[float] = []
    compiled_ms: list[float] = []
    with torch.inference_mode():
        # Made under inference mode like the decode loop's ids: dynamo guards on the tensor's dispatch keys.
        tok = torch.zeros(1, 1, dtype=torch.long, device=device)
        state.reset()
        model.infer(torch.zeros(1, 2, dtype=torch.long, device=device), state)  # sizes 0 and 1 are special
        t = time.perf_counter()
        for _ in range(3):  # lengths 2, 3, 4: the graph for 2, the one for any length, a cache hit
            step(tok, state)
            if step.failed:
                break
        compile_s = time.perf_counter() - t
        if measure and not step.failed:
            snap = state.snapshot()
            for _ in range(MEASURE_STEPS):
                state.restore(snap)
                eager_ms.append(_step_ms(lambda: model.infer(tok, state, last_only=True), device))
                state.restore(snap)
                compiled_ms.append(_step_ms(lambda: step(tok, state), device))
        state.reset()
    nan = float("nan")
    # Steps the machine was too busy to time (NaN) do not count; with fewer than MIN_TIMED of either, neither
    # figure is given (NaN), and nothing is decided.
    eager_ms = [t for t in eager_ms if not math.isnan(t)]
    compiled_ms = [t for t in compiled_ms if not math.isnan(t)]
    if min(len(eager_ms), len(compiled_ms)) < MIN_TIMED:
        return compile_s, nan, nan
    return compile_s, min(eager_ms), min(compiled_ms)


def decode_step(model, arch: str, state: StateList, device: torch.device, dtype: torch.dtype,
                mode: str = "auto", freezing: bool = False,
                progress: Callable[[str], None] | None = None) -> tuple[Callable[..., Forward], CompileReport]:
    """The step the decode loop calls for one token (`infer`'s signature) and what became of `mode`.

    `state` is the engine's preallocated (empty) state: the graphs are compiled and, under "on", measured on
    it, so the first reply pays nothing. Never raises for a compiler problem: it reports eager instead.
    """
    if mode not in MODES:
        raise ValueError(f"compile mode {mode!r} is not one of {', '.join(MODES)}")
    eager = model.infer
    if mode == "off":
        return eager, CompileReport(mode, False, "--compile off")
    fused = None
    if device.type == "cpu" and (mode == "on" or model.weight_bytes() >= AUTO_MEASURE_BYTES
                                 or _decision_key(model, arch, device, dtype, FUSED) in _read_decisions()):
        fused, why = dense_step.build(model, device, dtype)
        if fused is None and why != dense_step.NO_LAYOUT:
            log.info("decode step: %s", why)
    if arch not in COMPILABLE and fused is None:
        return eager, CompileReport(mode, False, f"the {arch} step is not compiled")
    key = _decision_key(model, arch, device, dtype, FUSED if fused is not None else "")
    seen = _read_decisions().get(key) if mode == "auto" else None
    measure = mode == "on"
    if mode == "auto":
        if not seen and model.weight_bytes() < AUTO_MEASURE_BYTES:
            return eager, CompileReport(mode, False, "auto: not measured on this machine yet (--compile on measures)")
        measure = not seen
        if seen and not seen.get("faster"):
            return eager, CompileReport(mode, False, f"auto: compiled measured no faster here "
                                                     f"({seen['compiled_ms']:.1f} vs {seen['eager_ms']:.1f} ms)")
    if fused is not None:
        if progress is not None and measure:
            progress("timing the fused decode step against eager (once on this machine)")
        step = fused
        backend = fused.backend
    else:
        if device.type == "cpu" and find_cxx() is None:
            log.warning("no C++ compiler found (set CXX or install g++): decoding eager")
            return eager, CompileReport(mode, False, "no C++ compiler")
        if device.type == "cuda":
            for buf in (b for s in state for b in s.buffers()):
                torch._dynamo.mark_static_address(buf)
        _point_caches_here()
        if progress is not None:
            progress("compiling the decode step" + (" and timing it against eager (once on this machine: a minute "
                                                    "or more; later loads read the cache)" if measure else ""))
        step = CompiledStep(model, device, freezing)
        backend = "cuda graphs" if device.type == "cuda" else "inductor cpp" + (", frozen" if freezing else "")
    compile_s, eager_ms, compiled_ms = warm_up(step, state, device, measure=measure)
    if step.failed:
        what = "the fused step" if fused is not None else "compile"
        return eager, CompileReport(mode, False, f"{what} failed: {step.failed}")
    if measure and math.isnan(compiled_ms):
        # Too busy to time: compiled for this load (it measured faster at real size wherever it was measured:
        # bench/README.md), nothing recorded, so the next load measures again.
        log.warning("the machine was too busy to time the compiled decode step against eager: compiled for this "
                    "load, measured again at the next")
        return step, CompileReport(mode, True, f"{backend}; not timed: the machine was busy", compile_s)
    if measure:
        _record_decision(key, eager_ms, compiled_ms)
        if mode == "auto" and not compiled_ms < eager_ms:
            return eager, CompileReport(mode, False, f"auto: compiled measured no faster here ({compiled_ms:.1f} vs "
                                                     f"{eager_ms:.1f} ms)", compile_s, eager_ms, compiled_ms)
        return step, CompileReport(mode, True, backend, compile_s, eager_ms, compiled_ms)
    return step, CompileReport(mode, True, backend, compile_s)
