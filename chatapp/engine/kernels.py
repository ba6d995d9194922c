"""Per-machine choice of each dtype's weight layout and matmul path, measured on the running machine.

A layout or kernel tuned on one CPU was slower on the next (issue 14: column-major fp32 GEMV won 1.3-2x on an
AVX2 Zen 3; the fp32 tiles that won 3-6x for bf16 prefill there lost to plain bf16 GEMMs on an AMX Xeon), so
nothing here is decided by CPU flags alone. The candidates, for each class of matrix (widening: out > in,
such as q|k|v, gate|up and the head; narrowing: the rest), since the two classes have gone different ways:

- layout: row-major [out, in] (nn.Linear's own) or column-major (same shape, transposed strides, so a
  one-row F.linear takes MKL's x @ W GEMV);
- bf16 only, the product for one or two rows (decode) and for more (prefill): plain F.linear in bf16, or
  the weight converted to fp32 in 128-row tiles (layers.cpu_linear);
- our own one-row product (cpu_gemv.py: "row/gemv-avx2/..", "row/gemv-avx512bf16/.."), the weight kept
  row-major, raced at each instruction level the machine has ("row/gemv-avx512/.." for fp32); int8 models
  (quant.py's rows) race aten's int8 product against ours ("row/gemv-avx2/linear", "row/gemv-avx512/linear",
  and the int8 x int8 "row/gemv-avx512vnni/linear" and "row/gemv-avx2-q8/linear", which round x to int8
  blocks as llama.cpp's Q8_0 does) the
  same way, as matrices of dtype int8 in the decision file;
- where this torch and CPU can (layers.packed_available), the weight prepacked into oneDNN's blocked layout
  and multiplied by oneDNN's linear for every call ("packed/packed/packed"; layers.PackedLinear). On a Zen 4
  (avx512_bf16) the bf16 linears of one Axiom-380M token took 24.4 ms prepacked against 41.1 ms through
  F.linear, the same products to the last bit there. The output head stays on a dense path: the
  architectures pass its weight to project_head (a tied head is the embedding table the lookup reads), and a
  prepacked parameter cannot be a traced input of the compiled step.

A quantized class whose one-row product is ours also gets the row count past which its calls unpack the weights to
bf16 for F.linear instead of its own many-row product (our int4 rows kernel, aten's int8 one): the two are raced
at 8, 16, 32 ... 256 rows until unpacking wins, and the path records the crossing ("row/gemv-avx512vnni/unpack128";
on a Zen 4: int8 128 rows for 5632 x 1024, 16 for 1024 x 2816, int4 64 for both), since it moves with the CPU's
bf16 GEMM (a CPU without bf16 instructions unpacks later).

The decode attention (one new token against the KV cache) is chosen the same way, per machine, dtype and head
shape: PyTorch's SDPA or our own (csrc/attention.cpp, "attention-avx512"), timed at 512 cached tokens over
several layers' caches (choose_attention; on a Zen 4 with Axiom's 16 x 8 heads of 64: SDPA 35-43 us a call at
64 tokens, 92-146 at 512, 230-407 at 1,024; ours 21, 46-65 and 84). The choice records it as `attention`.

The measurement runs once per machine (decisions.machine_key: CPU model and flags, ATEN_CPU_CAPABILITY and
the MKL/oneDNN variables, torch, threads), dtype and model shape, at load, on random matrices of the model's
own most common shape per class (at most ~16 MB each, rotated through several copies, all of them within an
eighth of the model's matrix bytes; the CPU's cache is flushed before each timed call, so that each call
reads memory as a decode step does, even where the copies would fit the cache), the
candidates alternating, the fastest call per candidate (another process only ever adds time); one three
times slower than the best after the first round drops out, and rounds stop once ~0.25 s per case is spent,
so a load spends well under 2 s on it. A call made while another process held a core does not count
(decisions.timed: the OpenMP kernels then wait at their barriers, 20x slower and random); a load too busy to
measure takes `default()` and records nothing, so the next load measures. A record also names the
way it was measured and the build of our kernels it raced (`_method`); either changed, it is measured again. The
result is kept in
`<cache>/kernels.json`; later loads read it (`smollchat bench --remeasure` measures again). A model with under
MIN_MEASURE_BYTES of matrices (the demos) gets `default()` without measuring, and "reference" (--eager) is
row-major plain F.linear: the reference numerics. A replay forces the choice its run card recorded
(`KernelChoice.from_dict`). Moving a matrix to column-major copies it; the mapped checkpoint pages it leaves
are released (release_mapped), so a float32 load that maps its file still holds one copy of the weights.

torch 2.13 refuses prepacked bf16 on a CPU without avx512bw/vl/dq or avx_ne_convert (an AVX2 Zen 3: the
candidate is then not offered); prepacked fp32 ran 3.5-4x slower than F.linear on that machine (5632 x 1024
GEMV: 12.0 against 3.1 ms), so there it loses its race. A recorded choice naming the packed layout, replayed
where it is not available, runs row-major F.linear (`choose` says so in its source).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import glob
import logging
import math
import mmap
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from .. import locations
from .decisions import DecisionFile, machine_key, timed
from . import cpu_gemv
from .layers import CachedAttention, CpuLinear, PackedLinear, causal_attention, cpu_has_native_bf16, cpu_linear, \
    model_slot, pack_linear, packed_available, packed_product, prepack

log = logging.getLogger(__name__)

LAYOUTS = ("row", "column", "packed", "nibbles")
PRODUCTS = ("linear", "tiles", "packed", *cpu_gemv.PRODUCTS)
#: The products of more than one row (a GEMV product is for one row only). A quantized class whose one-row product
#: is ours may name "unpack<N>" instead: more than N rows unpack its weights to bf16 for F.linear (unpack_rows).
PREFILL_PRODUCTS = ("linear", "tiles", "packed")
CLASSES = ("widening", "narrowing")
#: Models with fewer matrix bytes than this are not measured (default()): the demos, and the tests' models.
MIN_MEASURE_BYTES = 64 * 2**20
#: A measured matrix is cut to at most this many bytes (its input width kept), and rotated through copies
#: totalling POOL_BYTES per layout (at most an eighth of the model's matrices in all), so that a timed call
#: streams tens of MB; the cache is emptied before each timed call (flush_cache), so it streams them from memory.
MATRIX_BYTES = 16 * 2**20
POOL_BYTES = 48 * 2**20
#: The most memory flush_cache reads before each timed call (twice the last-level cache, up to this).
FLUSH_MAX_BYTES = 256 * 2**20
#: Rows of a measured prefill product, and timed rounds per case.
PREFILL_ROWS = 16
ROUNDS = 5
#: After the first round a candidate this many times slower than the best stops being timed.
DROP_RATIO = 3.0
#: Rows of x at which a quantized class's own many-row product (our int4 rows kernel, aten's int8 one) is raced
#: against its weights unpacked to bf16 for F.linear, in order, until the unpacking wins; a matrix cut to
#: UNPACK_RACE_BYTES of weights for it.
UNPACK_RACE_ROWS = (8, 16, 32, 64, 128, 256)
UNPACK_RACE_BYTES = 4 * 2**20

Timer = Callable[[str, "MatrixPath", Callable[[], Any]], float]


@dataclass(frozen=True)
class MatrixPath:
    """How one class of matrix is stored and multiplied: "layout/decode/prefill", e.g. "row/linear/tiles"."""

    layout: str = "row"
    decode: str = "linear"
    prefill: str = "linear"

    def __post_init__(self) -> None:
        prefill_ok = self.prefill in PREFILL_PRODUCTS or (unpack_rows(self) is not None and self.decode in cpu_gemv.PRODUCTS)
        if self.layout not in LAYOUTS or self.decode not in PRODUCTS or not prefill_ok:
            raise ValueError(f"unknown matrix path {self}: the layout is one of {', '.join(LAYOUTS)}, the products "
                             f"one of {', '.join(PRODUCTS)} (a GEMV for decode only)")
        if (self.layout == "packed") != (self.decode == "packed") or (self.layout == "packed") != (self.prefill == "packed"):
            raise ValueError(f"unknown matrix path {self}: a packed weight has one product, packed/packed/packed")
        if self.layout == "nibbles" and (self.decode not in cpu_gemv.PRODUCTS or self.prefill in ("tiles", "packed")):
            raise ValueError(f"unknown matrix path {self}: int4 nibbles take one of our products for decode and "
                             "linear or unpack<N> for prefill")

    def __str__(self) -> str:
        return f"{self.layout}/{self.decode}/{self.prefill}"

    @classmethod
    def parse(cls, text: str) -> MatrixPath:
        parts = str(text).split("/")
        if len(parts) != 3:
            raise ValueError(f"a matrix path is layout/decode/prefill (e.g. row/linear/tiles), not {text!r}")
        return cls(*parts)


@dataclass(frozen=True)
class KernelChoice:
    """The paths of one dtype's two classes of matrix, and how they were decided: "reference" (--eager, or
    a device other than the CPU), "default" (not measured), "measured", "cached" (measured by an earlier
    load) or "recorded" (forced, e.g. by a replay). `timings` are the measured times (ms) by case."""

    dtype: str
    widening: MatrixPath = MatrixPath()
    narrowing: MatrixPath = MatrixPath()
    source: str = "reference"
    timings: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: The one-token attention over the KV cache: "sdpa" (PyTorch's) or one of cpu_gemv.ATTENTION.
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.attention != "sdpa" and self.attention not in cpu_gemv.ATTENTION:
            raise ValueError(f"unknown decode attention {self.attention!r}: sdpa or {', '.join(cpu_gemv.ATTENTION)}")

    @property
    def paths(self) -> str:
        extra = f", attention {self.attention}" if self.attention != "sdpa" else ""
        return f"widening {self.widening}, narrowing {self.narrowing}{extra}"

    @property
    def label(self) -> str:
        """e.g. "widening column/linear/linear, narrowing row/linear/linear (measured)"."""
        return f"{self.paths} ({self.source})"

    def path_for(self, w: torch.Tensor | tuple[int, int]) -> MatrixPath:
        """The path of a matrix (a weight, or its [out, in] shape): widening where out > in."""
        out_f, in_f = w.shape if isinstance(w, torch.Tensor) else w
        return self.widening if out_f > in_f else self.narrowing

    def as_dict(self) -> dict[str, str]:
        """What a run card records (replay forces it back through from_dict)."""
        return {"dtype": self.dtype, "widening": str(self.widening), "narrowing": str(self.narrowing),
                "source": self.source, "attention": self.attention}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "recorded") -> KernelChoice:
        try:
            return cls(str(d["dtype"]), MatrixPath.parse(d["widening"]), MatrixPath.parse(d["narrowing"]), source,
                       attention=str(d.get("attention", "sdpa")))  # (cards written before it: SDPA)
        except KeyError as e:
            raise ValueError(f"a recorded kernel choice lacks {e.args[0]!r}: {dict(d)}") from None


def unpack_rows(path: MatrixPath) -> int | None:
    """N of a path's "unpack<N>" prefill (the most rows its quantized weights are multiplied by their own many-row
    product), None for any other prefill."""
    rest = path.prefill.removeprefix("unpack")
    return int(rest) if rest != path.prefill and rest.isdigit() else None


PACKED = MatrixPath("packed", "packed", "packed")
ROW = MatrixPath()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def reference(dtype: torch.dtype) -> KernelChoice:
    """Row-major weights, plain F.linear: the reference numerics (--eager)."""
    return KernelChoice(_dtype_name(dtype))


def default(dtype: torch.dtype) -> KernelChoice:
    """The choice for a model too small to measure: column-major fp32 widening matrices (faster on every CPU
    measured so far), bf16 prefill in fp32 tiles where the CPU lacks bf16 instructions."""
    if dtype == torch.bfloat16:
        path = MatrixPath("row", "linear", "linear" if cpu_has_native_bf16() else "tiles")
        return KernelChoice("bfloat16", path, path, "default")
    return KernelChoice(_dtype_name(dtype), MatrixPath("column"), MatrixPath("row"), "default")


def candidates(dtype: torch.dtype, case: str, decode: MatrixPath = MatrixPath()) -> list[MatrixPath]:
    """The paths tried for `case`: "decode" (the layout, and for bf16 the one-row product) or "prefill" (bf16:
    the several-row product, on what decode chose)."""
    if dtype == torch.int8:  # quant.py's int8 rows: aten's product (row/linear/linear) or our GEMV
        return [ROW] + [MatrixPath("row", g, "linear") for g in cpu_gemv.products(dtype)]
    if dtype == cpu_gemv.INT4:  # quant.py's int4: aten's packed layout and product (row/linear/linear) or our nibbles
        return [ROW] + [MatrixPath("nibbles", g, "linear") for g in cpu_gemv.products(dtype)]
    if case == "decode":
        paths = [MatrixPath("row"), MatrixPath("column")]
        if dtype == torch.bfloat16:
            paths.append(MatrixPath("row", "tiles", "tiles"))
        paths += [MatrixPath("row", g, "linear") for g in cpu_gemv.products(dtype)]
        return paths + [PACKED] if packed_available(dtype) else paths
    if decode.layout == "packed":
        return [decode]
    return [MatrixPath(decode.layout, decode.decode, p) for p in ("linear", "tiles")]


def wall_timer(case: str, path: MatrixPath, fn: Callable[[], Any]) -> float:
    """Seconds one call of `fn` takes with its data in memory, not in the cache (flush_cache first, untimed),
    NaN when the machine was too busy to tell (decisions.timed; the measurement's clock: tests pass their own)."""
    flush_cache()
    return timed(fn)


#: The buffer flush_cache reads: made at the first timed call of a measurement, dropped when it ends.
_flush: dict[str, Any] = {}


def last_level_cache_bytes(pattern: str = "/sys/devices/system/cpu/cpu0/cache/index*/size") -> int:
    """The size of the CPU's largest cache (sysfs; 32 MiB where it does not say)."""
    sizes = []
    for f in glob.glob(pattern):
        try:
            text = open(f).read().strip().upper()
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 * 2**20)


def flush_cache() -> None:
    """Read a buffer twice the size of the last-level cache (at most FLUSH_MAX_BYTES, and at most what the
    measurement under way may allocate: _flushing; nothing outside one), so the call timed next reads its
    matrices from memory, as a decode step does (it streams the whole model between two reads of a matrix).
    Without it, a pool that fits the cache is timed at cache speed: on a Zen 4 with a 32 MiB L3 the race picked
    our AVX512-BF16 product (then a loop of 256 bytes an iteration) over the AVX2 one from a 30 MB pool, where
    streaming Axiom's 736 MiB the AVX2 one read 20-30 % faster."""
    if "limit" not in _flush:
        return  # no measurement under way (_flushing): nothing may be allocated for good
    if "buf" not in _flush:
        limit = int(_flush["limit"])
        _flush["buf"] = torch.ones(max(8, min(2 * last_level_cache_bytes(), FLUSH_MAX_BYTES, limit)) // 8,
                                   dtype=torch.int64)
    _flush["buf"].sum()


def measure_memory(matrix_bytes: int) -> int:
    """What a measurement for a model with `matrix_bytes` of matrices may allocate at a time: an eighth of them,
    at most 2 x POOL_BYTES, so the load's peak memory barely moves."""
    return min(2 * POOL_BYTES, matrix_bytes // 8)


def flush_bytes(memory: int) -> int:
    """The part of a measurement's `memory` the flush buffer takes (the rest is the candidates' operands): half,
    at most twice the last-level cache. So a load's peak memory moves no more than it did without flushing:
    the measurement stays within an eighth of the model's matrix bytes, the flush buffer included (a model
    too small to spare twice the cache is flushed in part, its race closer to cache speed)."""
    return min(2 * last_level_cache_bytes(), FLUSH_MAX_BYTES, memory // 2)


@contextlib.contextmanager
def _flushing(limit: int) -> Iterator[None]:
    """One measurement's lifetime of the flush buffer, of at most `limit` bytes."""
    _flush.clear()
    _flush["limit"] = limit
    try:
        yield
    finally:
        _flush.clear()


def representative_shapes(mats: list[torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Per class, the [out, in] shape holding the most bytes in the model (ties: the first met)."""
    by_class: dict[str, Counter] = {c: Counter() for c in CLASSES}
    for w in mats:
        out_f, in_f = w.shape
        by_class["widening" if out_f > in_f else "narrowing"][(out_f, in_f)] += w.numel()
    return {c: count.most_common(1)[0][0] for c, count in by_class.items() if count}


def _pool(shape: tuple[int, int], dtype: torch.dtype, layout: str, itemsize: float, pool_bytes: int) -> list[Any]:
    """Constant-filled matrices of `shape`, cut to MATRIX_BYTES or half of `pool_bytes` (rows dropped, the input width
    kept), in `layout`, enough copies to fill `pool_bytes` (at least two). int4 ones (INT4) are (packed, scales,
    group) triples in aten's layout ("row") or ours ("nibbles")."""
    out_f, in_f = shape
    rows = max(1, min(out_f, int(min(MATRIX_BYTES, pool_bytes // 2) // (in_f * itemsize))))
    copies = max(2, min(8, int(pool_bytes // (rows * in_f * itemsize))))
    if dtype == cpu_gemv.INT4:
        return [_int4_matrix(rows, in_f, layout, i) for i in range(copies)]
    pool = []
    for i in range(copies):
        # A constant fill: the kernels' time does not depend on the values, and drawing random ones cost more
        # than the timing under load.
        fill = i + 1 if dtype == torch.int8 else 0.01 * (i + 1)
        w = torch.full((in_f, rows) if layout == "column" else (rows, in_f), fill, dtype=dtype)
        pool.append(w.t() if layout == "column" else prepack(w) if layout == "packed" else w)
    return pool


def _int4_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """The shape an int4 class is timed at: its own, or, where no int4 group divides the input width (such a matrix
    is quantized to int8 rows, quant._pack; Byrne has a 2,000-wide one), the width rounded up to 128, the nearest
    one both int4 layouts take."""
    from .quant import GROUPS

    out_f, in_f = shape
    return shape if any(in_f % g == 0 for g in GROUPS) else (out_f, -(-in_f // 128) * 128)


def _int4_matrix(rows: int, in_f: int, layout: str, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A constant int4 matrix as quant.py packs one (its time does not depend on the values): (packed, scales, group)
    in aten's layout ("row") or ours ("nibbles")."""
    from .quant import GROUPS

    group = next(g for g in GROUPS if in_f % g == 0)  # (_int4_shape: one does)
    if layout == "nibbles":
        k128 = -(-in_f // 128) * 128
        return (torch.full((rows, k128 // 2), 17 * (i % 15 + 1), dtype=torch.uint8),
                torch.full((rows, k128 // group, 2), 0.01, dtype=torch.bfloat16), group)
    rows16 = -(-rows // 16) * 16
    q = torch.full((rows16, in_f), i % 15 + 1, dtype=torch.int32)
    return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
            torch.full((in_f // group, rows16, 2), 0.01, dtype=torch.bfloat16), group)


def _linear_options(path: MatrixPath) -> dict[str, Any]:
    """cpu_linear's keywords for a dense path."""
    return {"decode_tiles": path.decode == "tiles", "prefill_tiles": path.prefill == "tiles",
            "gemv": cpu_gemv.PRODUCTS.get(path.decode, -1)}


def _product(path: MatrixPath, x: torch.Tensor, pool: list[torch.Tensor]) -> Callable[[], Any]:
    options = _linear_options(path)
    if isinstance(pool[0], tuple):  # int4
        x = x.bfloat16()
    elif pool[0].dtype == torch.int8:
        scales = torch.ones(pool[0].shape[0], dtype=torch.bfloat16)
        x = x.bfloat16()

    def call() -> None:
        for w in pool:
            if isinstance(w, tuple):  # int4 (_int4_matrix)
                packed, sz, group = w
                if path.layout == "nibbles":
                    torch.ops.smollchat_cpu.gemv_int4(x, packed, sz, group, options["gemv"])
                else:
                    torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
            elif w.dtype == torch.int8:
                if options["gemv"] > 0:
                    torch.ops.smollchat_cpu.gemv_int8(x, w, scales, options["gemv"])
                else:
                    torch.ops.aten._weight_int8pack_mm(x, w, scales)
            elif path.layout == "packed":
                packed_product(x, w)
            else:
                cpu_linear(x, w, **options)
    return call


def _race(case: str, paths: list[Any], calls: dict[Any, Callable[[], Any]], timer: Timer,
          budget_s: float, per: int = 1) -> dict[str, float]:
    """Time the paths alternately, round by round; ms per matrix by path: the fastest of the rounds after the
    first, which warms up (another process's work only ever adds time); a call multiplies by `per` matrices.
    A call the machine was too busy to time (NaN) does not count, and a path with no timed call is left out.
    A path DROP_RATIO times slower than the best in the first round stops; rounds stop at ROUNDS, or once
    `budget_s` is spent."""
    seen: dict[Any, list[float]] = {p: [] for p in paths}
    t0 = time.perf_counter()
    for p in seen:  # untimed: oneDNN generates a kernel for each new shape at its first call (packed: 10x a call)
        calls[p]()
    for r in range(ROUNDS):
        for p in seen:
            seen[p].append(timer(case, p, calls[p]))
        if r == 0 and not all(math.isnan(v[0]) for v in seen.values()):
            best = min(v[0] for v in seen.values() if not math.isnan(v[0]))
            seen = {p: v for p, v in seen.items() if not v[0] > DROP_RATIO * best}
        if time.perf_counter() - t0 > budget_s:
            break
    out = {}
    for p, v in seen.items():
        timed_calls = [t for t in v[1:] if not math.isnan(t)] or [t for t in v[:1] if not math.isnan(t)]
        if timed_calls:
            out[str(p)] = 1000 * min(timed_calls) / per
    return out


def measure(shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype, timer: Timer = wall_timer,
            budget_s: float = 0.25, memory: int = 2 * POOL_BYTES) -> tuple[dict[str, MatrixPath], dict[str, dict[str, float]]]:
    """The fastest path per class on this machine, and the times (ms) each case measured; a class the machine
    was too busy to measure is missing from the choice. The random matrices and the flush buffer take at most
    about `memory` bytes at a time (every layout's pool, and flush_bytes of it to flush the cache)."""
    item = 0.5 if dtype == cpu_gemv.INT4 else torch.empty((), dtype=dtype).element_size()
    chosen: dict[str, MatrixPath] = {}
    timings: dict[str, dict[str, float]] = {}
    flush = flush_bytes(memory)
    memory -= flush
    with torch.inference_mode(), _flushing(flush):
        for cls, shape in shapes.items():
            # One class at a time in its own call: its matrices are freed before the next class's are made.
            best = _measure_class(cls, shape, dtype, item, timer, budget_s, memory, timings)
            if best is not None:
                chosen[cls] = best
    return chosen, timings


def _measure_class(cls: str, shape: tuple[int, int], dtype: torch.dtype, item: float, timer: Timer, budget_s: float,
                   memory: int, timings: dict[str, dict[str, float]]) -> MatrixPath | None:
    """measure() for one class: its fastest path (None when the machine was too busy to tell), the times
    added to `timings` by case."""
    paths = candidates(dtype, "decode")
    layouts = sorted({p.layout for p in paths})
    if dtype == cpu_gemv.INT4:
        shape = _int4_shape(shape)
    pools = {layout: _pool(shape, dtype, layout, item, memory // len(layouts)) for layout in layouts}
    one = torch.randn(1, shape[1]).to(dtype if dtype.is_floating_point else torch.bfloat16)
    case = f"{cls} decode {shape[0]}x{shape[1]}"
    calls = {p: _product(p, one, pools[p.layout]) for p in paths}
    timings[case] = _race(case, paths, calls, timer, budget_s, len(pools["row"]))
    if not timings[case]:
        return None
    best = MatrixPath.parse(min(timings[case], key=timings[case].get))
    if dtype in (torch.int8, cpu_gemv.INT4) and best.decode in cpu_gemv.PRODUCTS:
        return _measure_unpack(cls, best, shape, dtype, pools[best.layout][0], timer, budget_s, timings)
    if dtype != torch.bfloat16 or best.layout == "packed":  # a packed weight has one product
        return best
    rows = torch.randn(PREFILL_ROWS, shape[1]).to(dtype)
    paths = candidates(dtype, "prefill", best)
    case = f"{cls} prefill {PREFILL_ROWS} rows"
    # A quarter of one matrix: a several-row product reads its weight once for many rows, and a slow path
    # here can take hundreds of ms a call on a busy machine.
    part = {k: v[0][:max(1, v[0].shape[0] // 4)] for k, v in pools.items() if k != "packed"}
    calls = {p: _product(p, rows, [part[p.layout]]) for p in paths}
    timings[case] = _race(case, paths, calls, timer, budget_s)
    if not timings[case]:
        return None
    return MatrixPath.parse(min(timings[case], key=timings[case].get))


def _measure_unpack(cls: str, best: MatrixPath, shape: tuple[int, int], dtype: torch.dtype, w: Any, timer: Timer,
                    budget_s: float, timings: dict[str, dict[str, float]]) -> MatrixPath:
    """`best` (a quantized class's path through one of our one-row products) with the row count past which its
    calls unpack the weights for F.linear as measured here ("unpack<N>": the most rows in UNPACK_RACE_ROWS at
    which the class's own many-row product still won; 4 where unpacking won at the fewest); `best` itself where
    the machine was too busy to tell. Times added to `timings`."""
    from .quant import QuantLinear

    level = cpu_gemv.PRODUCTS[best.decode]
    if dtype == cpu_gemv.INT4:
        packed, sz, group = w
        rows = min(packed.shape[0], max(16, int(UNPACK_RACE_BYTES // (shape[1] / 2))))
        layer = QuantLinear("int4", shape[1], rows, packed[:rows], sz[:rows], group, layout="nibbles")
    else:
        rows = min(w.shape[0], max(16, UNPACK_RACE_BYTES // shape[1]))
        layer = QuantLinear("int8", shape[1], rows, w[:rows], torch.ones(rows, dtype=torch.bfloat16))
    layer.gemv = level
    crossing = 0
    for n in UNPACK_RACE_ROWS:
        x = torch.randn(n, shape[1]).bfloat16()

        def call(limit: int) -> Callable[[], None]:
            def run() -> None:
                layer.unpack_rows = limit
                layer(x)
            return run
        case = f"{cls} prefill {n} rows, own product or unpacked"
        t = timings[case] = _race(case, ["own", "unpack"], {"own": call(n), "unpack": call(0)}, timer, budget_s / 2)
        if not t:
            return best  # too busy to tell: UNPACK_ROWS
        # (A path dropped from the race after its first round lost it by DROP_RATIO.)
        if t.get("unpack", math.inf) < t.get("own", math.inf):
            break
        crossing = n
    return MatrixPath(best.layout, best.decode, f"unpack{crossing or UNPACK_RACE_ROWS[0] // 2}")


def _decisions() -> DecisionFile:
    return DecisionFile(locations.cache_dir() / "kernels.json")


#: How a recorded measurement was taken: one made another way (before flush_cache, "flushed" here; before the
#: quantized classes' unpacking crossing, "+unpack") is taken again.
METHOD = "flushed+unpack"


def _method() -> str:
    """How a measurement is taken, and with which of our kernels: METHOD and the extension's build digest (a race our
    products won or lost is run again once their code changes: an int8 product made faster, say)."""
    return f"{METHOD}+{cpu_gemv.digest()}"


def _current(seen: Mapping[str, Any], raced: list[str]) -> bool:
    """Whether a recorded measurement still stands: taken the way this version measures, with the kernels it has,
    over the candidates this machine has now (a new product, or one that became runnable, is raced at the next
    load)."""
    return seen.get("method") == _method() and sorted(seen.get("candidates") or []) == sorted(raced)


def decision_key(device: torch.device, dtype: torch.dtype, shapes: Mapping[str, tuple[int, int]]) -> str:
    """The machine (decisions.machine_key), the dtype and the shapes measured."""
    shape = ",".join(f"{c}={o}x{i}" for c, (o, i) in sorted(shapes.items()))
    return f"{machine_key(device)}|{_dtype_name(dtype)}|{shape}"


def choose(model: nn.Module, dtype: torch.dtype, device: torch.device, kernels: Any = "auto",
           quantize: str | None = None, timer: Timer | None = None) -> KernelChoice:
    """The kernel choice for a loaded model (before `apply`): its matrices' paths (_choose_matrices) and its
    decode attention (choose_attention), each measured once per machine where it is measured at all."""
    choice = _choose_matrices(model, dtype, device, kernels, quantize, timer)
    if isinstance(kernels, (Mapping, KernelChoice)):
        return choice  # forced: its attention is the record's (made runnable)
    return dataclasses.replace(choice, attention=choose_attention(model, dtype, device, kernels, timer))


def _choose_matrices(model: nn.Module, dtype: torch.dtype, device: torch.device, kernels: Any = "auto",
                     quantize: str | None = None, timer: Timer | None = None) -> KernelChoice:
    """The matrices' part of the kernel choice.

    `kernels`: "auto" (measured once per machine, dtype and shape; default() for small models), "measure" (as
    auto, but measured again over what is cached: `smollchat bench --remeasure`, after the machine was busy
    during the first measurement), "reference" (--eager), or a KernelChoice / run-card dict to force (replay).
    int8 models measure their one-row int8 product (aten's or ours), int4 ones their layout and product (aten's
    packed one, or our nibbles: cpu_gemv.INT4), where this machine can run ours.
    """
    if isinstance(kernels, Mapping):
        kernels = KernelChoice.from_dict(kernels)
    # Quantized weights are measured as their own kind of matrix: aten's int8 or int4 product against ours.
    mdtype = {"int8": torch.int8, "int4": cpu_gemv.INT4}.get(quantize or "", dtype)
    if isinstance(kernels, KernelChoice):
        if kernels.dtype != _dtype_name(dtype):
            raise ValueError(f"the kernel choice was made for {kernels.dtype}, the model is {_dtype_name(dtype)}")
        return _runnable(kernels, mdtype, device)
    if kernels not in ("auto", "measure", "reference"):
        raise ValueError(f"kernels must be auto, measure, reference or a recorded choice, not {kernels!r}")
    if device.type != "cpu" or kernels == "reference" or dtype not in (torch.float32, torch.bfloat16):
        return reference(dtype)
    quantized = KernelChoice(_dtype_name(dtype), source="quantized")
    if quantize and len(candidates(mdtype, "decode")) < 2:
        return quantized  # aten's product only: nothing to race
    mats = [w for w in model.matrices() if w.dtype == dtype and w.dim() == 2]
    nbytes = sum(w.numel() * w.element_size() for w in mats)
    if nbytes < MIN_MEASURE_BYTES:
        return quantized if quantize else default(dtype)
    shapes = representative_shapes(mats)
    key = decision_key(device, mdtype, shapes)
    raced = [str(p) for p in candidates(mdtype, "decode")]
    seen = _decisions().get(key) if kernels == "auto" else None
    if isinstance(seen, dict) and _current(seen, raced):
        try:
            seen = {**seen, "dtype": _dtype_name(dtype)}
            return _runnable(KernelChoice.from_dict(seen, "cached"), mdtype, device)  # (loads our GEMV)
        except ValueError:
            pass  # written by another version: measure again
    t = time.perf_counter()
    chosen, timings = measure(shapes, mdtype, timer or wall_timer, memory=measure_memory(nbytes))
    fallback = quantized if quantize else default(dtype)
    if set(chosen) != set(shapes):
        # Too busy to measure (decisions.timed): this load takes the default, and the next load measures again.
        log.warning("the machine was too busy to measure the kernel choice for %s: the default for this load", key)
        return KernelChoice(fallback.dtype, fallback.widening, fallback.narrowing, "default (machine busy)", timings)
    choice = KernelChoice(_dtype_name(dtype), chosen.get("widening", fallback.widening),
                          chosen.get("narrowing", fallback.narrowing), "measured" + (f" ({quantize})" if quantize else ""),
                          timings)
    _decisions().record(key, {**choice.as_dict(), "timings_ms": timings, "measure_s": round(time.perf_counter() - t, 3),
                              "method": _method(), "candidates": raced})
    log.info("kernel choice for %s: %s in %.2f s", key, choice.paths, time.perf_counter() - t)
    return choice


def _runnable(choice: KernelChoice, dtype: torch.dtype, device: torch.device) -> KernelChoice:
    """A forced choice with the paths this machine cannot run (prepacked weights, our GEMV) put back to
    PyTorch's dense products, its source saying so."""
    gemvs = cpu_gemv.products(dtype) if device.type == "cpu" and any(
        p.decode in cpu_gemv.PRODUCTS for p in (choice.widening, choice.narrowing)) else []
    packs = device.type == "cpu" and packed_available(dtype)
    missing: list[str] = []

    def fix(p: MatrixPath) -> MatrixPath:
        if p.layout == "nibbles" and p.decode not in gemvs:
            missing.append(f"the {p.decode} product")
            return ROW  # aten's int4 layout
        if p == PACKED and not packs:
            missing.append("prepacked weights")
            return ROW
        if p.decode in cpu_gemv.PRODUCTS and p.decode not in gemvs:
            missing.append(f"the {p.decode} product")
            return MatrixPath(p.layout, "linear", "linear" if unpack_rows(p) is not None else p.prefill)
        return p
    widening, narrowing = fix(choice.widening), fix(choice.narrowing)
    attention = choice.attention
    if attention != "sdpa" and (device.type != "cpu" or attention not in cpu_gemv.attention_products()):
        missing.append(f"the {attention} attention")
        attention = "sdpa"
    if not missing:
        return choice
    return KernelChoice(choice.dtype, widening, narrowing,
                        f"{choice.source}; {' and '.join(dict.fromkeys(missing))} unavailable here: PyTorch's products",
                        attention=attention)


def _file_mapping(ptr: int) -> bool:
    """Whether address `ptr` lies in a file mapping of this process (/proc/self/maps names a path)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return len(parts) == 6 and parts[5].startswith("/")
    return False


def release_mapped(t: torch.Tensor) -> bool:
    """Drop the pages of a tensor that is a view of a mapped checkpoint file once its values have been copied
    (madvise DONTNEED; Linux). A float32 load uses the safetensors mapping in place, and the mapping lives
    while any of its tensors does, so without this a re-laid-out matrix would be held twice (its mapped pages
    and the copy): 2.2x the weights at the peak instead of one matrix more. File pages, so a later read of the
    old view would find the file's bytes again; anonymous memory is never touched. True when released."""
    n = t.numel() * t.element_size()
    if not sys.platform.startswith("linux") or n < 16 * mmap.PAGESIZE:
        return False
    try:
        if not _file_mapping(t.data_ptr()):
            return False
        lo = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = (t.data_ptr() + n) // mmap.PAGESIZE * mmap.PAGESIZE
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc.madvise(lo, hi - lo, mmap.MADV_DONTNEED) == 0
    except (OSError, ValueError, AttributeError):
        return False


def apply(model: nn.Module, choice: KernelChoice) -> None:
    """Store the model's matrices in the chosen layouts and route its bf16 products; remembers the choice
    as `model.kernel_choice` (Engine.info, run cards)."""
    dtype = getattr(torch, choice.dtype)
    if PACKED in (choice.widening, choice.narrowing):
        _pack_linears(model, choice, dtype)
    for w in model.matrices():
        if w.dtype == dtype and w.dim() == 2 and w.is_contiguous() and choice.path_for(w).layout == "column":
            # Same shape, transposed strides: a one-row F.linear then runs MKL's x @ W GEMV.
            old = w.data
            w.data = old.t().contiguous().t()
            release_mapped(old)
    for m in model.modules():
        if isinstance(m, nn.Linear) and not isinstance(m, PackedLinear) and m.weight.dtype == dtype:
            path = choice.path_for(m.weight)
            if path.layout != "packed" and (path.decode != "linear" or path.prefill == "tiles"):
                m.__class__ = CpuLinear
                for k, v in _linear_options(path).items():
                    setattr(m, k, v)
    head = model.head_matrix()
    if head is not None and head.dtype == dtype and not head.is_mkldnn:
        path = choice.path_for(head)
        if path.layout != "packed" and (path.decode != "linear" or path.prefill == "tiles"):
            model.head_product = functools.partial(cpu_linear, **_linear_options(path))
    _route_attention(model, choice)


def _pack_linears(model: nn.Module, choice: KernelChoice, dtype: torch.dtype) -> None:
    """Prepack every Linear of `dtype` whose class the choice packs, except those the architecture reads
    directly (QUANT_SKIP) and an untied head (project_head is passed its weight); each dense weight is freed
    (or its mapped pages released) as its packed copy is made."""
    from .quant import _targets

    slot = model_slot(model)
    swapped, _kept = _targets(model)
    for name, _parent, _attr, m in swapped:
        if m.weight.dtype == dtype and choice.path_for(m.weight) == PACKED:
            old = m.weight.data
            pack_linear(m, f"{slot}/{name}")
            release_mapped(old)


def apply_quantized(model: nn.Module, choice: KernelChoice) -> None:
    """After quantize_model: route the quantized layers' one-row calls to the product the choice names (int8: ours
    where it measured faster, else aten's; int4: ours at its level where quantize_model packed our nibbles), and
    remember the choice as `model.kernel_choice`."""
    from .quant import UNPACK_ROWS, QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear) and (m.mode == "int8" or m.layout == "nibbles"):
            path = choice.path_for((m.out_features, m.in_features))
            m.gemv = cpu_gemv.PRODUCTS.get(path.decode, -1 if m.mode == "int8" else 0)
            m.unpack_rows = unpack_rows(path) or UNPACK_ROWS
    _route_attention(model, choice)


def _route_attention(model: nn.Module, choice: KernelChoice) -> None:
    """Set each cached-attention module's decode attention, and remember the choice as `model.kernel_choice`."""
    level = cpu_gemv.ATTENTION.get(choice.attention, 0)
    for m in model.modules():
        if isinstance(m, CachedAttention):
            m.decode_attention = level
    model.kernel_choice = choice


#: The cached length the decode attention is measured at (or the model's context, if shorter), and how many
#: layers' caches a measured call reads (so that it reads memory as a step does, not one cache kept hot).
ATTENTION_LENGTH = 512
ATTENTION_POOL = 8


def attention_heads(model: nn.Module) -> tuple[int, int, int, int] | None:
    """(query heads, kv heads, key width, value width) of the model's cached attention, None without one."""
    return next((m.attention_heads() for m in model.modules() if isinstance(m, CachedAttention)), None)


def choose_attention(model: nn.Module, dtype: torch.dtype, device: torch.device, kernels: Any = "auto",
                     timer: Timer | None = None) -> str:
    """The decode attention for a loaded model: "sdpa", or ours where this machine runs it and a measurement
    (once per machine, dtype and head shape, cached beside the matrices' choice) found it faster. Small models
    (the demos) and --eager keep SDPA."""
    heads = attention_heads(model)
    ours = cpu_gemv.attention_products() if device.type == "cpu" and heads and kernels != "reference" else []
    nbytes = sum(w.numel() * w.element_size() for w in model.matrices())
    if not ours or nbytes < MIN_MEASURE_BYTES or dtype not in (torch.float32, torch.bfloat16):
        return "sdpa"
    length = min(ATTENTION_LENGTH, getattr(model, "max_context", ATTENTION_LENGTH))
    key = f"{machine_key(device)}|attention|{_dtype_name(dtype)}|heads={'x'.join(map(str, heads))}|L={length}"
    raced = ["sdpa", *ours]
    seen = _decisions().get(key) if kernels == "auto" else None
    if isinstance(seen, dict) and _current(seen, raced) and seen.get("attention") in raced:
        return seen["attention"]
    timings = measure_attention(heads, dtype, length, ours, timer or wall_timer, memory=measure_memory(nbytes))
    if not timings:
        log.warning("the machine was too busy to measure the decode attention: SDPA for this load")
        return "sdpa"
    best = min(timings, key=timings.get)
    _decisions().record(key, {"attention": best, "timings_ms": timings, "method": _method(), "candidates": raced})
    return best


def measure_attention(heads: tuple[int, int, int, int], dtype: torch.dtype, length: int, ours: list[str],
                      timer: Timer = wall_timer, budget_s: float = 0.25, memory: int = 2 * POOL_BYTES) -> dict[str, float]:
    """ms per call of SDPA and of each of `ours` for one token over `length` cached ones (random caches of the
    model's head shape, ATTENTION_POOL of them read in turn); empty when the machine was too busy to tell. The
    flush buffer takes flush_bytes(memory)."""
    h, hkv, d, dv = heads
    g = torch.Generator().manual_seed(0)
    caches = [(torch.randn(1, hkv, length, d, generator=g).to(dtype), torch.randn(1, hkv, length, dv, generator=g).to(dtype))
              for _ in range(ATTENTION_POOL)]
    q = torch.randn(1, 1, h, d, generator=g).to(dtype)

    def call(level: int) -> Callable[[], None]:
        def run() -> None:
            for k, v in caches:
                causal_attention(q, k, v, product=level)
        return run
    calls = {"sdpa": call(0), **{name: call(cpu_gemv.ATTENTION[name]) for name in ours}}
    with torch.inference_mode(), _flushing(flush_bytes(memory)):
        return _race(f"attention decode {h}x{hkv}x{d} L={length}", list(calls), calls, timer, budget_s, ATTENTION_POOL)
