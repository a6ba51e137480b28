"""The top-k select on a real GPU at the sizes and special values the emulated
tests (test_emu_ops.py) run on the CPU: F of 5000 and 50000, k in
{1, 31, 32, 255, 256, 257, 1024, 2048, 2049, F}, tie-heavy rows, NaN, +-Inf,
-0.0, and a second encoder row block; the select kernel's paths (the k-th
value's bucket just fitting the shared candidate pool or overflowing it,
values apart only in low mantissa bits, subnormals, rows starting off a
16-byte boundary); against the reference. Skipped without a CUDA device
(bench/gpu_check.sh runs them)."""
import pytest
import torch

import dualenc_fast.reference.functional as R
from topk_cases import (SPECIALS, crowded_bucket_row, exact_rows, low_bits_row, pool_capacity, special_bias,
                        subnormal_row, tie_heavy, topk_cases)

ops = pytest.importorskip("dualenc_fast.ops")
pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check(x, w, b, k):
    x, w, b = x.cuda(), w.cuda(), b.cuda()
    v, i = ops.topk_encode(x, w, b, k)
    sv, si = R.select_topk(torch.relu(torch.addmm(b, x, w.t())), k)  # the op's own pre-activations
    assert torch.equal(i, si)
    assert torch.equal(v.isnan(), sv.isnan()) and torch.equal(v.nan_to_num(), sv.nan_to_num())
    return v, i


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("F", [5000, 50000])
def test_topk_select_large(F, dtype):
    for k in topk_cases(F):
        g = torch.Generator().manual_seed(k)
        check(*exact_rows(tie_heavy(g, 4, F), dtype), k)


@pytest.mark.parametrize("case", sorted(SPECIALS))
def test_topk_nan_inf_negzero(case):
    F = 300
    b = special_bias(case, F, torch.Generator().manual_seed(3)).float()
    x, w = torch.zeros(2, 1), torch.zeros(F, 1)
    for k in (1, 2, 3, 50, F):
        v, i = check(x, w, b, k)
        rv, ri = R.topk_encode(x, w, b, k)
        assert torch.equal(i.cpu(), ri)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("k", [1, 100, 1024, 2048, 2049])
def test_topk_select_crowded_bucket(k, dtype):
    g = torch.Generator().manual_seed(k)
    rows = [crowded_bucket_row(g, 50000, k, pool_capacity(k) + extra, distinct)
            for extra in (0, 1) for distinct in (True, False)]
    check(*exact_rows(torch.stack(rows), dtype), k)


@pytest.mark.parametrize("k", [1, 37, 1024, 2048, 2049, 4999, 5000])
def test_topk_select_low_mantissa_bits(k):
    g = torch.Generator().manual_seed(k)
    z = torch.stack([low_bits_row(g, 5000, 1024), low_bits_row(g, 5000, 1 << 14)])
    check(*exact_rows(z, torch.float32), k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_topk_select_subnormals(dtype):
    g = torch.Generator().manual_seed(14)
    z = torch.stack([subnormal_row(g, 3000) for _ in range(3)])
    r0 = z[0].to(dtype).double()
    n_pos, n_normal = int((r0 > 0).sum()), int((r0 >= 2.0 ** -126).sum())
    for k in sorted({1, max(1, n_normal), n_normal + 1, max(1, n_pos), n_pos + 1, 3000}):
        check(*exact_rows(z, dtype), k)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("F", [3, 7, 1001, 49999])
def test_topk_select_rows_off_16_byte_boundaries(F, dtype):
    """Odd F: the rows of z start at every offset from a 16-byte boundary
    the dtype allows; the 16-byte reads must not fault or skip elements."""
    g = torch.Generator().manual_seed(F)
    z = torch.cat([tie_heavy(g, 4, F), torch.randn(4, F, generator=g, dtype=torch.float64)])
    for k in sorted({1, 2, max(1, F // 2), F - 1, F} | ({1024} if F > 1024 else set())):
        check(*exact_rows(z, dtype), k)


def test_topk_negative_zero_is_zero():
    """-0.0 ranks with the zeros, below every positive value (review N9)."""
    b = torch.tensor([-0.0, 0.5, 0.3])
    _, i = check(torch.zeros(1, 1), torch.zeros(3, 1), b, 2)
    assert i.tolist() == [[1, 2]]


def test_topk_second_gemm_row_block():
    g = torch.Generator().manual_seed(8)
    B, d, F, k = 7, 6, 300, 17
    x, w, b = torch.randn(B, d, generator=g), torch.randn(F, d, generator=g), torch.randn(F, generator=g)
    before = ops.encode_block_bytes()
    ops.set_encode_block_bytes(3 * F * 4)
    try:
        v, i = check(x, w, b, k)
    finally:
        ops.set_encode_block_bytes(before)
    v2, i2 = ops.topk_encode(x.cuda(), w.cuda(), b.cuda(), k)
    assert torch.equal(i, i2) and torch.equal(v, v2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_transposed_heavy_feature_at_scale(dtype):
    """The work-item form of the transposed products at P's batch and width: a
    feature firing on all 4096 rows (16 work items), another on every other
    row; against float64 and bitwise equal run to run."""
    g = torch.Generator().manual_seed(5)
    B, d, F, k = 4096, 3200, 2000, 8
    idx = torch.stack([torch.randperm(F - 2, generator=g)[:k] + 2 for _ in range(B)])
    idx[:, 0] = 0
    idx[::2, 1] = 1
    v = torch.rand(B, k, generator=g) + 0.1
    w, up = torch.randn(F, d, generator=g), torch.randn(B, d, generator=g)
    dev = [t.to("cuda", dtype) for t in (v, w, up)]
    op = torch.ops.dualenc_fast.sparse_decode_backward
    with ops.sparse_strategy_scope("gather"):
        runs = [op(dev[2], dev[0], idx.cuda(), dev[1], False, True, True)[1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    ref = torch.zeros(F, d, dtype=torch.float64).index_add_(
        0, idx.reshape(-1), dev[0].double().cpu().reshape(-1, 1) * dev[2].double().cpu().repeat_interleave(k, 0))
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=2e-2)
    torch.testing.assert_close(runs[0].double().cpu(), ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("d", [3200, 3203], ids=["d3200", "d3203"])
def test_decode_backward_one_pass_at_scale(dtype, d):
    """dvalues and dweight of sparse_decode from one feature-major pass
    (dot_scatter_rows) at P's batch and width (d = 3200: 16-byte loads; 3203:
    plain loads), with heavy features: against float64, each gradient alone
    bit for bit the same as with the other, and bitwise equal run to run; a
    weight starting off a 16-byte boundary takes the plain loads."""
    g = torch.Generator().manual_seed(6)
    B, F, k = 4096, 2000, 8
    idx = torch.stack([torch.randperm(F - 2, generator=g)[:k] + 2 for _ in range(B)])
    idx[:, 0] = 0
    idx[::2, 1] = 1
    v = torch.randn(B, k, generator=g)
    w, up = torch.randn(F, d, generator=g), torch.randn(B, d, generator=g)
    v, w, up = (t.to("cuda", dtype) for t in (v, w, up))
    ic = idx.cuda()
    op = torch.ops.dualenc_fast.sparse_decode_backward
    with ops.sparse_strategy_scope("gather"):
        gv, gw = op(up, v, ic, w, True, True, True)
        gv2, gw2 = op(up, v, ic, w, True, True, True)
        gv1, _ = op(up, v, ic, w, True, False, True)
        _, gw1 = op(up, v, ic, w, False, True, True)
        buf = torch.empty(F * d + 1, device="cuda", dtype=dtype)
        w_off = buf[1:].view(F, d)
        w_off.copy_(w)
        gv3, gw3 = op(up, v, ic, w_off, True, True, True)
    assert torch.equal(gv, gv2) and torch.equal(gw, gw2)
    assert torch.equal(gv1, gv) and torch.equal(gw1, gw)
    assert torch.equal(gw3, gw)
    rv = (up.double()[:, None, :] * w.double()[ic]).sum(-1)
    rw = torch.zeros(F, d, dtype=torch.float64, device="cuda").index_add_(
        0, ic.reshape(-1), v.double().reshape(-1, 1) * up.double().repeat_interleave(k, 0))
    tol = dict(atol=1e-3, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.5, rtol=2e-2)
    torch.testing.assert_close(gv.double(), rv, **tol)
    torch.testing.assert_close(gv3.double(), rv, **tol)
    torch.testing.assert_close(gw.double(), rw, **tol)
