"""The Triton merge (engine/kernels/triton_merge.py) against float64 arithmetic and against
`merge_to`'s torch ops, in Triton's interpreter on the CPU (TRITON_INTERPRET=1, set by
conftest.py without a GPU), and the engine's choice of it on CUDA's branches."""

from __future__ import annotations

import pytest
import torch

import reference
from cuda_emulation import counted_call, cuda_kernels_on_cpu
from engine import attention
from engine.kernels import merge, triton_fixed, triton_merge
from engine.kernels.triton_merge import matches_contract, merge_splits, triton_merge_to

pytestmark = pytest.mark.skipif(triton_merge.triton is None, reason="Triton is not installed")

NEG_INF = float("-inf")


def _partials(shape, dtype, g):
    """Two partials of `shape` ([..., rows, features]) with every case of their lse in some row:
    both -inf (zero outputs), one -inf (its output zero), a tie at 2^26, far apart, close."""
    a_out, b_out = (torch.randn(*shape, generator=g) for _ in range(2))
    a_lse, b_lse = (torch.randn(*shape[:-1], generator=g) * 4 for _ in range(2))
    rows = shape[-2]
    for row, (la, lb) in enumerate([(NEG_INF, NEG_INF), (NEG_INF, 0.3), (-2.0, NEG_INF), (2.0**26, 2.0**26),
                                    (80.0, -80.0), (-90.0, 95.0)][:rows]):
        a_lse[..., row], b_lse[..., row] = la, lb
    a_out.masked_fill_((a_lse == NEG_INF)[..., None], 0.0)
    b_out.masked_fill_((b_lse == NEG_INF)[..., None], 0.0)
    return (a_out.to(dtype), a_lse), (b_out.to(dtype), b_lse)


def _float64_merge(a, b):
    (a_out, a_lse), (b_out, b_lse) = a, b
    top = torch.maximum(a_lse, b_lse).double()
    wa, wb = (torch.exp(x.double() - top).nan_to_num(0.0) for x in (a_lse, b_lse))
    out = (a_out.double() * wa[..., None] + b_out.double() * wb[..., None]) / (wa + wb).clamp_min(1e-300)[..., None]
    return out, top + torch.log(wa + wb)


@pytest.mark.parametrize("shape", [(7, 5), (3, 9, 64), (2, 3, 70, 24), (1, 1, 1, 300), (1, 2, 6, 1)],
                         ids=["2d", "3d", "4d-D24", "one-row-D300", "D1"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16)],
                         ids=["fp32", "bf16-into-fp32", "fp16", "bf16"])
def test_the_kernel_merges_as_float64_arithmetic_does(shape, dtypes):
    part_dtype, out_dtype = dtypes
    a, b = _partials(shape, part_dtype, torch.Generator().manual_seed(sum(shape)))
    out = torch.empty(shape, dtype=out_dtype)
    lse = torch.empty(shape[:-1])
    triton_merge_to(out, lse, a, b)
    ref_out, ref_lse = _float64_merge(a, b)
    tol = 1e-5 if out_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)
    assert (out[..., 0, :] == 0).all() and (lse[..., 0] == NEG_INF).all()  # a row with no key in either


def test_the_kernel_agrees_with_the_torch_ops_in_place_on_views():
    """A fold in place (out and lse are a's), b a stride-0 view and a transposed one, rows of a
    slice: as `merge_to`'s torch ops on the CPU write them."""
    g = torch.Generator().manual_seed(1)
    a, b = _partials((2, 4, 40, 32), torch.float32, g)
    b_out = b[0][:, :1].expand(-1, 4, -1, -1)  # one head's partial for all four
    wide = torch.randn(2, 40, 4, 32, generator=g).transpose(1, 2)  # [B, L, H, D] as [B, H, L, D]
    rows = slice(5, 33)
    for other_out in (b_out, wide):
        results = []
        for merge_to in (merge.torch_merge_to, triton_merge_to):
            out, lse = (x.clone() for x in a)
            part = (out[..., rows, :], lse[..., rows])
            merge_to(*part, part, (other_out[..., rows, :], b[1][..., rows]))
            results.append((out, lse))
        (expected_out, expected_lse), (out, lse) = results
        torch.testing.assert_close(out, expected_out, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse, expected_lse)


def test_a_nan_lse_gives_what_the_torch_ops_give():
    """A NaN partial (from NaN inputs) weighs nothing in the output, as sigmoid's NaN fixed to 0
    does, and makes the lse NaN, as logaddexp does."""
    a_out, b_out = torch.ones(1, 3, 4), torch.full((1, 3, 4), 5.0)
    a_lse, b_lse = torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([[float("nan"), 0.0, 1.0]])
    out, lse = torch.empty(1, 3, 4), torch.empty(1, 3)
    triton_merge_to(out, lse, (a_out, a_lse), (b_out, b_lse))
    assert (out[0, 0] == 1).all() and (out[0, 1] == 1).all() and (out[0, 2] == 3).all()
    assert lse[0, :2].isnan().all() and lse[0, 2].item() == pytest.approx(1 + 0.6931472)


def test_merges_take_the_kernel_only_on_cudas_branches():
    """On the CPU's rules the torch ops merge; on CUDA's (emulated) one launch, here for a union
    of two strides, with none of the torch ops' and the result still the contract's. (Where a
    union's last Triton kernel continues the others' partial there is no merge at all:
    tests/test_triton_band.py, tests/test_triton_fixed.py.)"""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 300, 16, generator=g).bfloat16() for _ in range(3))
    out = torch.empty(1, 2, 300, 16)
    lse = torch.empty(1, 2, 300)
    parts = ((out, lse), (out.clone(), lse.clone()))
    assert not triton_merge.takes(out, lse, *parts)
    pattern = {"type": "union", "patterns": [{"type": "strided", "stride": 20}, {"type": "strided", "stride": 30}]}
    result, count = counted_call(q, k, v, pattern)
    assert count.ops["triton._merge_kernel"] == 1
    assert "aten.lerp.Tensor_out" not in count.ops and "aten.sigmoid_.default" not in count.ops
    torch.testing.assert_close(result.double(), reference.reference_attention(q, k, v, pattern)[0],
                               atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtypes, features", [((torch.float32, torch.float32, torch.float32), 16),
                                              ((torch.bfloat16, torch.float16, torch.float32), 64),
                                              ((torch.bfloat16, torch.bfloat16, torch.bfloat16), 1024)], ids=str)
def test_each_variant_is_probed(dtypes, features):
    with cuda_kernels_on_cpu():
        assert matches_contract(torch.device("cpu"), *dtypes, features)


def test_a_variant_that_fails_its_probe_keeps_the_torch_ops(monkeypatch, caplog):
    """A variant Triton cannot compile, or gets wrong, must not fail requests or answer wrong: its
    merges take the torch ops, said in the log; other variants keep the kernel."""
    launch = triton_merge.triton_merge_to

    def fails_in_float16(out, lse, a, b):
        if a[0].dtype == torch.float16:
            raise RuntimeError("out of resources")
        launch(out, lse, a, b)

    def wrong_in_float16(out, lse, a, b):
        launch(out, lse, a, b)
        if a[0].dtype == torch.float16:
            out.mul_(2)

    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 200, 16, generator=g).half() for _ in range(3))
    pattern = {"type": "union", "patterns": [{"type": "sliding_window", "window": 8}, {"type": "strided", "stride": 8}]}
    for fault, said in ((fails_in_float16, "failed to run"), (wrong_in_float16, "differs from float64")):
        calls = []
        with cuda_kernels_on_cpu():
            monkeypatch.setattr(triton_merge, "triton_merge_to", lambda *a: calls.append(a) or fault(*a))
            caplog.clear()
            assert not matches_contract(torch.device("cpu"), torch.float16, torch.float16, torch.float16, 16)
            assert [r.levelname for r in caplog.records] == ["WARNING"] and said in caplog.text
            assert "torch.float16 and torch.float16 into torch.float16 on cpu, a tile of 16 features" in caplog.text
            assert matches_contract(torch.device("cpu"), torch.bfloat16, torch.bfloat16, torch.bfloat16, 16)
            calls.clear()  # the probes' own
            out = attention(q, k, v, pattern)  # its merge: float16 partials into a float16 output
        assert calls == []
        torch.testing.assert_close(out.double(), reference.reference_attention(q, k, v, pattern)[0],
                                   atol=4e-3, rtol=4e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("splits, features", [(2, 64), (5, 24), (16, 300)])
def test_split_partials_merge_as_float64_arithmetic_does(dtype, splits, features):
    """fixed's decode steps split keys between programs: their stacked partials, in one launch.
    Rows where no split saw a key, or only one did, or all tie at 2^26."""
    g = torch.Generator().manual_seed(splits)
    out = torch.randn(splits, 2, 3, 7, features, generator=g)
    lse = torch.randn(splits, 2, 3, 7, generator=g) * 30
    lse[:, :, :, 0] = NEG_INF
    lse[1:, :, :, 1] = NEG_INF
    lse[:, :, :, 2] = 2.0**26
    out.masked_fill_((lse == NEG_INF)[..., None], 0.0)
    merged, merged_lse = merge_splits(out, lse, dtype)
    weights = torch.softmax(lse.double(), 0).nan_to_num(0.0)
    ref_out = (out.double() * weights[..., None]).sum(0)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert merged.dtype == dtype and merged.shape == out.shape[1:]
    torch.testing.assert_close(merged.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(merged_lse.double(), torch.logsumexp(lse.double(), 0), atol=1e-5, rtol=1e-6)
    assert (merged[..., 0, :] == 0).all() and (merged_lse[..., 0] == NEG_INF).all()


def test_a_fixed_variant_whose_split_merge_fails_keeps_the_fused_plan(monkeypatch, caplog):
    """fixed's probe runs its keys split between two programs too, so a split merge that cannot
    compile leaves that variant on the fused plan rather than failing long decode steps."""
    def fails(*args):
        raise RuntimeError("out of resources")

    with cuda_kernels_on_cpu():
        monkeypatch.setattr(triton_fixed, "merge_splits", fails)
        assert not triton_fixed.matches_contract(torch.device("cpu"), torch.float32, 16, 16, True, 0, False)
    assert "failed to run" in caplog.text
