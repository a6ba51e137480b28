"""Top-k cases shared by the emulated CUDA tests (test_emu_ops.py) and the
real-GPU ones (test_cuda_large.py): sizes no small test reaches (several
256-wide chunks per select thread, k around warp and block sizes and the
in-block sort limit of 2048), tie-heavy rows, NaN, +-Inf and -0.0; and rows
aimed at the paths of the select kernel (csrc/ops/cuda/topk_encode_cuda.cu):
a first-digit bucket at the k-th value that just fits the shared candidate
pool or just overflows it, values told apart only by their low mantissa
bits, subnormals."""
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


# The select kernel's shared pool (kPool) and in-block sort limit (kMaxBlockSort).
POOL = 4096
MAX_BLOCK_SORT = 2048


def pool_capacity(k):
    """How many candidates of the k-th value's bucket the kernel stages in
    shared memory (more: digit passes over z first)."""
    return POOL - (k if k <= MAX_BLOCK_SORT else 0)


def crowded_bucket_row(g, F, k, m, distinct):
    """A row [F] (float64) whose k-th largest value lies in a bucket of the
    select's first digit (the top 11 bits of the float) holding m values:
    k // 2 values in [4, 4.25) above it, m values in [1, 1.0625) (distinct and
    exact in float32, or all 1.0: ties by index), the rest negative (ReLU
    zeros); positions shuffled. Needs k - k // 2 <= m and k // 2 + m <= F."""
    a = k // 2
    assert k - a <= m and a + m <= F
    top = 4 + torch.randperm(1 << 19, generator=g)[:a].double() * 2.0 ** -21
    if distinct:
        mid = 1 + torch.randperm(1 << 19, generator=g)[:m].double() * 2.0 ** -23
    else:
        mid = torch.ones(m, dtype=torch.float64)
    rest = -torch.rand(F - a - m, generator=g, dtype=torch.float64) - 0.1
    row = torch.cat([top, mid, rest])
    return row[torch.randperm(F, generator=g)]


def low_bits_row(g, F, distinct_low):
    """A row [F] of values 1 + j * 2^-23 (j < distinct_low <= 2^20, with
    repeats): one first-digit bucket, told apart only by the mantissa's low
    bits (float32), so the select reads z for more digits before it stages."""
    j = torch.randint(0, distinct_low, (F,), generator=g).double()
    return 1 + j * 2.0 ** -23


def subnormal_row(g, F):
    """Zeros, negatives, subnormals (of float32 and bfloat16: multiples of
    2^-133 below 2^-126) and small normals: the lowest non-zero buckets."""
    choice = torch.randint(0, 4, (F,), generator=g)
    sub = torch.randint(1, 1 << 7, (F,), generator=g).double() * 2.0 ** -133
    normal = (1 + torch.rand(F, generator=g, dtype=torch.float64)) * 2.0 ** -120
    row = torch.where(choice == 0, torch.zeros(F, dtype=torch.float64), -torch.rand(F, generator=g, dtype=torch.float64))
    row = torch.where(choice == 2, sub, row)
    return torch.where(choice == 3, normal, row)
