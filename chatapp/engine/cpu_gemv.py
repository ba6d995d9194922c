"""Our own one-row CPU product (csrc/gemv.cpp): y = W x for a row-major bf16 or fp32 weight, one of the decode
products kernels.py measures against PyTorch's on the running machine.

Why: PyTorch's one-row products leave memory bandwidth unused on the CPUs measured (bench/README.md). On a
2-vCPU Zen 4, a decode step of Axiom-380M in bf16 read its weights at ~20 GB/s through F.linear or oneDNN's
prepacked linear while llama.cpp read the same bytes at ~28 GB/s, and MKL's fp32 GEMV ran on one thread of
two. The kernel streams each weight row once in memory order over torch's intra-op threads (at::parallel_for)
with AVX512-BF16 dot products where the CPU has them, AVX2/FMA otherwise (portable C++ below that). The weight
keeps its row-major layout, so a tied head (the embedding table the lookup reads) takes it too.

It is a C++ extension built here, once per machine and torch version, under smollchat's cache folder (about a
minute on 2 cores; later loads load the built library). Without a C++ compiler, or if the build fails, the
product is simply not a candidate (one log line) and the model runs on PyTorch's products.

The level is the highest the CPU has, capped by PyTorch's own kernel family (ATEN_CPU_CAPABILITY=avx2 runs the
AVX2 level here too, so the test suite's second pass exercises it). Numerics: fp32 accumulation in another
order than F.linear's, the bf16 result rounded once: equal to the reference within the dtype's tolerance, not
bit for bit (tests/engine/test_cpu_gemv.py against an fp64 oracle).

int8 weights have one more level where the CPU has AVX512-VNNI (gemv-avx512vnni): x is rounded to int8 in
blocks of 32 values (one fp32 scale each, as llama.cpp's Q8_0 products round theirs) and multiplied int8 by
int8 (vpdpbusd), 64 weights an instruction where the other levels widen each weight to fp32 first. That is a
second rounding, on x, so it is measured against the int8 weights alone: on every golden fixture's decode its
logits stay within 1.6x their distance from fp32 and agree on the top token as often, less one position
(tests/engine/test_quant.py); bench/README.md gives the figures. The kernel choice takes it where it is faster
(a Zen 4: 26-31 GB/s on Axiom-380M's matrices against 21-28 for the widening levels and 10-15 for aten's).
CPUs with AVX2 but no AVX-512 (Zen 2/3, Intel's client cores) get the same int8 x int8 product from
gemv-avx2-q8: vpmaddubsw on the weight's magnitude and x signed by the weight, 32 weights an instruction, the
same rounding of x, so the same quality checks hold (and the AVX2 kernel-family pass of the tests runs it).
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path

import torch

from .. import locations

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "gemv.cpp"
#: Built into the same library: the decode step's attention (csrc/attention.cpp; layers.causal_attention) and the
#: fused decode step of a dense transformer that calls both (csrc/dense_step.cpp; dense_step.py).
SOURCES = (SOURCE, SOURCE.with_name("attention.cpp"), SOURCE.with_name("dense_step.cpp"))
#: Included by the sources (shared SIMD helpers; the products one source calls in another): hashed into the build
#: folder's name with them.
HEADERS = (SOURCE.with_name("simd.h"), SOURCE.with_name("ops.h"))
#: -fopenmp: at::parallel_for is a header template that runs serially unless the extension itself is built
#: with OpenMP (then it shares the libgomp torch loaded: same soname, one thread pool).
CFLAGS = ["-O3", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
_LEVELS = {"DEFAULT": 0, "AVX2": 1, "AVX512": 3}
_lock = threading.Lock()
_state: dict[str, object] = {}


def digest() -> str:
    """A hash of the sources, the header and the flags: which kernels a build holds (kernels.py measures its race
    again when they change)."""
    text = b"".join(f.read_bytes() for f in SOURCES + HEADERS) + repr((CFLAGS, LDFLAGS)).encode()
    return hashlib.sha256(text).hexdigest()[:12]


def build_dir() -> Path:
    """Where the extension is built: keyed by the source, the flags and torch (the library dispatches on the CPU
    at run time, so one cache folder can serve machines of different kinds)."""
    return locations.cache_dir() / "extensions" / f"gemv-{digest()}-torch{torch.__version__}"


def load() -> bool:
    """Build (the first time on this machine) and load the extension; False, with the reason in `error()`,
    where it cannot be."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        from .graphs import find_cxx

        if find_cxx() is None:
            _state.update(ok=False, error="no C++ compiler (set CXX or install g++)")
            return False
        from torch.utils import cpp_extension

        d = build_dir()
        d.mkdir(parents=True, exist_ok=True)
        if not any(d.glob("*.so")):
            log.warning("building smollchat's CPU product (once on this machine and torch version: about a minute)")
        try:
            cpp_extension.load(name=f"smollchat_gemv_{d.name.split('-')[1]}", sources=[str(f) for f in SOURCES],
                               build_directory=str(d), extra_cflags=CFLAGS, extra_ldflags=LDFLAGS,
                               is_python_module=False, verbose=False)
            torch.library.register_fake("smollchat_cpu::gemv")(_fake)
            torch.library.register_fake("smollchat_cpu::gemv_int8")(_fake_int8)
            torch.library.register_fake("smollchat_cpu::decode_attention")(_fake_attention)
            torch.library.register_fake("smollchat_cpu::gemv_int4")(_fake_int4)
            torch.library.register_fake("smollchat_cpu::int4_unpack")(_fake_unpack)
            torch.library.register_fake("smollchat_cpu::int8_unpack")(_fake_unpack8)
        except Exception as e:  # noqa: BLE001 - any build or load failure: PyTorch's products only
            _state.update(ok=False, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}")
            log.warning("smollchat's CPU product could not be built, using PyTorch's (%s)", _state["error"])
            return False
        _state.update(ok=True, error="")
        return True


def _fake(x: torch.Tensor, w: torch.Tensor, level: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _fake_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, level: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], q.shape[0])


def _fake_int4(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group: int, level: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _fake_unpack(packed: torch.Tensor, sz: torch.Tensor, group: int, k: int, level: int) -> torch.Tensor:
    return packed.new_empty(packed.shape[0], k, dtype=torch.bfloat16)


def _fake_unpack8(q: torch.Tensor, scales: torch.Tensor, level: int) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=torch.bfloat16)


def _fake_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, level: int) -> torch.Tensor:
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def error() -> str:
    return str(_state.get("error", ""))


#: The kernel choice's product names (kernels.MatrixPath) and the level each runs at: bf16 weights take
#: gemv-avx2 and gemv-avx512bf16, fp32 ones gemv-avx2 and gemv-avx512 (AVX-512 F), int8 ones (gemv_int8) those
#: two and the int8 x int8 ones, gemv-avx512vnni and gemv-avx2-q8 (x quantized in blocks of 32, as llama.cpp's
#: Q8_0 products do). int4 weights (INT4: quant.py's "nibbles" layout, gemv_int4) take the byte products only,
#: the same two names: nibbles by int8 x, x rounded with one scale a span of 128.
PRODUCTS = {"gemv-avx2": 1, "gemv-avx512bf16": 2, "gemv-avx512": 2, "gemv-avx512vnni": 3, "gemv-avx2-q8": 4}
#: The level of the CPU a product needs, where it is not its own number: gemv-avx2-q8 (int8 x int8 by vpmaddubsw,
#: for the many CPUs without AVX-512) needs only AVX2.
_NEEDS = {"gemv-avx2-q8": 1}
#: The marker dtype of quant.py's int4 weights in the kernel choice (candidates, decision keys): nibbles, stored
#: two to a uint8.
INT4 = torch.uint4
_NAMES = {torch.bfloat16: ("gemv-avx2", "gemv-avx512bf16"), torch.float32: ("gemv-avx2", "gemv-avx512"),
          torch.int8: ("gemv-avx2", "gemv-avx2-q8", "gemv-avx512", "gemv-avx512vnni"),
          INT4: ("gemv-avx2-q8", "gemv-avx512vnni")}
#: Where the CPU's level for a dtype comes from (gemv_cpu_levels: bf16, fp32, int8): int4 needs what int8 does.
_LEVEL_OF = {INT4: torch.int8}


def products(dtype: torch.dtype) -> list[str]:
    """The product names this machine can run for `dtype` weights (torch.int8: quant.py's int8 rows, INT4 its
    int4 nibbles), building
    the extension on first ask: the AVX2 level wherever the CPU has AVX2 and FMA, the AVX-512 ones where it has
    those too (all are raced: on a Zen 4 the AVX2 one read bf16 and int8 weights faster than the AVX-512 one)."""
    if dtype not in _NAMES or not load():
        return []
    top = level(dtype)
    return [name for name in _NAMES[dtype] if _NEEDS.get(name, PRODUCTS[name]) <= top]


def level(dtype: torch.dtype = torch.bfloat16) -> int:
    """The highest instruction level the kernel runs at for `dtype` weights: the CPU's, capped by PyTorch's
    kernel family (AVX2: level 1; DEFAULT: none)."""
    levels = torch.ops.smollchat_cpu.gemv_cpu_levels()
    return _capped(levels[(torch.bfloat16, torch.float32, torch.int8).index(_LEVEL_OF.get(dtype, dtype))])


def _capped(cpu: int) -> int:
    """A level the CPU has, capped by PyTorch's kernel family (ATEN_CPU_CAPABILITY)."""
    return min(int(cpu), _LEVELS.get(torch.backends.cpu.get_cpu_capability(), 3))


#: Our decode attention (csrc/attention.cpp) by name, and its level: the kernel choice races it against SDPA.
ATTENTION = {"attention-avx512": 2, "attention-avx2": 1}


def attention_products() -> list[str]:
    """The decode attention this machine can run besides PyTorch's SDPA: AVX-512 F where PyTorch's own kernel
    family is AVX512 too, AVX2 + FMA where it is AVX2 or more (both are raced: neither is assumed faster)."""
    if not load():
        return []
    top = _capped(torch.ops.smollchat_cpu.attention_cpu_level())
    return [name for name, lvl in ATTENTION.items() if lvl <= top]
