"""The engine's CPU span kernel (`span_attention.cpp`): many problems in one call, each query row
attending one span of key rows (row r: keys r + first .. r + last), each thread taking strips of a
problem's rows with the keys they see packed once, in cache. A stride's classes (strided.py: causal
squares of a few hundred rows) and a sliding window's band (band.py) run on it. Its library
also merges two partials (`merge`: merge.py's `merge_to` on the CPU), each row alike whatever the
tensors' sizes and threads.

torch's CPU flash kernel, the alternative, computes such problems 32 or 64 query rows at a time,
packs each block's keys anew and reads a class's rows (s rows apart) from memory: 0.41-0.52
computed pairs per ns at n = 16384 on a 2-core Intel Xeon, against dense SDPA's 0.98. The kernel is
C++ built at first use by the host's compiler for its own CPU (`-march=native`), kept in a cache
directory keyed by the source, the compiler and the CPU; without a compiler (or where the build
fails, said once in the log) the engine keeps torch's kernel. Where the CPU has AMX, bfloat16's
products run on its tiles (`computes_natively`), else where it has AVX512_BF16 bfloat16's scores are
dot products of its pairs (`bfloat16_products`); float32 and float16 in float32 vectors."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from .device import kernel_device

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("span_attention.cpp")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
BUILD_TIMEOUT_S = 300
# The dtypes it reads and writes, as the source numbers them.
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# A span without a bound on one side: past any key row.
UNBOUNDED = 1 << 40


def cache_dir() -> Path:
    """Where built kernels are kept: $ATTN_KERNEL_CACHE, else the user's cache directory
    ($XDG_CACHE_HOME or ~/.cache)/attention-service."""
    explicit = os.environ.get("ATTN_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "attention-service"


def _cpu_key() -> str:
    """What the build depends on beyond the source and the compiler: this CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() + platform.processor()
    lines = [line for line in info.splitlines() if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n".join(sorted(set(lines)))


def compiler() -> str | None:
    """The C++ compiler to build with: $CXX, else c++ or g++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build(cxx: str, flags: tuple[str, ...] = FLAGS) -> Path:
    """The library built by compiler `cxx` with `flags`, compiled now unless the cache holds it
    (written whole, then renamed: two processes building at once each leave a complete file)."""
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256("\0".join((SOURCE.read_text(), version, " ".join(flags), _cpu_key())).encode()).hexdigest()
    directory = cache_dir()
    built = directory / f"span_attention-{key[:20]}.so"
    if built.exists():
        return built
    directory.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=directory, suffix=".so.partial")
    os.close(handle)
    try:
        subprocess.run([cxx, *flags, str(SOURCE), "-o", partial], check=True, capture_output=True, text=True,
                       timeout=BUILD_TIMEOUT_S)
        os.replace(partial, built)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return built


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel, built and loaded once per process; None where it cannot be (no compiler, a
    failed build: logged once), and the engine then keeps torch's kernel."""
    host_compiler = compiler()
    if not host_compiler:
        log.warning("no C++ compiler found: strided, band and fixed attention run on torch's CPU kernel")
        return None
    try:
        return load(build(host_compiler))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        log.warning("the span kernel did not build (%s): strided, band and fixed attention run on torch's CPU kernel",
                    detail)
        return None


def load(path: Path) -> ctypes.CDLL:
    """A built kernel, its functions typed."""
    loaded = ctypes.CDLL(str(path))
    function = loaded.span_attention
    # its addresses, sizes and strides: one int64 array, passed by address (`_int64s`)
    function.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_int]
    function.restype = ctypes.c_int
    loaded.span_attention_joined.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int]
    loaded.span_attention_joined.restype = ctypes.c_int
    loaded.span_merge.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int] * 3 + [ctypes.c_int64, ctypes.c_void_p,
                                                                               ctypes.c_void_p, ctypes.c_int]
    loaded.span_merge.restype = ctypes.c_int
    loaded.span_attention_bfloat16_products.restype = ctypes.c_int
    return loaded


# How the built kernel multiplies bfloat16, by the code `span_attention_bfloat16_products` returns.
BFLOAT16_PRODUCTS = ("float32 vectors", "bfloat16 pairs", "AMX tiles")


def bfloat16_products() -> str | None:
    """How the kernel multiplies bfloat16 here (one of BFLOAT16_PRODUCTS), None where it is not
    built: on AMX's tiles where the CPU has them and the build targets it; else its scores as dot
    products of bfloat16 pairs where the CPU has AVX512_BF16 (n = 16384, H = 8, D = 64, on an AMD
    EPYC: 0.83-0.89 of the time in float32 vectors); else in float32 vectors."""
    return None if library() is None else BFLOAT16_PRODUCTS[library().span_attention_bfloat16_products()]


def computes_natively(dtype: torch.dtype) -> bool:
    """Whether the kernel multiplies `dtype` in itself as fast as torch's AMX kernels: bfloat16 on
    AMX's tiles (fixed(128, 8) at n = 16384, H = 8, D = 64: 0.65 of torch's AMX kernel's time,
    sliding_window(256) 0.59 of its own in float32 vectors)."""
    return dtype == torch.bfloat16 and bfloat16_products() == "AMX tiles"


# How the library cuts a short run's keys into parts that threads share (`split_keys`): at every
# multiple of SPLIT_PART_KEYS keys for up to 32 rows, of SPLIT_KEYS_PER_ROW keys a row for more (its
# rows rounded up to a power of two of positions).
SPLIT_PART_KEYS = 1024
SPLIT_KEYS_PER_ROW = 32
# Fewest units of the library's work (a problem's part of its keys) a batch item's query heads
# folded into rows of their key/value heads must leave (`folding_pays`). Folded / a query head a
# problem through `engine.attention`, one row, H over Hkv heads (AMD EPYC, 2 threads, best of 27 in
# one process, 2026-12-07): dense, D = 64, H = 8 over 2 after 1024 keys (2 units) 1.22-1.38, after
# 2048 (4) 1.13-1.18, after 4096 (8) 0.91-0.98, after 16384 0.80-0.87; H = 8 over 1, D = 128, after
# 1024 (1) 1.32-1.44, after 4096 (4) 0.72-0.84; H = 32 over 8, D = 128, after 256 (8) 0.94-1.12, after
# 2048 0.72-0.84, after 16384 0.46-0.57; 4 rows, H = 8 over 2 after 1024 (2) 1.12-1.16, after 2048 (4)
# 0.93-0.96; sliding_window(1024), H = 8 over 1 1.27-1.46 (1 or 2), H = 32 over 8 0.69-0.81;
# fixed(128, 8)'s summary keys, H = 8 over 2, D = 64, after 16384 keys (2) 1.11, after 65536 (8) 0.66.
FOLDED_MIN_UNITS = 4


def folding_pays(kv_heads: int, positions: int, group: int, keys: int) -> bool:
    """Whether a short run's query heads folded into rows of their key/value heads (which then read
    each key once for them, `LONE_ROWS` at a time) leaves FOLDED_MIN_UNITS units of work: `kv_heads`
    problems a batch item, each over `keys` keys cut into parts as `split_keys` cuts them for
    `positions` positions of `group` rows. Fewer, larger units than a query head a problem lose more
    to the threads' shares than the reads they spare. Decided from a batch item's shape alone, never
    from the batch or the threads: folded strips past LONE_ROWS round differently, and a row's
    result stays the same alone, batched or on any threads."""
    rows = (1 << (positions - 1).bit_length()) * group
    part = max(rows * SPLIT_KEYS_PER_ROW, SPLIT_PART_KEYS)
    return kv_heads * -(-keys // part) >= FOLDED_MIN_UNITS


def takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the kernel computes these: where the engine uses the CPU's kernels and rules
    (`kernel_device`: not CUDA's, nor CUDA's emulated on CPU tensors), in a dtype it reads,
    features adjacent (any head dims: it reads them 16 at a time, the last few masked or through a
    buffer), and the kernel built."""
    return (kernel_device(q.device) == "cpu" and q.dtype in DTYPES and k.dtype == v.dtype == q.dtype
            and q.stride()[-1] == k.stride()[-1] == v.stride()[-1] == 1 and library() is not None)


# The most calls the library computes as one (`span_attention`'s own and its `joined`), as its
# MOST_JOINED: a union's decode row, its window's keys and up to three strides'.
MOST_JOINED = 4


class SpanArguments(NamedTuple):
    """A call's arguments as the library reads them (`packed`), and the tensors they point into:
    views made for the call among them, held with the arguments so that they outlive the call."""

    packed: bytes
    tensors: tuple[torch.Tensor | None, ...]


def span_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                   scale: float, joined: tuple[SpanArguments, ...] = (), **span) -> None:
    """`span_arguments`' call (its keyword arguments `span`) run, and with it the `joined` calls, the
    span_arguments of up to MOST_JOINED - 1 others over the same rows and other keys (a union's
    decode row: its strides' keys beside its window's): the library computes them as one, each
    row's result over all their keys written once into this call's out and lse, with no partial
    between them (every call's out and lse views of the same rows, in one order, of one dtype,
    none with a seed)."""
    call = span_arguments(q, k, v, out, lse, **span)
    if call is None:  # no row
        return
    if joined:
        packed = [call.packed, *(other.packed for other in joined)]
        status = library().span_attention_joined((ctypes.c_char_p * len(packed))(*packed), len(packed), scale,
                                                 torch.get_num_threads())
    else:
        status = library().span_attention(call.packed, scale, torch.get_num_threads())
    if status == 1:
        raise MemoryError(f"the span kernel could not allocate its buffers (status {status})")
    assert status == 0, f"span_attention returned {status}"


def span_arguments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, *,
                   first: int, last: int, strip_rows: int = 0, row_shift: int = 0,
                   rows_per_step: int = 1, keys_per_step: int = 1, causal: bool = False, min_distance: int = 0,
                   skip_strides: tuple[int, ...] = (), group_positions: tuple[int, int] | None = None,
                   seed: tuple[torch.Tensor, torch.Tensor] | None = None, mask: torch.Tensor | None = None
                   ) -> SpanArguments | None:
    """The library's arguments (`span_attention` runs them) for the attention of each problem's query
    rows over a span of its key rows, written into out and lse (None where there is no row):
    q [N, S, Rq, D], k and v [N / Gn, S / Gs, Rk, *] (views, any strides but the features'), or
    [N / Gn, S / Gs, G, c, *]: Rk = G c key rows in G groups of c, each group at its own stride
    (fixed's summary keys, c of every l rows, read in place); query row r of problem (i, c), at
    position p = r + row_shift, attending key rows a + first .. a + last, anchored at
    a = p // rows_per_step * keys_per_step (p itself by default; fixed's own block is anchored at
    its start, its summary keys grow by c every l rows), none past p where causal, within
    0 .. Rk - 1 (none: zeros and lse -inf), of problem (i // Gn, c // Gs). Where causal, none past
    p - min_distance either (else none at |p - j| < min_distance); and none at p - j = 0 mod any of
    `skip_strides` (a union's window and strides count those keys): key row j at position j, or in
    groups, group g's u-th at g * span + first + u (`group_positions` = (span, first): fixed's
    summary keys); and, with `mask` (bool [Rq, Rk], keys adjacent: the masked plan's rule), none that
    its row's mask leaves out, in every problem. out [N, S, Rq, Dv] in
    float32 or q's dtype, lse float32 [N, S, Rq], any strides but out's features'. `seed`: (out in
    any of DTYPES, lse float32) shaped as those, each row's partial over other keys, which the rows
    continue (their merge is written: no merge pass after, nor a conversion before); it may be
    (out, lse) themselves. Computed in float32 (bfloat16 as `bfloat16_products` says: on AMX's
    tiles or its scores as bfloat16 pairs, as exact); threads take runs of strips of `strip_rows`
    rows (0: a problem's rows whole, its keys packed once) of about equal work, each strip's keys
    1024 at a time (KEY_CHUNK) with a running softmax (a strip of up to 4 rows, or up to 8 over 128
    keys or more, LONE_ROWS and LONE_MIN_KEYS: its keys and values read in place, unpacked); where
    a problem has few rows for its keys (a decode step, a short chunk) its keys split into parts at
    fixed multiples, which threads share, merged after (`Split`: where they split follows from the
    problem's shape alone, so a row's result is the same alone, batched or on any number of
    threads); outputs with rows apart, past a size, are streamed past the caches."""
    n, classes, q_rows, dim = q.shape
    k_shape, v_shape = k.shape, v.shape
    grouped = len(k_shape) == 5
    key_group = k_shape[3] if grouped else max(1, k_shape[2])
    k_rows = k_shape[2] * k_shape[3] if grouped else k_shape[2]
    v_dim = v_shape[-1]
    span, first_position = group_positions or (key_group, 0)
    seed_out, seed_lse = seed if seed is not None else (out, lse)
    # each tensor's strides read once: the assertion and the arguments share them (a decode step's
    # call is a few microseconds of host time)
    q_strides, k_strides, v_strides = q.stride(), k.stride(), v.stride()
    out_strides, lse_strides = out.stride(), lse.stride()
    seed_out_strides, seed_lse_strides = (seed_out.stride(), seed_lse.stride()) if seed is not None else (
        out_strides, lse_strides)
    # What the library's reads and writes rely on (`takes` is the callers' policy beside it): CPU
    # memory, the shapes it is told, features adjacent, dtypes it knows (k and v as q).
    assert (q.is_cpu and k.is_cpu and v.is_cpu and out.is_cpu and lse.is_cpu and seed_out.is_cpu and seed_lse.is_cpu
            and len(v_shape) == len(k_shape) and k_shape[:-1] == v_shape[:-1] and n % k_shape[0] == 0
            and classes % k_shape[1] == 0 and min_distance >= 0 and span >= key_group
            and all(stride >= 1 for stride in skip_strides)
            and q.dtype in DTYPES and k.dtype == v.dtype == q.dtype and out.dtype in DTYPES and seed_out.dtype in DTYPES
            and q_strides[-1] == k_strides[-1] == v_strides[-1] == out_strides[-1] == seed_out_strides[-1] == 1
            and out.shape == seed_out.shape == (n, classes, q_rows, v_dim)
            and lse.shape == seed_lse.shape == (n, classes, q_rows) and lse.dtype == seed_lse.dtype == torch.float32
            and row_shift >= 0 and rows_per_step >= 1 and keys_per_step >= 0
            and (mask is None or mask.is_cpu and mask.dtype == torch.bool and mask.shape == (q_rows, k_rows)
                 and (mask.stride(-1) == 1 or k_rows <= 1)))
    if not (n and classes and q_rows):  # no row (values of head dim 0 still have each row's lse)
        return None
    # k's and v's [i, c, row, group]: a group's stride, 0 where there is one group
    ks, vs = k_strides, v_strides
    key_strides = (ks[0], ks[1], ks[3], ks[2], vs[0], vs[1], vs[3], vs[2]) if grouped else (*ks[:3], 0, *vs[:3], 0)
    return SpanArguments(_int64s((
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
        seed_out.data_ptr() if seed is not None else 0, seed_lse.data_ptr() if seed is not None else 0,
        mask.data_ptr() if mask is not None else 0, DTYPES[q.dtype], DTYPES[out.dtype], DTYPES[seed_out.dtype],
        *q_strides[:3], *key_strides, *out_strides[:3], *lse_strides, *seed_out_strides[:3], *seed_lse_strides,
        n, classes, n // k_shape[0], classes // k_shape[1], q_rows, k_rows, dim, v_dim,
        max(-UNBOUNDED, first), min(UNBOUNDED, last), strip_rows, row_shift, rows_per_step, keys_per_step, causal,
        key_group, span, first_position, min_distance, mask.stride(0) if mask is not None else 0, len(skip_strides),
        *skip_strides)), (q, k, v, out, lse, seed_out, seed_lse, mask))


def _int64s(values: tuple[int, ...]) -> bytes:
    """`values` as the library reads them, int64 in the host's order: `struct`'s bytes, which ctypes
    passes by address (60 values: 0.5 us, `array.array`'s 1.1-1.4)."""
    return struct.pack(f"{len(values)}q", *values)


# The most dims of rows (an lse's) that `merge` takes, as the library does.
MERGE_MOST_DIMS = 6


def merges(out: torch.Tensor, lse: torch.Tensor, a: tuple[torch.Tensor, torch.Tensor],
           b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether `merge` takes these: CPU tensors, the outputs in DTYPES with their features adjacent
    and shaped alike (a broadcast one expanded by its caller), each lse float32 and shaped as their
    rows, and the library built."""
    outputs, lses = (out, a[0], b[0]), (lse, a[1], b[1])
    return (all(x.device.type == "cpu" for x in (*outputs, *lses)) and 1 <= out.dim() <= MERGE_MOST_DIMS + 1
            and all(x.dtype in DTYPES and x.shape == out.shape and (x.stride(-1) == 1 or x.shape[-1] <= 1)
                    for x in outputs)
            and all(x.dtype == torch.float32 and x.shape == out.shape[:-1] for x in lses) and library() is not None)


def merge(out: torch.Tensor, lse: torch.Tensor, a: tuple[torch.Tensor, torch.Tensor],
          b: tuple[torch.Tensor, torch.Tensor]) -> None:
    """`merge_to` in one pass of the library (`merges` says where): each row's weights from its two
    lse, then its outputs, element by element in one order whatever the tensors' sizes and threads."""
    (a_out, a_lse), (b_out, b_lse) = a, b
    if lse.numel() == 0:
        return
    shape = _int64s((*lse.shape, out.shape[-1]))
    strides = _int64s((*out.stride()[:-1], *lse.stride(), *a_out.stride()[:-1], *a_lse.stride(),
                       *b_out.stride()[:-1], *b_lse.stride()))
    status = library().span_merge(out.data_ptr(), lse.data_ptr(), a_out.data_ptr(), a_lse.data_ptr(),
                                  b_out.data_ptr(), b_lse.data_ptr(), DTYPES[out.dtype], DTYPES[a_out.dtype],
                                  DTYPES[b_out.dtype], lse.dim(), shape, strides, torch.get_num_threads())
    assert status == 0, f"span_merge returned {status}"
