"""Top-k cases shared by the emulated CUDA tests (test_emu_ops.py) and the
real-GPU ones (test_cuda_large.py): sizes no small test reaches (several
256-wide chunks per select thread, k around warp and block sizes and the
in-block sort limit of 2048), tie-heavy rows, NaN, +-Inf and -0.0."""
import math

import torch


def exact_rows(z, dtype):
    """x, weight, bias whose encoder pre-activations are exactly z [B, F]:
    x = I, weight = z^T, bias = 0 (finite z only)."""
    B, F = z.shape
    return torch.eye(B, dtype=dtype), z.t().contiguous().to(dtype), torch.zeros(F, dtype=dtype)


def tie_heavy(g, B, F):
    """Rows with few distinct values: small integers (many ties, many ReLU
    zeros), a constant row, an all-negative row, a row of distinct values."""
    rows = [
        torch.randint(-2, 4, (F,), generator=g).double(),
        torch.full((F,), 1.5, dtype=torch.float64),
        -torch.rand(F, generator=g, dtype=torch.float64) - 0.1,
        torch.randperm(F, generator=g).double() / F,
    ]
    return torch.stack([rows[r % len(rows)] for r in range(B)])


K_LIST = [1, 31, 32, 255, 256, 257, 1024, 2048, 2049]


def topk_cases(F):
    return [k for k in K_LIST if k < F] + [F]


SPECIALS = {
    "nan": [(3, math.nan)],
    "two_nans": [(40, math.nan), (7, math.nan)],
    "nan_and_inf": [(10, math.inf), (20, math.nan), (5, -math.inf)],
    "inf": [(11, math.inf), (2, math.inf), (0, -math.inf)],
    "neg_zero": [(i, -0.0) for i in range(0, 300, 3)],
    "all_nan": [(i, math.nan) for i in range(300)],
}


def special_bias(case, F, gen):
    """A bias [F] (float64) with the special values of SPECIALS[case]."""
    bias = torch.randn(F, generator=gen, dtype=torch.float64)
    for pos, val in SPECIALS[case]:
        bias[pos] = val
    return bias
