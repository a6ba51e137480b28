"""The CUDA kernels (csrc/ops/cuda), run on the CPU by the CUDA emulator
(dualenc_fast._C_emu, ops under torch.ops.dualenc_fast_emu), against the
pure-PyTorch reference: forward and every gradient (the backward ops are
called directly), float32, bfloat16 and float16, gather and dense forms, in
thread order and under seeded schedules; the feature-major dvalues and
dweight (vector and plain loads, several work items, warps and passes); the
top-k select at sizes no CUDA test reached (F of 5000 and 50000, k up to F),
tie-heavy rows, NaN, +-Inf and -0.0, and a second encoder row block.

16-bit notes: the emulated host code does its GEMMs on the CPU (not cuBLAS),
so 16-bit results are compared with tolerances against the float32 reference
on the same rounded inputs; the top-k indices are compared exactly against a
stable sort of the very pre-activations the op selects from (one addmm in the
op's dtype), since the reference rounds x @ W.T and + b separately and may
order near-ties differently."""
import math

import pytest
import torch

import dualenc_fast.reference.functional as R
from conftest import OP_SHAPES
from emu_util import SEEDS, require_emu
from topk_cases import (SPECIALS, crowded_bucket_row, exact_rows, low_bits_row, pool_capacity, special_bias,
                        subnormal_row, tie_heavy, topk_cases)

from dualenc_fast import emu

require_emu()
E = emu.ops()

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DT_IDS = ["f32", "bf16", "f16"]

# (B, d, F, k, K): the compiled ops' awkward shapes, plus a row count and
# widths that leave partial warps and partial blocks of 256 threads.
SHAPES = OP_SHAPES + [
    (4, 300, 70, 33, 260),  # d, K above one block of 256 threads
]


def tol(dtype):
    return {
        torch.float32: dict(atol=2e-5, rtol=1e-4),
        torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
        torch.float16: dict(atol=8e-3, rtol=8e-3),
    }[dtype]


def close(a, b, dtype, scale=1.0):
    t = tol(dtype)
    torch.testing.assert_close(a.float(), b.float(), atol=t["atol"] * scale, rtol=t["rtol"], equal_nan=True)


@pytest.fixture(params=SEEDS, ids=[f"seed{s}" for s in SEEDS])
def seed(request):
    with emu.schedule(request.param):
        yield request.param


@pytest.fixture(params=["gather", "dense"])
def form(request):
    with emu.strategy_scope(request.param):
        yield request.param


def rnd(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale


def random_code(gen, B, k, F, repeats=False):
    if repeats:
        idx = torch.randint(0, F, (B, k), generator=gen)
    elif B:
        idx = torch.stack([torch.randperm(F, generator=gen)[:k] for _ in range(B)])
    else:
        idx = torch.empty(0, k, dtype=torch.long)
    return rnd(gen, B, k), idx


def ref_grads(fn, inputs, up):
    """float32 reference output and gradients (inputs: float32 leaves or other)."""
    leaves = [t.detach().float().requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    diff = [t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, diff, up.float(), allow_unused=True)


# --------------------------------------------------------------------------- sparse_decode
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_sparse_decode(dtype, seed, form):
    g = torch.Generator().manual_seed(1)
    for (B, d, F, k, _), repeats in [(s, r) for s in SHAPES for r in (False, True)]:
        v, idx = random_code(g, B, k, F, repeats)
        w, b, up = rnd(g, F, d), rnd(g, d), rnd(g, B, d)
        v, w, b, up = (t.to(dtype) for t in (v, w, b, up))
        out = E.sparse_decode(v, idx, w, b, True)
        ref, (rv, rw, rb) = ref_grads(lambda v_, w_, b_: R.sparse_decode(v_, idx, w_, b_), [v, w, b], up)
        close(out, ref, dtype, scale=math.sqrt(k))
        gv, gw = E.sparse_decode_backward(up, v, idx, w, True, True, True)
        close(gv, rv, dtype, scale=math.sqrt(d))
        close(gw, rw, dtype, scale=math.sqrt(B))
        # one side only: the other comes back empty
        gv1, gw1 = E.sparse_decode_backward(up, v, idx, w, True, False, True)
        assert torch.equal(gv1, gv) and gw1.numel() == 0


# --------------------------------------------------------------------------- topk_encode
def selected_from(z, k):
    """The top-k of ReLU(z) by the package rule (NaN first, like torch.sort)."""
    return R.select_topk(torch.relu(z), k)


def check_topk(x, w, b, k, pre=None, up=None, block_rows=None):
    """Forward: indices exactly those of a stable sort of the op's own
    pre-activations (one addmm in the op's dtype), values equal; float32 also
    against the reference. Backward against autograd through the reference
    formula, with the op's selection."""
    dtype = x.dtype
    v, i = E.topk_encode(x, w, b, k, pre)
    xe = x - pre if pre is not None else x
    rows = block_rows or max(1, x.shape[0])
    z = torch.cat([torch.addmm(b, xe[r:r + rows], w.t()) for r in range(0, x.shape[0], rows)]) if x.shape[0] else \
        torch.addmm(b, xe, w.t())
    sv, si = selected_from(z, k)
    assert i.dtype == torch.int64 and v.dtype == dtype
    assert torch.equal(i, si), (i, si)
    assert torch.equal(v.isnan(), sv.isnan()) and torch.equal(v.nan_to_num(), sv.nan_to_num())
    if dtype == torch.float32 and pre is None:
        rv, ri = R.topk_encode(x, w, b, k)
        assert torch.equal(i, ri)
        close(v, rv, dtype)
    if up is None:
        return v, i
    gx, gw, gb = E.topk_encode_backward(up, v, i, x, w, pre, True, True, True)

    def through(x_, w_, b_):  # the reference formula, with the op's selection
        xe_ = x_ - pre.float() if pre is not None else x_
        return torch.relu(xe_ @ w_.t() + b_).gather(1, i)

    _, (rx, rw, rb) = ref_grads(through, [x, w, b], up)
    d = x.shape[1]
    close(gx, rx, dtype, scale=math.sqrt(k))
    close(gw, rw, dtype, scale=math.sqrt(x.shape[0]))
    close(gb, rb, dtype, scale=math.sqrt(x.shape[0]))
    return v, i


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_topk_encode(dtype, seed, form):
    g = torch.Generator().manual_seed(4)
    for B, d, F, k, _ in SHAPES:
        for with_pre in (False, True):
            x, w, b = rnd(g, B, d), rnd(g, F, d), rnd(g, F, scale=0.1)
            pre = rnd(g, d).to(dtype) if with_pre else None
            up = rnd(g, B, k).to(dtype)
            check_topk(x.to(dtype), w.to(dtype), b.to(dtype), k, pre, up)


@pytest.mark.parametrize("k", topk_cases(5000))
def test_topk_select_multichunk_5000(k, seed):
    g = torch.Generator().manual_seed(k)
    z = tie_heavy(g, 4, 5000)
    check_topk(*exact_rows(z, torch.float32), k)


@pytest.mark.parametrize("k", topk_cases(50000))
def test_topk_select_multichunk_50000(k):
    g = torch.Generator().manual_seed(k)
    z = tie_heavy(g, 2, 50000)
    z[1] = torch.randn(50000, generator=g, dtype=torch.float64)  # mostly distinct, half positive
    for s in SEEDS[:2]:
        with emu.schedule(s):
            check_topk(*exact_rows(z, torch.float32), k)


@pytest.mark.long
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("k", topk_cases(50000))
def test_topk_select_multichunk_50000_every_seed_and_dtype(k, dtype):
    g = torch.Generator().manual_seed(k)
    z = tie_heavy(g, 4, 50000)
    for s in SEEDS + [4, 5]:
        with emu.schedule(s):
            check_topk(*exact_rows(z, dtype), k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_topk_select_ties_16bit(dtype, seed):
    g = torch.Generator().manual_seed(9)
    z = tie_heavy(g, 4, 700)
    for k in (1, 33, 256, 699, 700):
        check_topk(*exact_rows(z, dtype), k)


# The select's paths (csrc/ops/cuda/topk_encode_cuda.cu, top comment): the
# candidates of the k-th value's first-digit bucket staged in shared memory
# (a pool of pool_capacity(k)), more digit passes over z when they do not fit,
# the index digits for ties, the zeros' bucket; 16-byte reads from rows that
# start anywhere.
@pytest.mark.parametrize("k", [1, 100, 2048, 2049])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_topk_select_crowded_bucket(k, dtype, seed):
    """The bucket of the k-th value holds exactly as many values as the pool
    takes (staged after one read), or one more (digit passes over z first):
    distinct values (float32; 16-bit rounding makes ties of them), and ties
    (every one 1.0: decided by index digits, over z when they overflow)."""
    g = torch.Generator().manual_seed(k)
    rows = [crowded_bucket_row(g, 10000, k, pool_capacity(k) + extra, distinct)
            for extra in (0, 1) for distinct in (True, False)]
    check_topk(*exact_rows(torch.stack(rows), dtype), k)


@pytest.mark.parametrize("k", [1, 37, 2048, 2049, 4999, 5000])
def test_topk_select_low_mantissa_bits(k, seed):
    """Values in one first-digit bucket that differ only in the low 10 or 14
    mantissa bits: two or three digit passes over z before the candidates
    fit the pool."""
    g = torch.Generator().manual_seed(k)
    z = torch.stack([low_bits_row(g, 5000, 1024), low_bits_row(g, 5000, 1 << 14)])
    check_topk(*exact_rows(z, torch.float32), k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_topk_select_subnormals(dtype, seed):
    """Subnormals (float32 and bfloat16; float16 rounds them to 0) next to the
    zeros: k at the normal/subnormal and positive/zero boundaries."""
    g = torch.Generator().manual_seed(14)
    z = torch.stack([subnormal_row(g, 3000) for _ in range(3)])
    r0 = z[0].to(dtype).double()
    n_pos = int((r0 > 0).sum())
    n_normal = int((r0 >= 2.0 ** -126).sum())
    for k in sorted({1, max(1, n_normal), n_normal + 1, max(1, n_pos), n_pos + 1, 3000}):
        check_topk(*exact_rows(z, dtype), k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("F", [3, 7, 9, 1001, 4999])
def test_topk_select_rows_off_16_byte_boundaries(F, dtype, seed):
    """Odd F: the 8 rows of z start at every 2-byte (16-bit) or 4-byte
    (float32) offset from a 16-byte boundary, so each row's 16-byte reads
    follow a head of up to 7 single elements and end before a tail; F below
    one vector (3, 7) is all head."""
    g = torch.Generator().manual_seed(F)
    z = torch.cat([tie_heavy(g, 4, F), torch.randn(4, F, generator=g, dtype=torch.float64)])
    for k in sorted({1, 2, max(1, F // 2), F - 1, F}):
        check_topk(*exact_rows(z, dtype), k)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
@pytest.mark.parametrize("case", sorted(SPECIALS))
def test_topk_nan_inf_negzero(case, dtype, seed):
    """NaN ranks first (as torch.sort/topk: above +Inf; NaNs by lower index)
    and comes out as NaN, so the loss goes NaN; +-Inf and -0.0 order as
    values. The pre-activation is the bias (x and weight zero)."""
    F = 300
    bias = special_bias(case, F, torch.Generator().manual_seed(3))
    x, w, b = torch.zeros(2, 1, dtype=dtype), torch.zeros(F, 1, dtype=dtype), bias.to(dtype)
    for k in (1, 2, 3, 50, F):
        v, i = check_topk(x, w, b, k)
        rv, ri = R.topk_encode(x.float(), w.float(), b.float(), k)
        assert torch.equal(i, ri), (k, i, ri)
        assert torch.equal(v.float().isnan(), rv.isnan())
    if "nan" in case:
        v, _ = E.topk_encode(x, w, b, 1, None)
        assert v.isnan().all()  # the loss goes NaN and training stops


def test_topk_second_gemm_row_block(seed):
    """A row-block size of a few rows' pre-activations: the encoder GEMM and the
    select run in blocks of 3, 3 and 1 rows; each block writes its own rows."""
    g = torch.Generator().manual_seed(8)
    B, d, F, k = 7, 6, 300, 17
    for dtype in DTYPES:
        x, w, b = rnd(g, B, d).to(dtype), rnd(g, F, d).to(dtype), rnd(g, F, scale=0.1).to(dtype)
        up = rnd(g, B, k).to(dtype)
        with emu.strategy_scope(encode_block_bytes=3 * F * x.element_size()):
            v, i = check_topk(x, w, b, k, up=up, block_rows=3)
        v2, i2 = E.topk_encode(x, w, b, k, None)  # one block: another GEMM, other rounding
        assert torch.equal(i, i2)
        close(v, v2, dtype)


def test_topk_row_blocks_in_gemm_tiles():
    """A budget of 300 rows for 400 rows: the blocks are cut at multiples of
    128 rows (256 + 144), not 300 + 100."""
    g = torch.Generator().manual_seed(11)
    B, d, F, k = 400, 5, 24, 3
    x, w, b = rnd(g, B, d).float(), rnd(g, F, d).float(), rnd(g, F, scale=0.1).float()
    with emu.strategy_scope(encode_block_bytes=300 * F * 4):
        check_topk(x, w, b, k, block_rows=256)


def test_dense_form_in_row_blocks(seed):
    g = torch.Generator().manual_seed(10)
    B, d, F, k = 9, 7, 40, 6
    v, idx = random_code(g, B, k, F, repeats=True)
    w, up = rnd(g, F, d).float(), rnd(g, B, d).float()
    v = v.float()
    with emu.strategy_scope("dense", dense_block_bytes=2 * F * 4):
        out = E.sparse_decode(v, idx, w, None, True)
        gv, gw = E.sparse_decode_backward(up, v, idx, w, True, True, True)
    ref, (rv, rw) = ref_grads(lambda v_, w_: R.sparse_decode(v_, idx, w_), [v, w], up)
    close(out, ref, torch.float32)
    close(gv, rv, torch.float32)
    close(gw, rw, torch.float32)


# --------------------------------------------------------------------------- fm_interaction
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_fm_interaction(dtype, seed):
    g = torch.Generator().manual_seed(6)
    for (B, _, F, k, K), repeats in [(s, r) for s in SHAPES for r in (False, True)]:
        v, idx = random_code(g, B, k, F, repeats)
        emb, up = rnd(g, F, K, scale=0.5), rnd(g, B, K)
        v, emb, up = (t.to(dtype) for t in (v, emb, up))
        out = E.fm_interaction(v, idx, emb, True)
        ref, (rv, re) = ref_grads(lambda v_, e_: R.fm_interaction(v_, idx, e_), [v, emb], up)
        close(out, ref, dtype, scale=k)
        gv, ge = E.fm_interaction_backward(up, v, idx, emb, True, True, True)
        close(gv, rv, dtype, scale=k * math.sqrt(K))
        close(ge, re, dtype, scale=k * math.sqrt(B))
        gv1, ge1 = E.fm_interaction_backward(up, v, idx, emb, False, True, True)
        assert gv1.numel() == 0 and torch.equal(ge1, ge)


# --------------------------------------------------------------------------- feature-major work items
# The transposed products (dW of sparse_decode and topk_encode, dE of
# fm_interaction) cut each feature's pair list into work items of at most
# PAIRS_PER_ITEM pairs (kPairsPerItem in primitives.cuh); a feature with several
# items writes partial rows that a second kernel sums in item order.
PAIRS_PER_ITEM = 256


def heavy_code(gen, B, k, F):
    """Feature 0 fires on every row (one item per PAIRS_PER_ITEM rows), feature
    1 on every other row, the rest at random (distinct within a row)."""
    idx = torch.stack([torch.randperm(F - 2, generator=gen)[:k] + 2 for _ in range(B)])
    idx[:, 0] = 0
    idx[::2, 1] = 1
    return rnd(gen, B, k).abs() + 0.1, idx


def transposed_grads(v, idx, w, x, up_d, up_k, emb, up_K):
    with emu.strategy_scope("gather"):
        _, gw = E.sparse_decode_backward(up_d, v, idx, w, False, True, True)
        _, ew, eb = E.topk_encode_backward(up_k, v, idx, x, w, None, False, True, True)
        _, ge = E.fm_interaction_backward(up_K, v, idx, emb, False, True, True)
    return gw, ew, eb, ge


# batch sizes around the item boundaries; d and K leave a partial column slice
@pytest.mark.parametrize("B", [1, 256, 257, 600])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_transposed_work_items(B, dtype, seed):
    g = torch.Generator().manual_seed(B)
    d, F, k, K = 300, 23, 3, 260
    v, idx = heavy_code(g, B, k, F)
    w, x, emb = rnd(g, F, d), rnd(g, B, d), rnd(g, F, K, scale=0.5)
    up_d, up_k, up_K = rnd(g, B, d), rnd(g, B, k), rnd(g, B, K)
    v, w, x, emb, up_d, up_k, up_K = (t.to(dtype) for t in (v, w, x, emb, up_d, up_k, up_K))
    gw, ew, eb, ge = transposed_grads(v, idx, w, x, up_d, up_k, emb, up_K)
    _, (rw,) = ref_grads(lambda w_: R.sparse_decode(v.float(), idx, w_), [w], up_d)
    close(gw, rw, dtype, scale=math.sqrt(B))
    # the encoder's dW and db (every selected value is positive: no ReLU mask)
    flat, up_flat = idx.reshape(-1), up_k.double().reshape(-1)
    rows = x.double().repeat_interleave(k, 0)
    rw2 = torch.zeros(F, d, dtype=torch.float64).index_add_(0, flat, up_flat[:, None] * rows)
    rb2 = torch.zeros(F, dtype=torch.float64).index_add_(0, flat, up_flat)
    close(ew, rw2, dtype, scale=math.sqrt(B))
    close(eb, rb2, dtype, scale=math.sqrt(B))
    _, (_, re) = ref_grads(lambda v_, e_: R.fm_interaction(v_, idx, e_), [v, emb], up_K)
    close(ge, re, dtype, scale=k * math.sqrt(B))


def test_transposed_bitwise_deterministic():
    """Every schedule gives the same bits (partials are summed in item order,
    never by atomics); a feature firing on all 600 rows spans three items."""
    g = torch.Generator().manual_seed(21)
    B, d, F, k, K = 600, 40, 9, 4, 36
    v, idx = heavy_code(g, B, k, F)
    v = v.float()
    w, x, up_d, up_k, emb, up_K = (t.float() for t in (
        rnd(g, F, d), rnd(g, B, d), rnd(g, B, d), rnd(g, B, k), rnd(g, F, K), rnd(g, B, K)))
    runs = []
    for s in (0, 1, 2, 3, 0):
        with emu.schedule(s):
            runs.append(transposed_grads(v, idx, w, x, up_d, up_k, emb, up_K))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- feature-major dv and dW
# sparse_decode's backward in the gather form: dvalues (alone or with dW) come
# from one feature-major pass (dot_scatter_rows), dW alone from scatter_rows;
# both read rows 16 bytes at a time when d and the base pointers allow it
# (float32: d % 4 == 0, 16-bit: d % 8 == 0) and one element at a time
# otherwise. The shapes: a feature per ~280 pairs (two work items), a width
# whose dot spans two warps (d = 1000), and one that needs two passes over the
# row (d = 4100: more columns than a block of 256 threads covers at once).
FEATURE_MAJOR = [  # (B, d, F, k)
    (700, 300, 20, 8),
    (700, 1, 20, 8),
    (700, 33, 20, 8),
    (600, 1000, 8, 4),
    (40, 4100, 5, 3),
]


def decode_grads(up, v, idx, w):
    """(dv with dW, dW with dv, dv alone, dW alone) in the gather form."""
    with emu.strategy_scope("gather"):
        gv, gw = E.sparse_decode_backward(up, v, idx, w, True, True, True)
        gv1, e1 = E.sparse_decode_backward(up, v, idx, w, True, False, True)
        e2, gw1 = E.sparse_decode_backward(up, v, idx, w, False, True, True)
    assert e1.numel() == 0 and e2.numel() == 0
    return gv, gw, gv1, gw1


def feature_major_case(B, d, F, k, dtype):
    """((v, w, up), idx): a heavy code (features 0 and 1 span several work
    items), a third of the rows with negative values."""
    g = torch.Generator().manual_seed(B * 7 + d + F)
    v, idx = heavy_code(g, B, k, F)
    v[::3] = -v[::3]
    w, up = rnd(g, F, d), rnd(g, B, d)
    return tuple(t.to(dtype) for t in (v, w, up)), idx


@pytest.mark.parametrize("shape", FEATURE_MAJOR, ids=[f"B{b}_d{d}_F{f}_k{k}" for b, d, f, k in FEATURE_MAJOR])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_feature_major_decode_backward(shape, dtype, seed):
    B, d, F, k = shape
    (v, w, up), idx = feature_major_case(B, d, F, k, dtype)
    gv, gw, gv1, gw1 = decode_grads(up, v, idx, w)
    _, (rv, rw) = ref_grads(lambda v_, w_: R.sparse_decode(v_, idx, w_), [v, w], up)
    close(gv, rv, dtype, scale=math.sqrt(d))
    close(gw, rw, dtype, scale=math.sqrt(B))
    # each gradient alone is the very same as with the other
    assert torch.equal(gv1, gv) and torch.equal(gw1, gw)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_feature_major_encoder_weight_grad(dtype, seed):
    """scatter_rows with the column sum (topk_encode's dW and db) at the
    feature-major shapes."""
    for B, d, F, k in FEATURE_MAJOR:
        g = torch.Generator().manual_seed(B + d)
        v, idx = heavy_code(g, B, k, F)
        x, w, up = rnd(g, B, d), rnd(g, F, d), rnd(g, B, k)
        v, x, w, up = (t.to(dtype) for t in (v, x, w, up))
        with emu.strategy_scope("gather"):
            _, gw, gb = E.topk_encode_backward(up, v, idx, x, w, None, False, True, True)
        flat, up_flat = idx.reshape(-1), up.double().reshape(-1)
        rows = x.double().repeat_interleave(k, 0)
        rw = torch.zeros(F, d, dtype=torch.float64).index_add_(0, flat, up_flat[:, None] * rows)
        rb = torch.zeros(F, dtype=torch.float64).index_add_(0, flat, up_flat)
        close(gw, rw, dtype, scale=math.sqrt(B))
        close(gb, rb, dtype, scale=math.sqrt(B))


def test_feature_major_bitwise_across_schedules():
    """The same bits under every schedule and on a second run: each column and
    each dot is summed in a fixed order, partial rows in item order."""
    for B, d, F, k in [(700, 300, 20, 8), (600, 1000, 8, 4), (40, 4100, 5, 3)]:
        for dtype in (torch.float32, torch.bfloat16):
            (v, w, up), idx = feature_major_case(B, d, F, k, dtype)
            runs = []
            for s in (0, 1, 2, 3, 0):
                with emu.schedule(s):
                    runs.append(decode_grads(up, v, idx, w))
            for other in runs[1:]:
                for a, b in zip(runs[0], other):
                    assert torch.equal(a, b)


def offset_view(t, elems):
    """t's values in a fresh buffer, starting `elems` elements past its start
    (a contiguous tensor with a storage offset, as a narrow of a larger one)."""
    buf = torch.empty(t.numel() + elems, dtype=t.dtype)
    out = buf[elems:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_feature_major_unaligned_rows(dtype, seed):
    """Rows of a width that allows 16-byte loads, with the weight or the
    upstream gradient starting off a 16-byte boundary (a narrow of a larger
    tensor, which the op takes as it is): the kernels take the plain loads (the
    emulator raises on a misaligned vector access) and give the same bits as
    the aligned inputs; an offset of whole vectors keeps the vector loads."""
    B, d, F, k = 300, 64, 6, 4
    (v, w, up), idx = feature_major_case(B, d, F, k, dtype)
    want = decode_grads(up, v, idx, w)
    vec = 16 // w.element_size()
    for ow, og in [(1, 0), (0, 1), (vec // 2, vec // 2), (vec, 2 * vec)]:
        w2, up2 = offset_view(w, ow), offset_view(up, og)
        assert w2.is_contiguous() and up2.is_contiguous()
        got = decode_grads(up2, v, idx, w2)
        with emu.strategy_scope("gather"):
            _, ew = E.topk_encode_backward(up2[:, :k].contiguous(), v, idx, up2, w2, None, False, True, True)[:2]
            _, ew0 = E.topk_encode_backward(up[:, :k].contiguous(), v, idx, up, w, None, False, True, True)[:2]
        assert torch.equal(ew, ew0)
        # dW sums each column over the pairs in the same order whatever the
        # loads; dv's dot adds the columns in another order with plain loads
        assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3])
        close(got[0], want[0], dtype, scale=math.sqrt(d))
        assert torch.equal(got[0], got[2])


# --------------------------------------------------------------------------- sparse_weight_grads
# One launch over one FeatureCsr of the code makes dW_dec, dW_lin (pairs with
# j < n), dW_enc and db_enc. dW_dec, dW_enc and db_enc sum each column in the
# order of scatter_rows (the same CSR, the same work items), so they are the
# bits of sparse_decode_backward and topk_encode_backward; dW_lin is too for
# features with one work item, and within rounding for features whose pairs
# span several items (the [B, n] code's own CSR cuts them elsewhere).
def wg_inputs(gen, B, d, F, k, dtype, heavy=False):
    if heavy:
        v, idx = heavy_code(gen, B, k, F)
        v[::3] = -v[::3]
    else:
        v, idx = random_code(gen, B, k, F, repeats=True)
    v, order = torch.sort(v, dim=1, descending=True, stable=True)
    idx = idx.gather(1, order)
    gvals = rnd(gen, B, k).to(dtype)
    v = v.to(dtype)
    c = dict(indices=idx, values=v, grad_pre=torch.ops.aten.threshold_backward(gvals, v, 0),
             grad_dec=rnd(gen, B, d).to(dtype), grad_lin=rnd(gen, B, d).to(dtype), x=rnd(gen, B, d).to(dtype),
             pre_bias=rnd(gen, d).to(dtype))
    return c, gvals


def wg_call(c, F, n, form=-1):
    return E.sparse_weight_grads(c["indices"], c["values"], c["grad_pre"], c["grad_dec"], c["grad_lin"], c["x"],
                                 c["pre_bias"], F, n, True, form)


def wg_existing(c, gvals, F, n, form=-1):
    v, idx, d = c["values"], c["indices"], c["grad_dec"].shape[1]
    W = v.new_zeros(F, d)
    _, dec = E.sparse_decode_backward(c["grad_dec"], v, idx, W, False, True, True, form)
    lin = (E.sparse_decode_backward(c["grad_lin"], v[:, :n].contiguous(), idx[:, :n].contiguous(), W, False, True,
                                    True, form)[1] if n else W.clone())
    _, enc, db = E.topk_encode_backward(gvals, v, idx, c["x"], W, c["pre_bias"], False, True, True, form)
    return dec, lin, enc, db


def wg_reference(c, F, n):
    return R.sparse_weight_grads(**{key: (val.double() if val.is_floating_point() else val) for key, val in c.items()},
                                 num_features=F, n=n)


def wg_check(got, c, gvals, F, n, dtype, lin_bitwise=True, form=-1):
    ref = wg_reference(c, F, n)
    B = c["values"].shape[0]
    for a, r in zip(got, ref):
        assert a.dtype == dtype and a.shape == r.shape
        close(a, r, dtype, scale=math.sqrt(max(B, 1)))
    want = wg_existing(c, gvals, F, n, form)
    for name, a, b in zip(("dW_dec", "dW_lin", "dW_enc", "db_enc"), got, want):
        if name == "dW_lin" and not lin_bitwise:
            close(a, b, dtype, scale=math.sqrt(B))
        else:
            assert torch.equal(a, b), (name, n)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_sparse_weight_grads(dtype, seed, form):
    """The op's shapes (d = 1, odd d, k = F, B = 0, repeated indices), n in
    {0, 1, k}: against the reference, and the bits of the three ops."""
    g = torch.Generator().manual_seed(31)
    for B, d, F, k, _ in SHAPES:
        c, gvals = wg_inputs(g, B, d, F, k, dtype)
        for n in sorted({0, 1, k}):
            wg_check(wg_call(c, F, n), c, gvals, F, n, dtype)


# (B, d, F, k): features 0 and 1 span several work items (B > 256); a width
# of one slice with 16-byte loads (300), d = 1 and odd d (plain loads), and a
# width of several column slices (4100: more columns than 256 threads x 8).
WG_HEAVY = [(600, 300, 20, 8), (300, 1, 20, 8), (300, 33, 20, 8), (40, 4100, 5, 3)]


@pytest.mark.parametrize("shape", WG_HEAVY, ids=[f"B{b}_d{d}_F{f}_k{k}" for b, d, f, k in WG_HEAVY])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_sparse_weight_grads_work_items_and_slices(shape, dtype, seed):
    B, d, F, k = shape
    g = torch.Generator().manual_seed(B + d)
    c, gvals = wg_inputs(g, B, d, F, k, dtype, heavy=True)
    with emu.strategy_scope("gather"):
        for n in (1, k // 2 + 1):
            # B > 256: features 0 and 1 have several items here, and their
            # top-n pairs are cut elsewhere in the [B, n] code's own CSR
            wg_check(wg_call(c, F, n), c, gvals, F, n, dtype, lin_bitwise=B <= 256)


def test_sparse_weight_grads_bitwise_across_schedules():
    """The same bits under every schedule and on a second run; grad_lin given
    as grad_dec itself (one load serves both) gives the bits of a copy."""
    g = torch.Generator().manual_seed(8)
    for B, d, F, k in [(600, 300, 20, 8), (40, 4100, 5, 3)]:
        for dtype in (torch.float32, torch.bfloat16):
            c, _ = wg_inputs(g, B, d, F, k, dtype, heavy=True)
            runs = []
            with emu.strategy_scope("gather"):
                for s in (0, 1, 2, 3, 0):
                    with emu.schedule(s):
                        runs.append(wg_call(c, F, 3))
                same = wg_call(dict(c, grad_lin=c["grad_dec"]), F, 3)
                copy = wg_call(dict(c, grad_lin=c["grad_dec"].clone()), F, 3)
            for other in runs[1:]:
                for a, b in zip(runs[0], other):
                    assert torch.equal(a, b)
            for a, b in zip(same, copy):
                assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_sparse_weight_grads_unaligned_rows(dtype, seed):
    """grad_dec, grad_lin or x off a 16-byte boundary: the plain loads (the
    emulator raises on a misaligned vector access), the same bits; an offset
    of whole vectors keeps the vector loads."""
    g = torch.Generator().manual_seed(9)
    B, d, F, k = 300, 64, 6, 4
    c, _ = wg_inputs(g, B, d, F, k, dtype, heavy=True)
    with emu.strategy_scope("gather"):
        want = wg_call(c, F, 2)
        vec = 16 // c["x"].element_size()
        for name, off in [("grad_dec", 1), ("grad_lin", vec // 2), ("x", 1), ("x", vec)]:
            c2 = dict(c, **{name: offset_view(c[name], off)})
            assert c2[name].is_contiguous()
            for a, b in zip(wg_call(c2, F, 2), want):
                assert torch.equal(a, b), (name, off)


def test_sparse_weight_grads_absent_inputs_and_errors():
    g = torch.Generator().manual_seed(10)
    c, _ = wg_inputs(g, 30, 12, 25, 5, torch.float32)
    with emu.strategy_scope("gather"):
        full = wg_call(c, 25, 3)
        for drop, empty in [("grad_dec", (0,)), ("grad_lin", (1,)), ("grad_pre", (2, 3)), ("x", (2, 3))]:
            got = wg_call(dict(c, **{drop: None}), 25, 3)
            for o in range(4):
                assert got[o].shape == (0,) if o in empty else torch.equal(got[o], full[o]), (drop, o)
    with pytest.raises(ValueError, match=r"'n' must satisfy 0 <= n <= k = 5"):
        wg_call(c, 25, 6)
    with pytest.raises(IndexError, match=r"'indices' must hold feature indices in \[0, 10\)"):
        wg_call(c, 10, 2)


# --------------------------------------------------------------------------- staged dense weight gradients
# emu.dense_weight_grads_scope("staged"): the dense form's weight gradients
# (sparse_decode's dW, topk_encode's dW and db) by staged_scatter_rows
# (csrc/ops/cuda/staged_rows.cuh) instead of the GEMMs. Column slices of
# 1-3 vectors of 16 bytes (bf16/fp16: 8-24 columns, float32: 4-12) for every
# batch row in shared memory; each column summed over its feature's pairs in
# the transpose's order, so the values are bitwise the gather form's
# feature-major kernel (scatter_rows), which also serves a batch whose slice
# does not fit the shared-memory budget.
DENSE = 1 << 20  # the dense form, row blocks of 1 MiB (the backward ops' sparse_form argument)
STAGED = [  # (B, d, F, k): hot features (several work items), partial slices, d = 1
    (700, 300, 20, 8),
    (700, 1, 20, 8),
    (700, 33, 20, 8),
    (40, 100, 5, 3),
]


def staged_case(B, d, F, k, dtype, repeats=False):
    """(v, idx, w, x, up_d, up_k): a heavy code (or one with repeated indices
    within rows), a third of the values negative (no encoder gradient there)."""
    g = torch.Generator().manual_seed(B * 5 + d + F + repeats)
    if repeats:
        v, idx = random_code(g, B, k, F, repeats=True)
        idx[:, 0] = idx[:, 1]  # at least one repeat per row
    else:
        v, idx = heavy_code(g, B, k, F)
    v[::3] = -v[::3]
    w, x, up_d, up_k = rnd(g, F, d), rnd(g, B, d), rnd(g, B, d), rnd(g, B, k)
    return tuple(t.to(dtype) for t in (v,)) + (idx,) + tuple(t.to(dtype) for t in (w, x, up_d, up_k))


def weight_grads(v, idx, w, x, up_d, up_k, form):
    """(sparse_decode's dv and dW, topk_encode's dx, dW and db) in `form`."""
    dv, dw = E.sparse_decode_backward(up_d, v, idx, w, True, True, True, form)
    dx, ew, eb = E.topk_encode_backward(up_k, v, idx, x, w, None, True, True, True, form)
    return dv, dw, dx, ew, eb


def encoder_ref(v, idx, x, up_k, F):
    """topk_encode's dW and db in float64 (ReLU: no gradient where v <= 0)."""
    k = idx.shape[1]
    flat, up_flat = idx.reshape(-1), (up_k.double() * (v.double() > 0)).reshape(-1)
    rows = x.double().repeat_interleave(k, 0)
    rw = torch.zeros(F, x.shape[1], dtype=torch.float64).index_add_(0, flat, up_flat[:, None] * rows)
    rb = torch.zeros(F, dtype=torch.float64).index_add_(0, flat, up_flat)
    return rw, rb


@pytest.mark.parametrize("shape", STAGED, ids=[f"B{b}_d{d}_F{f}_k{k}" for b, d, f, k in STAGED])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_staged_dense_weight_grads(shape, dtype, seed):
    B, d, F, k = shape
    for repeats in (False, True):
        v, idx, w, x, up_d, up_k = staged_case(B, d, F, k, dtype, repeats)
        with emu.dense_weight_grads_scope("staged"):
            staged = weight_grads(v, idx, w, x, up_d, up_k, DENSE)
        with emu.dense_weight_grads_scope("gemm"):
            gemm = weight_grads(v, idx, w, x, up_d, up_k, DENSE)
            gather = weight_grads(v, idx, w, x, up_d, up_k, 0)
        # against the reference
        _, (rw,) = ref_grads(lambda w_: R.sparse_decode(v.float(), idx, w_), [w], up_d)
        rw2, rb2 = encoder_ref(v, idx, x, up_k, F)
        close(staged[1], rw, dtype, scale=math.sqrt(B))
        close(staged[3], rw2, dtype, scale=math.sqrt(B))
        close(staged[4], rb2, dtype, scale=math.sqrt(B))
        # against the GEMMs (tolerance: another summation order), the other
        # gradients untouched, and bitwise the gather form's feature-major kernel
        for i in (1, 3, 4):
            close(staged[i], gemm[i], dtype, scale=math.sqrt(B))
            assert torch.equal(staged[i], gather[i])
        assert torch.equal(staged[0], gemm[0]) and torch.equal(staged[2], gemm[2])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_staged_batch_over_the_shared_memory_budget(dtype, seed):
    """A budget under one 16-byte group of all B rows: the feature-major
    kernel instead; at 1, 2 and 3 groups (and above: capped at 3) the staged
    kernel. Every budget gives the same bits."""
    B, d, F, k = 300, 70, 12, 5
    v, idx, w, x, up_d, up_k = staged_case(B, d, F, k, dtype)
    runs = []
    for budget in (B * 16 - 1, 1000, B * 16, B * 32, B * 48, B * 64, 0):
        with emu.dense_weight_grads_scope("staged", smem_bytes=budget):
            runs.append(weight_grads(v, idx, w, x, up_d, up_k, DENSE))
    rw2, rb2 = encoder_ref(v, idx, x, up_k, F)
    close(runs[0][3], rw2, dtype, scale=math.sqrt(B))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_staged_bitwise_across_schedules_and_runs():
    for B, d, F, k in [(700, 300, 20, 8), (700, 33, 20, 8)]:
        for dtype in (torch.float32, torch.bfloat16):
            case = staged_case(B, d, F, k, dtype)
            runs = []
            for s in (0, 1, 2, 3, 0):
                with emu.schedule(s), emu.dense_weight_grads_scope("staged"):
                    runs.append(weight_grads(*case, DENSE))
            for other in runs[1:]:
                for a, b in zip(runs[0], other):
                    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_staged_rows_off_16_byte_boundaries(dtype, seed):
    """y (grad_out, x) with rows off a 16-byte boundary: staged with plain
    element loads, the same bits as aligned inputs."""
    B, d, F, k = 300, 64, 6, 4
    v, idx, w, x, up_d, up_k = staged_case(B, d, F, k, dtype)
    with emu.dense_weight_grads_scope("staged"):
        want = weight_grads(v, idx, w, x, up_d, up_k, DENSE)
        for off in (1, 3):
            x2, up2 = offset_view(x, off), offset_view(up_d, off)
            got = weight_grads(v, idx, w, x2, up2, up_k, DENSE)
            assert torch.equal(got[1], want[1]) and torch.equal(got[3], want[3]) and torch.equal(got[4], want[4])


def test_dense_weight_grads_scope_validates_and_restores():
    with pytest.raises(ValueError, match="'mode' must be 'gemm' or 'staged'"):
        with emu.dense_weight_grads_scope("fast"):
            pass
    with pytest.raises(ValueError, match="'smem_bytes' must be an int >= 0"):
        with emu.dense_weight_grads_scope("staged", smem_bytes=-1):
            pass
    with emu.dense_weight_grads_scope("staged", smem_bytes=4096):
        assert emu.module().dense_weight_grads_staged() and emu.module().staged_smem_bytes() == 4096
    assert not emu.module().dense_weight_grads_staged() and emu.module().staged_smem_bytes() == 0


def test_staged_setting_takes_the_kernels():
    """"gemm": no kernel launch for dW (ATen GEMMs); "staged": the coefficient
    gather, the staged kernel and the partial-row sum; over the budget: the
    feature-major kernel and the partial-row sum."""
    v, idx, w, x, up_d, up_k = staged_case(300, 70, 12, 5, torch.float32)
    counts = []
    for mode, budget in (("gemm", 0), ("staged", 0), ("staged", 16)):
        with emu.dense_weight_grads_scope(mode, smem_bytes=budget), emu.schedule(0):
            E.sparse_decode_backward(up_d, v, idx, w, False, True, True, DENSE)
            counts.append(emu.module().launch_count())
    assert counts == [0, 3, 2]


# --------------------------------------------------------------------------- integration_mlp
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_integration_mlp(dtype, seed):
    g = torch.Generator().manual_seed(7)
    for B, K, H, d in [(5, 6, 9, 4), (0, 3, 4, 2), (3, 70, 300, 5)]:
        p, w1, b1 = rnd(g, B, K), rnd(g, H, K, scale=0.3), rnd(g, H, scale=0.1)
        w2, b2, up = rnd(g, d, H, scale=0.3), rnd(g, d), rnd(g, B, d)
        p, w1, b1, w2, b2, up = (t.to(dtype) for t in (p, w1, b1, w2, b2, up))
        for mask in (None, torch.rand(B, K, generator=g) > 0.3):
            scale = 1.0 if mask is None else 1.0 / 0.7
            out, hidden = E.integration_mlp(p, w1, b1, w2, b2, mask, scale)

            def ref(p_, w1_, b1_, w2_, b2_):
                pd = p_ if mask is None else p_ * mask.float() * scale
                return torch.relu(pd @ w1_.t() + b1_) @ w2_.t() + b2_

            r, rg = ref_grads(ref, [p, w1, b1, w2, b2], up)
            close(out, r, dtype, scale=math.sqrt(K + H))
            close(hidden, (p.float() if mask is None else p.float() * mask.float() * scale) @ w1.float().t()
                  + b1.float(), dtype, scale=math.sqrt(K))
            grads = E.integration_mlp_backward(up, None, p, hidden, w1, w2, mask, scale)
            for a, b_ in zip(grads, rg):
                close(a, b_, dtype, scale=math.sqrt(B + H + d))


# --------------------------------------------------------------------------- topn_reselect
def test_topn_reselect(seed):
    g = torch.Generator().manual_seed(12)
    values = torch.randint(0, 4, (6, 9), generator=g).float()  # ties
    indices = torch.stack([torch.randperm(50, generator=g)[:9] for _ in range(6)])
    for n in (1, 4, 9):
        v, i, _ = E.topn_reselect(values, indices, n)
        rv, ri = R.topn_reselect(values, indices, n)
        assert torch.equal(v, rv) and torch.equal(i, ri)


# --------------------------------------------------------------------------- dense dvalues in feature chunks
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_dense_dvalues_in_feature_chunks(dtype, seed):
    """The dense form's dvalues through 2048-feature chunks of g W^T, each read
    back through the transpose (one warp per feature): the row-block form's
    values, several chunks, repeated indices, features with no pair."""
    g_ = torch.Generator().manual_seed(9)
    B, d, F, k = 5, 10, 4500, 200
    v, w, g = rnd(g_, B, k).to(dtype), rnd(g_, F, d).to(dtype), rnd(g_, B, d).to(dtype)
    idx = torch.randint(0, F, (B, k), generator=g_)
    with emu.dense_dv_scope(0):
        rows_form = E.sparse_decode_backward(g, v, idx, w, True, False, True, 1 << 20)[0]
    with emu.dense_dv_scope(1):
        chunked = E.sparse_decode_backward(g, v, idx, w, True, False, True, 1 << 20)[0]
    assert torch.equal(chunked, rows_form)
    close(chunked, (g.double() @ w.double().T).gather(1, idx), dtype, scale=math.sqrt(d))


# --------------------------------------------------------------------------- shared transposes
def _step_backward(E, x, w, b, wd, wl, emb, up_d, up_l, up_p, k, n):
    """The backward products of a joint step, called as the autograd backward
    calls them: the decoder and the encoder on the code, the NFM linear layer
    and the FM pooling on its first n columns (a view)."""
    v, idx = E.topk_encode(x, w, b, k, None)
    gv_d, gw_d = E.sparse_decode_backward(up_d, v, idx, wd, True, True, False, 0)
    vn, idn = v[:, :n], idx[:, :n]
    gv_l, gw_l = E.sparse_decode_backward(up_l, vn, idn, wl, True, True, False, 0)
    gv_f, ge = E.fm_interaction_backward(up_p, vn, idn, emb, True, True, False)
    gv = gv_d.clone()
    gv[:, :n] += gv_l + gv_f
    gx, gw, gb = E.topk_encode_backward(gv, v, idx, x, w, None, True, True, False, 0)
    return [gw_d, gw_l, ge, gx, gw, gb, gv]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_backward_products_share_one_transpose(dtype, seed):
    """On the CUDA kernels too: one transpose of the code (decoder, encoder)
    and one of its first n columns (NFM linear, FM) per step, the gradients
    bitwise those with a transpose per product."""
    C = emu.module()
    g = torch.Generator().manual_seed(21)
    B, d, F, k, n, K = 300, 40, 30, 7, 3, 12  # features with several work items
    x, w, b = rnd(g, B, d), rnd(g, F, d), rnd(g, F)
    wd, wl, emb = rnd(g, F, d), rnd(g, F, d), rnd(g, F, K)
    up_d, up_l, up_p = rnd(g, B, d), rnd(g, B, d), rnd(g, B, K)
    args = [t.to(dtype) for t in (x, w, b, wd, wl, emb, up_d, up_l, up_p)]
    try:
        C.set_share_csrs(False)
        C.shared_csr_stats(True)
        alone = _step_backward(E, *args, k, n)
        assert C.shared_csr_stats(True) == (4, 0)
        C.set_share_csrs(True)
        shared = _step_backward(E, *args, k, n)
        assert C.shared_csr_stats(True) == (2, 2)
    finally:
        C.set_share_csrs(True)
    for a, s_ in zip(alone, shared):
        assert torch.equal(a, s_)


# --------------------------------------------------------------------------- both libraries in one process
def test_emulated_and_real_ops_side_by_side():
    ops = pytest.importorskip("dualenc_fast.ops")
    g = torch.Generator().manual_seed(13)
    x, w, b = rnd(g, 5, 8).float(), rnd(g, 40, 8).float(), rnd(g, 40).float()
    v, i = E.topk_encode(x, w, b, 6, None)
    cv, ci = ops.topk_encode(x, w, b, 6)
    assert torch.equal(i, ci)
    torch.testing.assert_close(v, cv)
    with pytest.raises(ValueError, match="argument 'k' must satisfy"):
        E.topk_encode(x, w, b, 41, None)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        E.topk_encode(x.double(), w.double(), b.double(), 3, None)


# --------------------------------------------------------------------------- tiled forward
# sparse_decode's batch-tiled CUDA forward (tiled_decode_cuda.cu): blocks of
# TILED_ROWS batch rows x a column slice (128 columns; 64 in float64), the
# weight table streamed through shared memory in chunks of 192 features
# (16-bit) or 96 (float32), each row's pairs summed in ascending feature order.
TILED_ROWS = 256

# (B, d, F, k, repeats): B past one tile, several chunks, d = 1, 33, 64, 65,
# 300 (three slices), k = 1, k = F, repeated indices (k > F too), k = 0
TILED_CASES = [
    (300, 65, 400, 37, False),
    (5, 1, 50, 1, False),
    (4, 33, 200, 200, False),
    (3, 64, 30, 20, True),
    (2, 64, 7, 40, True),
    (260, 300, 450, 9, True),
    (6, 33, 211, 5, False),
    (3, 8, 5, 0, False),
]


def tiled_case(g, B, d, F, k, repeats, dtype, offset=False):
    v, idx = random_code(g, B, k, F, repeats)
    w, b = rnd(g, F, d), rnd(g, d)
    v, w, b = (t.to(dtype) for t in (v, w, b))
    if offset:  # rows off a 16-byte boundary: one element past an aligned start
        base = torch.zeros(F * d + 1, dtype=dtype)
        base[1:] = w.reshape(-1)
        w = base[1:].view(F, d)
        assert w.data_ptr() % 16 != 0
    return v, idx, w, b


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_tiled_decode(dtype, seed):
    """Forced on: against the reference (with and without bias, weight rows
    aligned or one element off), and bitwise the same as in thread order."""
    g = torch.Generator().manual_seed(5)
    for B, d, F, k, repeats in TILED_CASES:
        for offset in (False, True) if d % 8 == 0 else (False,):
            v, idx, w, b = tiled_case(g, B, d, F, k, repeats, dtype, offset)
            with emu.strategy_scope(tiled="on"):
                out = E.sparse_decode(v, idx, w, b, True)
                out_nb = E.sparse_decode(v, idx, w, None, True)
                with emu.schedule(0):
                    again = E.sparse_decode(v, idx, w, b, True)
            ref = R.sparse_decode(v.float(), idx, w.float(), b.float())
            close(out, ref, dtype, scale=math.sqrt(max(k, 1)))
            close(out_nb, R.sparse_decode(v.float(), idx, w.float(), None), dtype, scale=math.sqrt(max(k, 1)))
            assert out.dtype == dtype and out.shape == (B, d)
            assert torch.equal(out, again), (B, d, F, k)


def test_tiled_decode_float64_and_empty():
    g = torch.Generator().manual_seed(6)
    v, idx, w, b = tiled_case(g, 270, 70, 130, 11, True, torch.float64)
    with emu.strategy_scope(tiled="on"):
        out = E.sparse_decode(v, idx, w, b, True)
        empty = E.sparse_decode(v[:0], idx[:0], w, b, True)
        narrow = E.sparse_decode(v, idx, w[:, :0], b[:0], True)
    torch.testing.assert_close(out, R.sparse_decode(v, idx, w, b), atol=1e-12, rtol=1e-12)
    assert empty.shape == (0, 70) and narrow.shape == (270, 0)


def test_tiled_decode_sums_in_feature_order():
    """The fixed summation order: bias, then each row's pairs by ascending
    feature (a repeated feature in code order), one float32 add each."""
    g = torch.Generator().manual_seed(7)
    B, d, F, k = 9, 20, 300, 40
    idx = torch.randint(0, F, (B, k), generator=g)
    # exact products (20-bit values times 3-bit weights), magnitudes 2^-20..2^20:
    # only the order of the adds decides the rounding, FMA or not
    scale = torch.pow(2.0, torch.randint(-20, 21, (B, k), generator=g).double())
    v = (torch.randint(-(1 << 19), 1 << 19, (B, k), generator=g).double() * scale).float()
    w = torch.randint(-7, 8, (F, d), generator=g).float()
    b = rnd(g, d).float()
    with emu.strategy_scope(tiled="on"):
        out = E.sparse_decode(v, idx, w, b, True)
    order = torch.sort(idx, dim=1, stable=True).indices
    expect = b.expand(B, d).clone()
    for j in range(k):
        col = order[:, j]
        expect = expect + v.gather(1, col[:, None]) * w[idx.gather(1, col[:, None])[:, 0]]
    assert torch.equal(out, expect)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_tiled_decode_auto_and_backward_form(dtype):
    """auto takes the tiled form where the density says so (the CUDA rule,
    though the emulated tensors are on the CPU), "off" and a forced gather or
    dense mode never; the backward is the same whatever the forward took."""
    g = torch.Generator().manual_seed(8)
    B, d, F, k = 300, 65, 400, 37  # reuse k * 256 / F = 23.7, density 0.09
    v, idx, w, b = tiled_case(g, B, d, F, k, False, dtype)
    up = rnd(g, B, d).to(dtype)
    with emu.strategy_scope("auto", tiled="on"):
        tiled = E.sparse_decode(v, idx, w, b, True)
        bwd_tiled = E.sparse_decode_backward(up, v, idx, w, True, True, True)
    with emu.strategy_scope("auto", tiled="auto"):
        auto = E.sparse_decode(v, idx, w, b, True)
        bwd_auto = E.sparse_decode_backward(up, v, idx, w, True, True, True)
    with emu.strategy_scope("auto", tiled="off"):
        off = E.sparse_decode(v, idx, w, b, True)
        bwd_off = E.sparse_decode_backward(up, v, idx, w, True, True, True)
    with emu.strategy_scope("gather"):
        gathered = E.sparse_decode(v, idx, w, b, True)
    # float32 without TF32: below the SIMT bound (0.25), so auto is tiled; 16-bit:
    # above the tensor-core bound (0.03), so auto is the gather/dense form
    assert torch.equal(auto, tiled if dtype == torch.float32 else off)
    assert torch.equal(gathered, off)  # the emulated fallback decides by the CPU rule: gather here
    if dtype == torch.float32:
        assert not torch.equal(tiled, off)  # the two summation orders round differently here
    close(tiled, off, dtype, scale=math.sqrt(k))
    for a, c in zip(bwd_tiled + bwd_auto, bwd_off + bwd_off):
        assert torch.equal(a, c)
    with emu.strategy_scope("auto", tiled="auto"):
        assert emu.strategy()["tiled"] == "auto"
    assert emu.strategy()["tiled"] == "auto"


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_topk_encode_backward_dx_tiled(dtype, seed):
    """topk_encode's backward dx in the gather form is sparse_decode's
    gather-sum of the masked gradient: with the tiled kernel on it is that
    kernel's result bitwise (ReLU-clamped values pass no gradient), close to
    the gather's; dW and db do not change."""
    g = torch.Generator().manual_seed(10)
    B, d, F, k = 270, 65, 300, 24
    x, w, b = rnd(g, B, d).to(dtype), rnd(g, F, d).to(dtype), rnd(g, F).to(dtype)
    v, i = E.topk_encode(x, w, b, k, None)
    v = v.clone()
    v[::3, -1] = 0  # clamped by ReLU: no gradient
    up = rnd(g, B, k).to(dtype)
    masked = torch.where(v > 0, up, torch.zeros_like(up))
    with emu.strategy_scope("gather", tiled="on"):
        gx, gw, gb = E.topk_encode_backward(up, v, i, x, w, None, True, True, True)
        direct = E.sparse_decode(masked, i, w, None, True)
    with emu.strategy_scope("gather", tiled="off"):
        gx0, gw0, gb0 = E.topk_encode_backward(up, v, i, x, w, None, True, True, True)
    assert torch.equal(gx, direct)
    close(gx, gx0, dtype, scale=math.sqrt(k))
    assert torch.equal(gw, gw0) and torch.equal(gb, gb0)
    with emu.strategy_scope("dense", tiled="on"):  # the dense form keeps its GEMM
        gxd, _, _ = E.topk_encode_backward(up, v, i, x, w, None, True, False, True)
    with emu.strategy_scope("dense", tiled="off"):
        gxd0, _, _ = E.topk_encode_backward(up, v, i, x, w, None, True, False, True)
    assert torch.equal(gxd, gxd0)
