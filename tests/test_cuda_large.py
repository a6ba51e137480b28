"""The top-k select on a real GPU at the sizes and special values the emulated
tests (test_emu_ops.py) run on the CPU: F of 5000 and 50000, k in
{1, 31, 32, 255, 256, 257, 1024, 2048, 2049, F}, tie-heavy rows, NaN, +-Inf,
-0.0, and a second encoder row block; against the reference. Skipped without
a CUDA device (bench/gpu_check.sh runs them)."""
import pytest
import torch

import dualenc_fast.reference.functional as R
from topk_cases import SPECIALS, exact_rows, special_bias, tie_heavy, topk_cases

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
