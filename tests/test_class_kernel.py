"""The CPU class kernel (engine/kernels/class_attention.cpp): its own contract against a float64
reference, strided attention on it against the contract's reference, and the rules that send a
run to it or to torch's kernel (built or not, its size, its dtype)."""

from __future__ import annotations

import logging

import pytest
import torch

from engine import kernels
from engine.kernels import class_kernel, dense, strided
from reference import assert_matches_reference, mask

pytestmark = pytest.mark.skipif(class_kernel.library() is None, reason="no C++ compiler to build the class kernel")


def _class_reference(q, k, v, *, diagonal: int, scale: float):
    """Float64: query row r of each class attends its class's key rows 0 .. r + diagonal, query
    head n the key/value head n // (N / Nk)."""
    group = q.shape[0] // k.shape[0]
    k, v = (x.double().repeat_interleave(group, 0) for x in (k, v))
    scores = torch.einsum("ncqd,nckd->ncqk", q.double(), k) * scale
    rows, keys = torch.arange(q.shape[2])[:, None], torch.arange(k.shape[2])[None, :]
    scores = scores.masked_fill(keys > rows + diagonal, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.einsum("ncqk,nckd->ncqd", torch.exp(scores - lse[..., None]).nan_to_num(0.0), v)
    return out, lse


def _kernel_calls(monkeypatch) -> list:
    """The class kernel's calls from now on, each recorded as its q's shape (the call still made)."""
    calls = []
    real = class_kernel.class_attention
    monkeypatch.setattr(class_kernel, "class_attention", lambda q, *args, **kwargs: calls.append(tuple(q.shape))
                        or real(q, *args, **kwargs))
    return calls


@pytest.mark.parametrize("n,heads,classes,q_rows,k_rows,diagonal", [
    (2, 1, 3, 37, 37, 0),  # causal squares, a block's rows cut short
    (4, 2, 5, 20, 50, 30),  # more keys than query rows, grouped heads
    (2, 2, 4, 30, 30, -5),  # the first rows see no key
    (1, 1, 1, 9, 70, 10 ** 6),  # every key (non-causal), one problem
    (3, 3, 2, 64, 33, 0),  # keys end before the query rows
    (2, 1, 3, 5, 0, 0),  # no key at all
])
@pytest.mark.parametrize("dim,v_dim", [(16, 16), (32, 48), (64, 16)])
def test_class_kernel_contract(n, heads, classes, q_rows, k_rows, diagonal, dim, v_dim):
    """Query row r of each class attends key rows 0 .. r + diagonal of its key/value head's class;
    rows with none get zeros and lse -inf. Views with the rows s apart, as strided gives them."""
    g = torch.Generator().manual_seed(q_rows + k_rows)
    stride = classes
    q = torch.randn(n, q_rows * stride, dim, generator=g).reshape(n, q_rows, stride, dim).transpose(1, 2)
    k = torch.randn(heads, k_rows * stride, dim, generator=g).reshape(heads, k_rows, stride, dim).transpose(1, 2)
    v = torch.randn(heads, k_rows * stride, v_dim, generator=g).reshape(heads, k_rows, stride, v_dim).transpose(1, 2)
    out, lse = class_kernel.class_attention(q, k, v, diagonal=diagonal, scale=0.3, out_dtype=torch.float32)
    ref_out, ref_lse = _class_reference(q, k, v, diagonal=diagonal, scale=0.3)
    assert out.shape == (n, classes, q_rows, v_dim) and lse.shape == (n, classes, q_rows)
    assert_matches_reference(out, lse, ref_out, ref_lse, tol=2e-5)


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float16, torch.float16), (torch.float16, torch.float32),
                                             (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.bfloat16)])
def test_class_kernel_reads_and_writes_half_precision(dtype, out_dtype):
    """float16 and bfloat16 read as they are (converted as they are packed), computed in float32,
    written in the dtype asked for, rounded once."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 40, 32, generator=g).to(dtype) for _ in range(3))
    out, lse = class_kernel.class_attention(q, k, v, diagonal=2, scale=0.25, out_dtype=out_dtype)
    ref_out, ref_lse = _class_reference(q, k, v, diagonal=2, scale=0.25)
    assert out.dtype == out_dtype
    tol = 2e-5 if out_dtype == torch.float32 else 1e-2
    assert_matches_reference(out.float(), lse, ref_out, ref_lse, tol=tol, lse_tol=2e-5)


def _assert_matches_far(result, q, k, v, stride: int, min_distance: int, tol: float = 2e-5):
    """Against the contract's strided mask without the keys nearer than min_distance, in float64,
    key/value heads repeated for their query heads."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, 1) for x in (k, v))
    lq, lk = q.shape[-2], k.shape[-2]
    delta = torch.arange(lk - lq, lk)[:, None] - torch.arange(lk)[None, :]
    keep = mask({"type": "strided", "stride": stride}, lq, lk, 0, 1) & (delta >= min_distance)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k) * 0.25
    scores = scores.masked_fill(~keep, float("-inf"))
    ref_lse = torch.logsumexp(scores, -1)
    ref_out = torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - ref_lse[..., None]).nan_to_num(0.0), v)
    out, lse = result
    assert_matches_reference(out.float(), lse, ref_out, ref_lse, tol=tol)


@pytest.mark.parametrize("lq,lk", [(600, 600), (517, 700), (300, 1003), (130, 130)])
@pytest.mark.parametrize("stride", [1, 8, 13, 64])
@pytest.mark.parametrize("min_distance", [0, 20])
@pytest.mark.parametrize("batch,heads,kv_heads", [(2, 4, 2), (1, 1, 1)])
def test_strided_on_the_class_kernel(monkeypatch, lq, lk, stride, min_distance, batch, heads, kv_heads):
    """strided(s) (a union's stride: keys at least min_distance back) on the class kernel: Lq < Lk
    with dummy lead rows, a partial last class row (its own keys merged after), stride 1, grouped
    heads and one head, against the contract's mask."""
    calls = _kernel_calls(monkeypatch)
    g = torch.Generator().manual_seed(lq + stride)
    q = torch.randn(batch, heads, lq, 16, generator=g)
    k, v = (torch.randn(batch, kv_heads, lk, 16, generator=g) for _ in range(2))
    result = kernels.strided_attention(q, k, v, stride=stride, scale=0.25, min_distance=min_distance)
    assert calls, "the class kernel was not used"
    _assert_matches_far(result, q, k, v, stride, min_distance)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_strided_half_precision_on_the_class_kernel(monkeypatch, dtype):
    """Half precision computed in float32 (bfloat16 as on a CPU without AMX) goes to the class
    kernel unconverted; the result keeps q's dtype (702 keys: whole class rows, so nothing merges
    in after). Non-contiguous inputs ([B, L, H, D] viewed as
    [B, H, L, D]), head dims 32 and 48."""
    monkeypatch.setattr(dense, "cpu_upcast_dtypes", lambda: frozenset({torch.float16, torch.bfloat16}))
    calls = _kernel_calls(monkeypatch)
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(2, 517 if i == 0 else 702, 2, 32, generator=g).to(dtype).transpose(1, 2) for i in range(2))
    v = torch.randn(2, 702, 2, 48, generator=g).to(dtype).transpose(1, 2)
    out, lse = kernels.strided_attention(q, k, v, stride=13, scale=0.25)
    assert calls and out.dtype == dtype
    _assert_matches_far((out, lse), *(x.float() for x in (q, k, v)), 13, 0, tol=2e-2)


def test_strided_rules_for_the_class_kernel(monkeypatch):
    """torch's kernel takes the classes past CLASS_KERNEL_MAX_KEY_ROWS key class rows, a union's
    second stride (its skipped strides' masks), natively computed half precision (AMX), and head
    dims not a multiple of 16; the class kernel the rest."""
    calls = _kernel_calls(monkeypatch)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 640, 16, generator=g) for _ in range(3))

    def used(qkv=(q, k, v), **kwargs) -> bool:
        calls.clear()
        result = kernels.strided_attention(*qkv, scale=0.25, **kwargs)
        qkv = [x.float() for x in qkv]
        if not kwargs.get("skip_strides"):
            _assert_matches_far(result, *qkv, kwargs["stride"], kwargs.get("min_distance", 0), tol=2e-2)
        return bool(calls)

    assert used(stride=8)  # 80 key class rows
    monkeypatch.setattr(strided, "CLASS_KERNEL_MAX_KEY_ROWS", 79)
    assert not used(stride=8)
    assert used(stride=9)  # 71 rows
    assert not used(stride=9, min_distance=5, skip_strides=(3,))
    q12 = torch.randn(1, 2, 640, 24, generator=g)
    assert not used(stride=9, qkv=(q12, q12, q12))
    half = [x.bfloat16() for x in (q, k, v)]
    monkeypatch.setattr(dense, "cpu_upcast_dtypes", lambda: frozenset())  # bfloat16 native, as with AMX
    assert not used(stride=9, qkv=half)
    monkeypatch.setattr(dense, "cpu_upcast_dtypes", lambda: frozenset({torch.bfloat16}))
    assert used(stride=9, qkv=half)


def test_class_kernel_falls_back_without_a_compiler(monkeypatch, tmp_path, caplog):
    """No compiler (or a failed build): said once in the log, and strided runs on torch's kernel."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ATTN_KERNEL_CACHE", str(tmp_path / "cache"))
    class_kernel.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=class_kernel.__name__):
            assert class_kernel.library() is None and class_kernel.library() is None
        assert len([r for r in caplog.records if "did not build" in r.getMessage()]) == 1
        g = torch.Generator().manual_seed(5)
        q, k, v = (torch.randn(1, 2, 300, 16, generator=g) for _ in range(3))
        _assert_matches_far(kernels.strided_attention(q, k, v, stride=8, scale=0.25), q, k, v, 8, 0)
    finally:
        class_kernel.library.cache_clear()


def test_class_kernel_is_built_once_per_cache(monkeypatch, tmp_path):
    """The built library is kept in the cache directory under a key of the source, compiler and CPU:
    a second build finds it and compiles nothing."""
    monkeypatch.setenv("ATTN_KERNEL_CACHE", str(tmp_path))
    compiler = class_kernel.compiler()
    first = class_kernel.build(compiler)
    built = first.stat().st_mtime_ns
    assert first.parent == tmp_path and class_kernel.build(compiler) == first
    assert first.stat().st_mtime_ns == built and not list(tmp_path.glob("*.partial"))
