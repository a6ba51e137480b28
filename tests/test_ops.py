"""Every compiled op against the pure-PyTorch reference: forward, all gradients,
float64 gradcheck, torch.library.opcheck, and the errors bad input must raise.
The same tests run on CUDA when a device is present."""
import pytest
import torch

import dualenc_fast.reference.functional as R
from conftest import DEVICES, OP_SHAPE_IDS as SHAPE_IDS, OP_SHAPES as SHAPES

ops = pytest.importorskip("dualenc_fast.ops")


def tol(dtype):
    return {
        torch.float64: dict(atol=1e-10, rtol=1e-9),
        torch.float32: dict(atol=2e-5, rtol=1e-4),
        torch.bfloat16: dict(atol=5e-2, rtol=5e-2),
        torch.float16: dict(atol=5e-3, rtol=5e-3),
    }[dtype]


def leaf(t):
    return t.detach().clone().requires_grad_(True)


def random_code(B, k, F, device, dtype, gen, repeats=False):
    if repeats:
        indices = torch.randint(0, F, (B, k), generator=gen).to(device)
    else:
        indices = torch.stack([torch.randperm(F, generator=gen)[:k] for _ in range(B)]) if B else torch.empty(0, k, dtype=torch.long)
        indices = indices.to(device)
    values = torch.randn(B, k, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    return values, indices


def grads(fn, inputs, upstream):
    out = fn(*inputs)
    out = out[0] if isinstance(out, tuple) else out
    diff = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return out, torch.autograd.grad(out, diff, upstream, allow_unused=True)


@pytest.fixture(params=["gather", "dense"])
def strategy(request):
    """Runs a test under each form of the sparse products (ops.set_sparse_strategy)."""
    with ops.sparse_strategy_scope(request.param):
        yield request.param


def assert_close_all(a, b, dtype):
    for x, y in zip(a, b):
        if x is None and y is None:
            continue
        # autograd may report an input that does not influence the output as None
        x = torch.zeros_like(y) if x is None else x
        y = torch.zeros_like(x) if y is None else y
        torch.testing.assert_close(x, y, **tol(dtype))


# --------------------------------------------------------------------------- sparse_decode
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("repeats", [False, True])
def test_sparse_decode_matches_reference(device, dtype, shape, with_bias, repeats, strategy):
    B, d, F, k, _ = shape
    g = torch.Generator().manual_seed(1)
    values, indices = random_code(B, k, F, device, dtype, g, repeats=repeats)
    weight = torch.randn(F, d, generator=g, dtype=torch.float64).to(device, dtype)
    bias = torch.randn(d, generator=g, dtype=torch.float64).to(device, dtype) if with_bias else None
    up = torch.randn(B, d, generator=g, dtype=torch.float64).to(device, dtype)
    inputs = [leaf(values), indices, leaf(weight), leaf(bias) if with_bias else None]
    ref_inputs = [leaf(values), indices, leaf(weight), leaf(bias) if with_bias else None]
    out, gr = grads(ops.sparse_decode, inputs, up)
    ref, rgr = grads(R.sparse_decode, ref_inputs, up)
    torch.testing.assert_close(out, ref, **tol(dtype))
    assert_close_all(gr, rgr, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_decode_noncontiguous(device):
    g = torch.Generator().manual_seed(2)
    values = torch.randn(8, 12, generator=g).to(device)[:, ::2]  # [8, 6] strided
    indices = torch.randint(0, 20, (6, 8), generator=g).to(device).t()  # transposed
    weight = torch.randn(10, 20, generator=g).to(device).t()  # [20, 10] transposed
    torch.testing.assert_close(ops.sparse_decode(values, indices, weight), R.sparse_decode(values, indices, weight))


def test_sparse_decode_gradcheck(strategy):
    g = torch.Generator().manual_seed(3)
    values, indices = random_code(4, 3, 9, "cpu", torch.float64, g, repeats=True)
    weight = torch.randn(9, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda v, w, b: ops.sparse_decode(v, indices, w, b), (leaf(values), leaf(weight), leaf(bias))
    )


# --------------------------------------------------------------------------- topk_encode
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("with_pre_bias", [False, True])
def test_topk_encode_matches_reference(device, dtype, shape, with_pre_bias, strategy):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("topk_encode on CUDA is float32/float16/bfloat16")
    B, d, F, k, _ = shape
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, d, generator=g, dtype=torch.float64).to(device, dtype)
    weight = torch.randn(F, d, generator=g, dtype=torch.float64).to(device, dtype)
    bias = (0.1 * torch.randn(F, generator=g, dtype=torch.float64)).to(device, dtype)
    pre = torch.randn(d, generator=g, dtype=torch.float64).to(device, dtype) if with_pre_bias else None
    up = torch.randn(B, k, generator=g, dtype=torch.float64).to(device, dtype)

    def run(fn):
        ins = [leaf(x), leaf(weight), leaf(bias)] + ([leaf(pre)] if with_pre_bias else [])
        v, i = fn(ins[0], ins[1], ins[2], k, pre_bias=ins[3] if with_pre_bias else None)
        gs = torch.autograd.grad(v, ins, up, allow_unused=True)
        return v, i, gs

    v, i, gs = run(ops.topk_encode)
    rv, ri, rgs = run(R.topk_encode)
    torch.testing.assert_close(v, rv, **tol(dtype))
    assert torch.equal(i, ri)
    assert i.dtype == torch.int64
    assert_close_all(gs, rgs, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_topk_encode_tie_rule_and_relu_zeros(device):
    # duplicate rows of weight give exactly equal pre-activations: the lower
    # feature index must win; with few positives, zeros fill up by lowest index.
    w = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]], device=device)
    b = torch.zeros(6, device=device)
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], device=device)
    v, i = ops.topk_encode(x, w, b, 4)
    assert i.tolist() == [[1, 3, 0, 2], [4, 0, 1, 2]]
    assert v.tolist() == [[2.0, 2.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]]
    rv, ri = R.topk_encode(x, w, b, 4)
    assert torch.equal(i, ri) and torch.equal(v, rv)
    # ReLU-clamped selections pass no gradient
    xr, wr, br = leaf(x), leaf(w), leaf(b)
    v, i = ops.topk_encode(xr, wr, br, 4)
    v.sum().backward()
    assert br.grad.tolist() == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_topk_encode_gradcheck(strategy):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    w = torch.randn(11, 5, generator=g, dtype=torch.float64)
    b = torch.randn(11, generator=g, dtype=torch.float64)
    pre = torch.randn(5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, w, b, pre: ops.topk_encode(x, w, b, 3, pre_bias=pre)[0],
        (leaf(x), leaf(w), leaf(b), leaf(pre)),
    )


@pytest.mark.parametrize("wanted", ["pre", "w_b_pre", "x_pre"])
def test_topk_encode_pre_bias_gradient_builds_no_dx(wanted, strategy, monkeypatch):
    """The pre_bias gradient is -(grad_bias @ weight): when x needs no gradient
    the backward op is not asked for the [B, d] dx (or not called at all when
    only pre_bias needs one). Against the reference's autograd and gradcheck."""
    g = torch.Generator().manual_seed(41)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    w = torch.randn(13, 5, generator=g, dtype=torch.float64)
    b = torch.randn(13, generator=g, dtype=torch.float64)
    pre = torch.randn(5, generator=g, dtype=torch.float64)
    flags = {"pre": (0, 0, 0, 1), "w_b_pre": (0, 1, 1, 1), "x_pre": (1, 0, 0, 1)}[wanted]
    up = torch.randn(6, 4, generator=g, dtype=torch.float64)
    seen = []
    real = ops._ops

    class Spy:  # torch.ops.dualenc_fast, recording need_x_grad of the backward op
        def __getattr__(self, name):
            attr = getattr(real, name)
            if name != "topk_encode_backward":
                return attr

            class Op:
                @staticmethod
                def default(*a, **kw):
                    seen.append(a[6])
                    return attr.default(*a, **kw)

            return Op

    monkeypatch.setattr(ops, "_ops", Spy())
    ins = [t.clone().requires_grad_(bool(f)) for t, f in zip((x, w, b, pre), flags)]
    v, _ = ops.topk_encode(ins[0], ins[1], ins[2], 4, pre_bias=ins[3])
    diff = [t for t in ins if t.requires_grad]
    got = torch.autograd.grad(v, diff, up)
    assert seen == ([] if wanted == "pre" else [wanted == "x_pre"])
    rins = [t.clone().requires_grad_(bool(f)) for t, f in zip((x, w, b, pre), flags)]
    rv, _ = R.topk_encode(rins[0], rins[1], rins[2], 4, pre_bias=rins[3])
    want = torch.autograd.grad(rv, [t for t in rins if t.requires_grad], up)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **tol(torch.float64))
    monkeypatch.undo()
    fixed = [x, w, b, pre]

    def fn(*t):
        it = iter(t)
        args = [next(it) if f else a for a, f in zip(fixed, flags)]
        return ops.topk_encode(args[0], args[1], args[2], 4, pre_bias=args[3])[0]

    assert torch.autograd.gradcheck(fn, tuple(leaf(a) for a, f in zip(fixed, flags) if f))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_encode_nan_ranks_first(device, dtype):
    """A NaN pre-activation ranks first, above +Inf, NaNs among themselves by
    lower index, and the NaN is written to values, as in the reference
    (torch.sort / torch.topk); its gradient passes as through torch's ReLU.
    NaNs sit in the first k columns (before the heap fills), in a full block
    of 16 after it, in the tail, and outnumber k in one row."""
    F, k = 70, 4
    bias = torch.zeros(6, F)
    bias[:, 10:20] = torch.linspace(1, 2, 10)
    nan, inf = float("nan"), float("inf")
    bias[0, 2] = nan               # before the heap fills
    bias[1, 40] = nan              # a full block of 16 after the heap fills
    bias[2, 69] = nan              # the tail
    bias[3, [5, 33, 50, 51, 68]] = nan  # more NaNs than k
    bias[4, 30], bias[4, 60] = inf, nan  # NaN above +Inf
    bias[5, 0], bias[5, 1] = nan, -1.0   # rows of NaN and negatives
    x = torch.ones(6, 1, dtype=torch.float64)
    w = torch.ones(F, 1, dtype=torch.float64)
    for r in range(6):  # bias is [F]: one row per call
        lo = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
        ins = [leaf(lo(x[r:r + 1] * 0)), leaf(lo(w)), leaf(lo(bias[r]))]
        v, i = ops.topk_encode(*ins, k)
        rins = [leaf(lo(x[r:r + 1] * 0)), leaf(lo(w)), leaf(lo(bias[r]))]
        rv, ri = R.topk_encode(*rins, k)
        assert torch.equal(i, ri), (r, i, ri)
        torch.testing.assert_close(v, rv, equal_nan=True)
        assert v.isnan().any()
        up = torch.arange(1.0, k + 1).reshape(1, k).to(device=device, dtype=dtype)
        got = torch.autograd.grad(v, ins, up)
        want = torch.autograd.grad(rv, rins, up)
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, equal_nan=True)
    # the whole loss goes NaN: what the trainer's NaN guard watches
    v, _ = ops.topk_encode(torch.ones(2, 1), torch.ones(F, 1), bias[1], k)
    assert torch.isnan(v.sum())


def test_topk_encode_late_winners_in_blocks():
    """Winners that arrive after the heap is full, at every position of a block
    of 16 and in the tail, with ties against earlier features."""
    F, k = 16 * 5 + 7, 5
    rows = []
    for pos in range(k, F):
        b = torch.zeros(F)
        b[:k] = 1.0
        b[pos] = 2.0 if pos % 3 else 1.0  # a clear winner, or a tie the earlier feature keeps
        rows.append(b)
    bias = torch.stack(rows)  # one row of biases per case
    x = torch.zeros(len(rows), 1)
    w = torch.zeros(F, 1)
    for r in range(len(rows)):
        v, i = ops.topk_encode(x[r:r + 1], w, bias[r], k)
        rv, ri = R.topk_encode(x[r:r + 1], w, bias[r], k)
        assert torch.equal(i, ri) and torch.equal(v, rv), (r, i, ri)


@pytest.mark.parametrize("order", ["rising", "falling", "zigzag"])
def test_topk_encode_many_winners_across_tiles_with_ties(order):
    """Rows where most values beat the running threshold (the CPU selection's
    candidate buffer fills and is cut back many times), across several
    column tiles, with runs of equal values that the lower index must win."""
    F, k, B = 1500, 7, 5
    base = torch.arange(F, dtype=torch.float32) // 3  # triples of equal values
    w = {"rising": base, "falling": base.flip(0), "zigzag": (base % 50) + (base // 50) * 0.5}[order]
    x = torch.linspace(0.5, 1.5, B).unsqueeze(1)
    v, i = ops.topk_encode(x, w.unsqueeze(1), torch.zeros(F), k)
    rv, ri = R.topk_encode(x, w.unsqueeze(1), torch.zeros(F), k)
    assert torch.equal(i, ri) and torch.equal(v, rv)


@pytest.mark.parametrize("k", [1, 64, 300])
def test_topk_encode_select_random_rows_with_late_nan(k):
    """Random rows of 5000 features (the CPU selection's candidate buffer cut
    back many times, with the numbers-only order), repeated values, and rows
    where a NaN arrives only after many cuts (the NaN order from then on):
    the same values and indices as the reference, bit for bit."""
    F, B = 5000, 6
    g = torch.Generator().manual_seed(12)
    bias = torch.randn(B, F, generator=g)
    bias[1] = torch.round(bias[1] * 4) / 4  # many equal values
    bias[2, 4000] = float("nan")
    bias[3, [2500, 4999]] = float("nan")
    bias[4, ::7] = float("nan")
    x, w = torch.zeros(1, 1), torch.zeros(F, 1)
    for r in range(B):
        v, i = ops.topk_encode(x, w, bias[r], k)
        rv, ri = R.topk_encode(x, w, bias[r], k)
        assert torch.equal(i, ri), r
        torch.testing.assert_close(v, rv, equal_nan=True, rtol=0, atol=0)


# --------------------------------------------------------------------------- fm_interaction
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("repeats", [False, True])
def test_fm_interaction_matches_reference(device, dtype, shape, repeats):
    B, _, F, k, K = shape
    g = torch.Generator().manual_seed(6)
    values, indices = random_code(B, k, F, device, dtype, g, repeats=repeats)
    emb = torch.randn(F, K, generator=g, dtype=torch.float64).to(device, dtype)
    up = torch.randn(B, K, generator=g, dtype=torch.float64).to(device, dtype)
    out, gr = grads(ops.fm_interaction, [leaf(values), indices, leaf(emb)], up)
    ref, rgr = grads(R.fm_interaction, [leaf(values), indices, leaf(emb)], up)
    torch.testing.assert_close(out, ref, **tol(dtype))
    assert_close_all(gr, rgr, dtype)


def test_fm_interaction_gradcheck():
    g = torch.Generator().manual_seed(7)
    values, indices = random_code(3, 4, 7, "cpu", torch.float64, g, repeats=True)
    emb = torch.randn(7, 5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v, e: ops.fm_interaction(v, indices, e), (leaf(values), leaf(emb)))


# --------------------------------------------------------------------------- integration_mlp
def mlp_inputs(B, K, H, d, device, dtype, seed=8):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device, dtype)  # noqa: E731
    return mk(B, K), mk(H, K), mk(H), mk(d, H), mk(d)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B", [0, 1, 9])
@pytest.mark.parametrize("mode", ["eval", "dropout", "drop_all"])
def test_integration_mlp_matches_reference(device, dtype, B, mode):
    K, H, d = 6, 5, 7
    inputs = mlp_inputs(B, K, H, d, device, dtype)
    rate, training = {"eval": (0.15, False), "dropout": (0.3, True), "drop_all": (1.0, True)}[mode]
    mask = (torch.rand(B, K, generator=torch.Generator().manual_seed(9)) >= rate).to(device)
    up = torch.randn(B, d, dtype=torch.float64).to(device, dtype)
    out, gr = grads(lambda *a: ops.integration_mlp(*a, rate, training, mask=mask), [leaf(t) for t in inputs], up)
    ref, rgr = grads(lambda *a: R.integration_mlp(*a, rate, training, mask=mask), [leaf(t) for t in inputs], up)
    torch.testing.assert_close(out, ref, **tol(dtype))
    assert_close_all(gr, rgr, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["eval", "dropout", "drop_all"])
def test_integration_mlp_keeps_nan_as_torch(device, mode):
    """relu(NaN) = NaN, a dropped NaN or Inf is NaN (x * 0) and a rate of 1
    gives zeros, as the reference: a NaN reaches the loss instead of
    vanishing. NaN in p at a dropped and at a kept entry, and in b1."""
    B, K, H, d = 4, 6, 5, 3
    p, w1, b1, w2, b2 = mlp_inputs(B, K, H, d, device, torch.float32)
    rate, training = {"eval": (0.0, False), "dropout": (0.5, True), "drop_all": (1.0, True)}[mode]
    mask = torch.ones(B, K, dtype=torch.bool, device=device)
    mask[0, 1] = mask[1, 2] = False
    p[0, 1] = float("nan")   # dropped
    p[1, 2] = float("inf")   # dropped: inf * 0 = NaN
    p[2, 3] = float("nan")   # kept
    b1_nan = b1.clone()
    b1_nan[4] = float("nan")  # one hidden unit NaN for every row
    up = torch.randn(B, d, generator=torch.Generator().manual_seed(3)).to(device)
    for bias1 in (b1, b1_nan):
        ins = [p, w1, bias1, w2, b2]
        out, gr = grads(lambda *a: ops.integration_mlp(*a, rate, training, mask=mask), [leaf(t) for t in ins], up)
        ref, rgr = grads(lambda *a: R.integration_mlp(*a, rate, training, mask=mask), [leaf(t) for t in ins], up)
        assert out.isnan().any() or mode == "drop_all"
        torch.testing.assert_close(out, ref, equal_nan=True, **tol(torch.float32))
        for a, e in zip(gr, rgr):
            e = torch.zeros_like(a) if e is None else e  # rate 1: p does not reach the reference's output
            torch.testing.assert_close(a, e, equal_nan=True, **tol(torch.float32))


def test_integration_mlp_seeded_mask_matches_reference():
    inputs = mlp_inputs(6, 4, 3, 5, "cpu", torch.float32)
    torch.manual_seed(123)
    a = ops.integration_mlp(*inputs, 0.5, True)
    torch.manual_seed(123)
    b = R.integration_mlp(*inputs, 0.5, True)
    torch.testing.assert_close(a, b)


def test_integration_mlp_hidden_gradient():
    inputs = [leaf(t) for t in mlp_inputs(4, 3, 5, 2, "cpu", torch.float64)]

    def f(*a):
        out, hidden = ops.integration_mlp_with_hidden(*a)
        return out.sum() + (hidden**2).sum()

    def fr(p, w1, b1, w2, b2):
        hidden = p @ w1.T + b1
        return (torch.relu(hidden) @ w2.T + b2).sum() + (hidden**2).sum()

    g1 = torch.autograd.grad(f(*inputs), inputs)
    g2 = torch.autograd.grad(fr(*inputs), inputs)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_integration_mlp_gradcheck():
    inputs = [leaf(t) for t in mlp_inputs(5, 4, 3, 6, "cpu", torch.float64)]
    mask = torch.rand(5, 4, generator=torch.Generator().manual_seed(1)) >= 0.25
    assert torch.autograd.gradcheck(lambda *a: ops.integration_mlp(*a, 0.25, True, mask=mask), inputs)


# --------------------------------------------------------------------------- topn_reselect
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_topn_reselect_matches_reference(device, n):
    g = torch.Generator().manual_seed(10)
    values = torch.randint(0, 4, (6, 8), generator=g).double().to(device)  # many ties
    indices = torch.stack([torch.randperm(50, generator=g)[:8] for _ in range(6)]).to(device)
    v, i = ops.topn_reselect(leaf(values), indices, n)
    rv, ri = R.topn_reselect(values, indices, n)
    assert torch.equal(v, rv) and torch.equal(i, ri)
    vl = leaf(values)
    up = torch.randn(6, n, dtype=torch.float64).to(device)
    (gv,) = torch.autograd.grad(ops.topn_reselect(vl, indices, n)[0], vl, up)
    vr = leaf(values)
    (rgv,) = torch.autograd.grad(R.topn_reselect(vr, indices, n)[0], vr, up)
    torch.testing.assert_close(gv, rgv)


def test_topn_reselect_gradcheck():
    values = torch.randn(4, 6, dtype=torch.float64)
    indices = torch.arange(24).reshape(4, 6)
    assert torch.autograd.gradcheck(lambda v: ops.topn_reselect(v, indices, 3)[0], (leaf(values),))


# --------------------------------------------------------------------------- bfloat16 / half
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.cuda)])
def test_low_precision_accumulates_in_float32(device, dtype):
    g = torch.Generator().manual_seed(11)
    B, d, F, k, K = 16, 64, 200, 16, 8
    values, indices = random_code(B, k, F, device, torch.float32, g)
    weight = torch.randn(F, d, generator=g).to(device)
    emb = torch.randn(F, K, generator=g).to(device)
    lo = lambda t: t.to(dtype)  # noqa: E731
    ref = R.sparse_decode(lo(values).float(), indices, lo(weight).float())
    torch.testing.assert_close(ops.sparse_decode(lo(values), indices, lo(weight)).float(), ref, **tol(dtype))
    ref = R.fm_interaction(lo(values).float(), indices, lo(emb).float())
    torch.testing.assert_close(ops.fm_interaction(lo(values), indices, lo(emb)).float(), ref, **tol(dtype))
    # topk: well separated pre-activations, so rounding cannot reorder them
    x = torch.eye(d, device=device)[:B]
    w = torch.zeros(F, d, device=device)
    w[torch.arange(F), torch.arange(F) % d] = torch.linspace(1, 4, F, device=device)
    v, i = ops.topk_encode(lo(x), lo(w), lo(torch.zeros(F, device=device)), 3)
    rv, ri = R.topk_encode(x, w, torch.zeros(F, device=device), 3)
    assert torch.equal(i, ri)
    torch.testing.assert_close(v.float(), rv, **tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.cuda)])
def test_low_precision_topk_indices_within_rounding_rule(device, dtype):
    """16-bit topk_encode rounds x @ W.T + b once (CUDA: addmm; CPU: the
    GEMM's rounding, then the bias added in float32) where the reference
    rounds the GEMM and then the sum. The documented rule: the selected set
    equals the reference's unless the reference's k-th and (k+1)-th values lie
    within one rounding (eps * |value|) of each other; a row's order is the
    reference's up to its first two neighbours within one rounding; every value is the reference's pre-activation at its index
    within one rounding and no selected feature falls more than one rounding
    below the reference's k-th value."""
    g = torch.Generator().manual_seed(51)
    B, d, F, k = 96, 32, 300, 20
    lo = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    x = lo(torch.randn(B, d, generator=g))
    w = lo(torch.randn(F, d, generator=g) / 4)
    b = lo(torch.randn(F, generator=g) / 4 + 2)
    v, i = ops.topk_encode(x, w, b, k)
    z = torch.relu(x @ w.T + b)  # the reference's pre-activations: two roundings
    zs, order = torch.sort(z, dim=1, descending=True, stable=True)
    eps = torch.finfo(dtype).eps
    zf, zsf, vf = z.float().cpu(), zs.float().cpu(), v.float().cpu()
    i, order = i.cpu(), order.cpu()
    exempt = identical = 0
    for r in range(B):
        kth, nxt = zsf[r, k - 1], zsf[r, k]
        gap = eps * max(kth.abs(), nxt.abs())
        at = zf[r, i[r]]
        assert ((vf[r] - at).abs() <= eps * at.abs()).all(), r
        assert (at >= kth - gap).all(), r
        assert (vf[r][:-1] >= vf[r][1:]).all(), r  # sorted descending
        if kth - nxt > gap:
            assert set(i[r].tolist()) == set(order[r, :k].tolist()), r
        else:
            exempt += 1
        # before the first step of one rounding or less, the order is the reference's
        near = (zsf[r, :k] - zsf[r, 1:k + 1] <= eps * zsf[r, :k].abs()).nonzero()
        p = int(near[0]) if len(near) else k
        assert torch.equal(i[r, :p], order[r, :p]), r
        identical += p
    assert exempt < B and identical > B  # the rule leaves entries to check


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, pytest.param(torch.float16, marks=pytest.mark.cuda)])
def test_low_precision_gradients(device, dtype, strategy):
    """sparse_decode's and topk_encode's gradients in 16 bits, gather and dense
    forms, against the float32 reference on the same rounded inputs."""
    g = torch.Generator().manual_seed(15)
    B, d, F, k = 12, 32, 150, 10
    lo = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    values, indices = random_code(B, k, F, device, dtype, g, repeats=True)
    weight = lo(torch.randn(F, d, generator=g) / 4)
    up = lo(torch.randn(B, d, generator=g))
    mine = grads(ops.sparse_decode, [leaf(values), indices, leaf(weight)], up)[1]
    ref = grads(R.sparse_decode, [leaf(values.float()), indices, leaf(weight.float())], up.float())[1]
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.float(), b, atol=0.1, rtol=0.05)
    # topk_encode: well separated pre-activations, so rounding cannot reorder them
    x = torch.eye(d, device=device)[:B]
    w = torch.zeros(F, d, device=device)
    w[torch.arange(F), torch.arange(F) % d] = torch.linspace(1, 4, F, device=device)
    bias = torch.zeros(F, device=device)
    upk = torch.randn(B, 3, generator=g).to(device)
    mine = grads(lambda a, b, c: ops.topk_encode(a, b, c, 3), [leaf(lo(x)), leaf(lo(w)), leaf(lo(bias))], lo(upk))[1]
    ref = grads(lambda a, b, c: R.topk_encode(a, b, c, 3), [leaf(x), leaf(w), leaf(bias)], upk)[1]
    for a, b in zip(mine, ref):
        torch.testing.assert_close(a.float(), b, atol=0.05, rtol=0.02)


# --------------------------------------------------------------------------- opcheck
def opcheck_cases(device):
    g = torch.Generator().manual_seed(12)
    f64 = dict(dtype=torch.float64)
    r = lambda *s: torch.randn(*s, generator=g, **f64).to(device).requires_grad_(True)  # noqa: E731
    values = r(4, 3)
    indices = torch.randint(0, 9, (4, 3), generator=g).to(device)
    mask = (torch.rand(4, 5, generator=g) > 0.2).to(device)
    return [
        ("sparse_decode", (values, indices, r(9, 6), r(6))),
        ("sparse_decode", (values, indices, r(9, 6), None)),
        ("topk_encode", (r(4, 6), r(9, 6), r(9), 3, None)),
        ("topk_encode", (r(4, 6), r(9, 6), r(9), 3, r(6))),
        ("fm_interaction", (values, indices, r(9, 5))),
        ("sparse_decode", (values, indices, r(9, 6), r(6), False)),  # check_indices=False
        ("fm_interaction", (values, indices, r(9, 5), False)),
        ("integration_mlp", (r(4, 5), r(7, 5), r(7), r(6, 7), r(6), mask, 1.25)),
        ("integration_mlp", (r(4, 5), r(7, 5), r(7), r(6, 7), r(6), None, 1.0)),
        ("topn_reselect", (values, indices, 2)),
        ("dense_code", (values, indices, 9)),
        ("dense_code", (values, indices, 9, False)),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(12))
def test_opcheck(device, case, strategy):
    name, args = opcheck_cases(device)[case]
    if strategy == "dense" and name not in ("sparse_decode", "topk_encode"):
        pytest.skip("only sparse_decode and topk_encode have a dense form")
    if device == "cuda" and name == "topk_encode":
        args = tuple(a.float() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(getattr(torch.ops.dualenc_fast, name).default, args)


# --------------------------------------------------------------------------- torch.compile
class TinyJoint(torch.nn.Module):
    def __init__(self, d=8, F=32, k=4, K=6, H=6):
        super().__init__()
        g = torch.Generator().manual_seed(13)
        p = lambda *s: torch.nn.Parameter(0.3 * torch.randn(*s, generator=g))  # noqa: E731
        self.k = k
        self.w_enc, self.b_enc, self.w_dec = p(F, d), p(F), p(F, d)
        self.w_lin, self.b_lin, self.emb = p(F, d), p(d), p(F, K)
        self.w1, self.b1, self.w2, self.b2 = p(H, K), p(H), p(d, H), p(d)

    def forward(self, x, f):
        v, i = f.topk_encode(x, self.w_enc, self.b_enc, self.k)
        vn, i_n = f.topn_reselect(v, i, self.k - 1)
        recon = f.sparse_decode(v, i, self.w_dec) + f.sparse_decode(vn, i_n, self.w_lin, self.b_lin)
        return recon + f.integration_mlp(f.fm_interaction(vn, i_n, self.emb), self.w1, self.b1, self.w2, self.b2)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = TinyJoint()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(14))
    compiled = torch.compile(lambda x: model(x, ops), fullgraph=True)
    out = compiled(x)
    eager = model(x, ops)
    ref = model(x, R)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(eager, ref, atol=1e-5, rtol=1e-5)
    g_c = torch.autograd.grad(out.sum(), list(model.parameters()))
    g_r = torch.autograd.grad(ref.sum(), list(model.parameters()))
    for a, b in zip(g_c, g_r):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- bad input
def bad_cases():
    v = torch.randn(4, 3)
    i = torch.randint(0, 9, (4, 3))
    W = torch.randn(9, 6)
    x = torch.randn(4, 6)
    b = torch.randn(9)
    E = torch.randn(9, 5)
    return [
        (lambda: ops.sparse_decode(v, i.int(), W), TypeError, r"'indices' must be an int64 tensor, got .*Int"),
        (lambda: ops.sparse_decode(v, i.float(), W), TypeError, r"'indices' must be an int64 tensor, got .*Float"),
        (lambda: ops.sparse_decode(v, i + 20, W), IndexError, r"'indices' must hold feature indices in \[0, 9\).*got values in \[2\d, 2\d\]"),
        (lambda: ops.sparse_decode(v, -i - 1, W), IndexError, r"'indices'.*got values in \[-9"),
        (lambda: ops.sparse_decode(v, i[:, :2], W), ValueError, r"'indices' must have the shape of 'values'.*\[4, 2\]"),
        (lambda: ops.sparse_decode(v, i, W, torch.randn(5)), ValueError, r"'bias' dim 0 must equal weight.shape\[1\] \(d\) = 6, got .*\[5\]"),
        (lambda: ops.sparse_decode(v.double(), i, W), TypeError, r"'weight' must have the dtype of 'values'"),
        (lambda: ops.sparse_decode(v[0], i, W), ValueError, r"'values' must have shape \[B, k\].*got .*\[3\]"),
        (lambda: ops.sparse_decode(v.long(), i, W), TypeError, r"'values' must be a floating-point tensor"),
        (lambda: ops.topk_encode(x, W, b, 0), ValueError, r"'k' must satisfy 0 < k <= F = 9, got k = 0"),
        (lambda: ops.topk_encode(x, W, b, 10), ValueError, r"'k' must satisfy 0 < k <= F = 9, got k = 10"),
        (lambda: ops.topk_encode(x, W, b, -3), ValueError, r"got k = -3"),
        (lambda: ops.topk_encode(x, W, b, 2.5), TypeError, r"'k' must be an int, got float 2.5"),
        (lambda: ops.topk_encode(x[:, :5], W, b, 2), ValueError, r"'weight' dim 1 must equal x.shape\[1\] \(d\) = 5"),
        (lambda: ops.topk_encode(x, W, b[:4], 2), ValueError, r"'bias' dim 0 must equal weight.shape\[0\] \(F\) = 9"),
        (lambda: ops.topk_encode(x.unsqueeze(0), W, b, 2), ValueError, r"'x' must have shape \[B, d\]"),
        (lambda: ops.topk_encode(x, W, b, 2, pre_bias=torch.randn(3)), ValueError, r"'pre_bias' dim 0"),
        (lambda: ops.fm_interaction(v, i + 9, E), IndexError, r"'indices'.*\[0, 9\)"),
        (lambda: ops.fm_interaction(v, i, E.half()), TypeError, r"'embeddings' must have the dtype of 'values'"),
        (lambda: ops.integration_mlp(torch.randn(4, 5), torch.randn(7, 4), torch.randn(7), torch.randn(6, 7), torch.randn(6)), ValueError, r"'w1' dim 1 must equal p.shape\[1\] \(K\) = 5"),
        (lambda: ops.integration_mlp(torch.randn(4, 5), torch.randn(7, 5), torch.randn(7), torch.randn(6, 7), torch.randn(6), 0.5, True, mask=torch.ones(4, 5)), TypeError, r"'mask' must be a bool keep-mask"),
        (lambda: ops.integration_mlp(torch.randn(4, 5), torch.randn(7, 5), torch.randn(7), torch.randn(6, 7), torch.randn(6), 1.5, True), ValueError, r"'dropout_p' must lie in \[0, 1\], got 1.5"),
        (lambda: ops.topn_reselect(v, i, 4), ValueError, r"'n' must satisfy 0 < n <= k = 3, got n = 4"),
        (lambda: ops.topn_reselect(v, i, 0), ValueError, r"got n = 0"),
        (lambda: ops.dense_code(v, i, 0), ValueError, r"'num_features' must be >= 1, got 0"),
        (lambda: ops.dense_code(v, i, 5), IndexError, r"'indices' must hold feature indices in \[0, 5\)"),
        (lambda: ops.dense_code(v, i, 9.0), TypeError, r"'num_features' must be an int, got float"),
        (lambda: ops.dense_code(v, i[:, :2], 9), ValueError, r"'indices' must have the shape of 'values'"),
        (lambda: ops.set_buffer_cache_limit(-1), ValueError, r"'max_bytes' must be an int >= 0, got -1"),
    ]


@pytest.mark.parametrize("case", range(len(bad_cases())))
def test_bad_input_raises_naming_argument(case):
    fn, exc, pattern = bad_cases()[case]
    with pytest.raises(exc, match=pattern):
        fn()


@pytest.mark.cuda
def test_device_mismatch_raises():
    v = torch.randn(4, 3, device="cuda")
    i = torch.randint(0, 9, (4, 3), device="cuda")
    with pytest.raises(ValueError, match=r"'weight' must be on the device of 'values'"):
        ops.sparse_decode(v, i, torch.randn(9, 6))
    with pytest.raises(ValueError, match=r"'indices' must be on the device of 'values'"):
        ops.sparse_decode(v, i.cpu(), torch.randn(9, 6, device="cuda"))


# --------------------------------------------------------------------------- gather or dense
@pytest.mark.parametrize("device", DEVICES)
def test_dense_blocks_match_gather(device):
    """The dense form works through the batch in row blocks; blocks of 1 and 3
    rows give what the gather form gives, forward and every gradient."""
    g = torch.Generator().manual_seed(21)
    values, indices = random_code(10, 4, 23, device, torch.float64, g, repeats=True)
    x = torch.randn(10, 6, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(23, 6, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(23, generator=g, dtype=torch.float64).to(device)
    bias = torch.randn(6, generator=g, dtype=torch.float64).to(device)
    up = torch.randn(10, 6, generator=g, dtype=torch.float64).to(device)

    def run():
        ins = [leaf(values), leaf(w), leaf(bias), leaf(x), leaf(b)]
        out = ops.sparse_decode(ins[0], indices, ins[1], ins[2])
        v, _ = ops.topk_encode(ins[3], ins[1], ins[4], 4)
        loss = (out * up).sum() + (v * v).sum()
        return [out, v] + list(torch.autograd.grad(loss, ins))

    with ops.sparse_strategy_scope("gather"):
        want = run()
    for block in (1, 3 * 23 * 8):  # 1 row per block; 3 rows per block
        with ops.sparse_strategy_scope("dense", dense_block_bytes=block):
            got = run()
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, **tol(torch.float64))


def test_dense_weight_gradients_sum_blocks_in_float32():
    """bf16 weight gradients over many dense row blocks (one row each) are
    summed in float32 and rounded once: against float64 on the same rounded
    inputs they stay within a few bf16 roundings (a bf16 running sum of 512
    positive terms stalls once its spacing exceeds the terms)."""
    g = torch.Generator().manual_seed(31)
    B, d, F = 512, 4, 8
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    values = bf(1 + torch.rand(B, F, generator=g))
    indices = torch.arange(F).repeat(B, 1)  # every row hits every feature
    weight = bf(torch.rand(F, d, generator=g))
    up = bf(1 + torch.rand(B, d, generator=g))
    x = bf(torch.rand(B, d, generator=g))
    bias = bf(torch.full((F,), 4.0))  # every pre-activation positive: all F selected
    upk = bf(1 + torch.rand(B, F, generator=g))
    f64 = lambda t: leaf(t.double())  # noqa: E731

    def rel_err(a, e):
        return ((a.double() - e).abs().max() / e.abs().max()).item()

    with ops.sparse_strategy_scope("dense", dense_block_bytes=1):
        gw = grads(ops.sparse_decode, [values, indices, leaf(weight)], up)[1][0]
        ew = grads(R.sparse_decode, [values.double(), indices, f64(weight)], up.double())[1][0]
        assert rel_err(gw, ew) < 1e-2
        _, (gwe, gbe) = grads(lambda w, b: ops.topk_encode(x, w, b, F)[0], [leaf(weight), leaf(bias)], upk)
        _, (ewe, ebe) = grads(lambda w, b: R.topk_encode(x.double(), w, b, F)[0], [f64(weight), f64(bias)],
                              upk.double())
        assert rel_err(gwe, ewe) < 1e-2
        assert rel_err(gbe, ebe) < 1e-2


def test_backward_uses_the_form_its_forward_recorded():
    """The strategy is process-wide; a backward that runs after the
    sparse_strategy_scope of its forward has ended (here: with another form
    forced) takes the form (and block size) its forward recorded."""
    g = torch.Generator().manual_seed(32)
    values, indices = random_code(6, 3, 20, "cpu", torch.float64, g)
    w = torch.randn(20, 5, generator=g, dtype=torch.float64)
    x = torch.randn(6, 5, generator=g, dtype=torch.float64)
    b = torch.randn(20, generator=g, dtype=torch.float64)
    up = torch.randn(6, 5, generator=g, dtype=torch.float64)

    def forward():
        ins = [leaf(values), leaf(w), leaf(x), leaf(b)]
        out = ops.sparse_decode(ins[0], indices, ins[1])
        v, _ = ops.topk_encode(ins[2], ins[1], ins[3], 3)
        return ins, (out * up).sum() + (v * v).sum()

    def backward(ins, loss):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = torch.autograd.grad(loss, ins)
        names = [e.name for e in prof.events()]
        return got, names

    with ops.sparse_strategy_scope("gather"):
        ins, loss = forward()
        want = torch.autograd.grad(loss, ins)
    for fwd, bwd in (("dense", "gather"), ("gather", "dense")):
        with ops.sparse_strategy_scope(fwd, dense_block_bytes=2 * 20 * 8):  # 2 rows per block
            ins, loss = forward()
        with ops.sparse_strategy_scope(bwd, dense_block_bytes=1 << 30):
            got, names = backward(ins, loss)
        ran_dense = any("scatter_add" in n for n in names)
        assert ran_dense == (fwd == "dense"), (fwd, bwd)
        if fwd == "dense":  # 3 row blocks of the 6 rows in each of the two backward ops
            assert sum("scatter_add" in n for n in names) == 2 * 3
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, **tol(torch.float64))
    # the backward ops check the recorded form
    with pytest.raises(ValueError, match="'sparse_form' must be -1"):
        torch.ops.dualenc_fast.sparse_decode_backward(up, values, indices, w, True, True, True, -2)


def _ran_dense(fn) -> bool:
    """Whether the op scattered its code into a dense block (profiled ATen calls)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any("scatter_add" in e.name for e in prof.events())


def test_auto_strategy_follows_density():
    before = ops.sparse_strategy()
    g = torch.Generator().manual_seed(22)
    w = torch.randn(40, 5, generator=g)
    sparse_code = random_code(3, 2, 40, "cpu", torch.float32, g)  # density 5%
    dense_code = random_code(3, 8, 40, "cpu", torch.float32, g)   # density 20%

    def dense(code):
        ran = _ran_dense(lambda: ops.sparse_decode(*code, w))
        assert ops.uses_dense_path(code[0], 40) == ran  # the query tells what the op does
        return ran

    with ops.sparse_strategy_scope("auto", cpu_min_density=0.10):
        assert not dense(sparse_code)
        assert dense(dense_code)
        ops.set_sparse_strategy(cpu_min_density=0.01)
        assert dense(sparse_code)
        ops.set_sparse_strategy("gather")
        assert not dense(dense_code)
        ops.set_sparse_strategy("dense")
        assert dense(sparse_code)
        assert ops.sparse_strategy()["cpu_min_density"] == 0.01
        # a CUDA decision needs no device: 16-bit dtypes use the tensor-core threshold
        ops.set_sparse_strategy("auto", cuda_min_density=0.01, cuda_fp32_min_density=0.05)
        assert ops._ext._C.use_dense_path(False, True, False, 4096, 1024, 50000)       # bf16, 2%
        assert not ops._ext._C.use_dense_path(False, False, False, 4096, 1024, 50000)  # float64, 2%
        assert not ops._ext._C.use_dense_path(True, False, True, 0, 8, 40)             # B = 0
    assert ops.sparse_strategy() == before  # the scope puts back what it found


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_sparse_decode_tiled_cuda(dtype):
    """The tiled CUDA forward, forced on: against the reference and the gather
    form, run to run bitwise, at awkward shapes (B past one tile of 256 rows,
    several feature chunks, d = 1, 33, 65, 300, k = F, repeats, weight rows off
    a 16-byte boundary); autograd through it takes the recorded form."""
    g = torch.Generator().manual_seed(9)
    t = tol(dtype) if dtype in (torch.float32, torch.float64) else dict(atol=8e-2, rtol=5e-2)
    for B, d, F, k, repeats in [(300, 65, 400, 37, False), (5, 1, 50, 1, False), (4, 33, 200, 200, False),
                                (260, 300, 450, 9, True), (513, 64, 1000, 40, False), (3, 64, 7, 40, True)]:
        values, indices = random_code(B, k, F, "cuda", dtype, g, repeats=repeats)
        for offset in (0, 1):
            base = torch.randn(F * d + offset, generator=g, dtype=torch.float64).to("cuda", dtype)
            weight = base[offset:].view(F, d)
            bias = torch.randn(d, generator=g, dtype=torch.float64).to("cuda", dtype)
            with ops.sparse_strategy_scope("auto", tiled="on"):
                out = ops.sparse_decode(values, indices, weight, bias)
                again = ops.sparse_decode(values, indices, weight, bias)
            with ops.sparse_strategy_scope("gather", tiled="off"):
                gathered = ops.sparse_decode(values, indices, weight, bias)
            ref = R.sparse_decode(values.double(), indices, weight.double(), bias.double())
            scale = max(1.0, k ** 0.5)
            torch.testing.assert_close(out.double(), ref, atol=t["atol"] * scale, rtol=t["rtol"])
            torch.testing.assert_close(out.double(), gathered.double(), atol=t["atol"] * scale, rtol=t["rtol"])
            assert torch.equal(out, again)
    v, w = leaf(values), leaf(weight)
    with ops.sparse_strategy_scope("gather", tiled="on"):
        out = ops.sparse_decode(v, indices, w)
    gv, gw = torch.autograd.grad(out, (v, w), torch.ones_like(out))
    with ops.sparse_strategy_scope("gather", tiled="off"):
        out2 = ops.sparse_decode(v, indices, w)
    gv2, gw2 = torch.autograd.grad(out2, (v, w), torch.ones_like(out2))
    assert torch.equal(gv, gv2) and torch.equal(gw, gw2)


def test_tiled_forward_rule():
    """The selection of sparse_decode's batch-tiled CUDA forward (strategy.h):
    host logic, no device needed. Reuse k * min(B, 256) / F >= tiled_min_reuse
    and density below the bound for the dtype's GEMM; never on the CPU; "on"
    and "off" force it; the recorded backward form ignores it."""
    before = ops.sparse_strategy()
    rule = ops._ext._C.use_tiled_forward  # (on_cpu, half_or_bf16, is_float32, B, k, F)
    P = (4096, 1024, 50000)
    # the defaults: P in 16-bit keeps the dense GEMM (2.05% >= 0.02), float32 P takes the tiled form
    assert before["tiled"] == "auto" and before["tiled_min_reuse"] == 2.0
    assert before["tiled_max_density"] == 0.02 and before["tiled_fp32_max_density"] == 0.25
    with ops.sparse_strategy_scope("auto", cuda_min_density=0.01, tiled="auto", tiled_min_reuse=2.0,
                                   tiled_max_density=0.03,
                                   tiled_fp32_max_density=0.25):
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            assert rule(False, True, False, *P)                       # bf16 at P: 2%, reuse 5.2
            assert rule(False, False, True, *P)                       # float32 (SIMT) at P
            assert not rule(True, True, False, *P)                    # never on the CPU
            assert not rule(False, True, False, 8192, 64, 65536)      # S: reuse 0.25
            assert not rule(False, True, False, 4096, 4096, 50000)    # bf16, 8%: the dense GEMM
            assert rule(False, False, True, 4096, 4096, 50000)        # float32 SIMT, 8%
            assert not rule(False, False, True, 4096, 16384, 50000)   # float32, 33%
            assert not rule(False, False, True, 4, 100, 1000)         # B = 4: reuse 0.4
            assert rule(False, False, True, 40, 100, 1000)            # B = 40: reuse 4
            assert not rule(False, False, True, 0, 100, 1000)         # B = 0
            assert not rule(False, True, False, 4096, 0, 50000)       # k = 0
            assert rule(False, False, False, *P)                      # float64: the SIMT bound
            ops.set_sparse_strategy(tiled_min_reuse=6.0)
            assert not rule(False, True, False, *P)
            ops.set_sparse_strategy(tiled_min_reuse=2.0, tiled_max_density=0.02)
            assert not rule(False, True, False, *P)
            ops.set_sparse_strategy(tiled_max_density=0.03)
            for mode in ("gather", "dense"):  # a forced form wins over auto
                ops.set_sparse_strategy(mode)
                assert not rule(False, True, False, *P)
            ops.set_sparse_strategy("gather", tiled="on")
            assert rule(False, True, False, *P) and rule(False, True, False, 8192, 64, 65536)
            assert not rule(True, True, False, *P)
            ops.set_sparse_strategy("auto", tiled="off")
            assert not rule(False, True, False, *P)
            # the form a forward records for its backward does not depend on it
            forms = set()
            for tiled in ("auto", "on", "off"):
                ops.set_sparse_strategy(tiled=tiled)
                forms.add(ops._ext._C.sparse_form(False, True, False, *P))
            assert forms == {ops.sparse_strategy()["dense_block_bytes"]}
            assert not ops.uses_tiled_forward(torch.zeros(4096, 1024), 50000)  # CPU tensors
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        assert ops.sparse_strategy()["tiled"] == "off"
    assert ops.sparse_strategy() == before
    with pytest.raises(ValueError, match=r"'tiled' must be one of .*got 'yes'"):
        ops.set_sparse_strategy(tiled="yes")
    with pytest.raises(ValueError, match=r"'tiled_min_reuse' must be a number >= 0, got -1.0"):
        ops.set_sparse_strategy(tiled_min_reuse=-1)
    assert ops.sparse_strategy() == before


def test_sparse_strategy_bad_arguments():
    before = ops.sparse_strategy()
    with pytest.raises(ValueError, match=r"'mode' must be one of .*got 'fast'"):
        ops.set_sparse_strategy("fast")
    with pytest.raises(ValueError, match=r"'cpu_min_density' must be a density >= 0, got -0.5"):
        ops.set_sparse_strategy(cpu_min_density=-0.5)
    with pytest.raises(ValueError, match=r"'cuda_min_density' must be a density >= 0, got nan"):
        ops.set_sparse_strategy(cuda_min_density=float("nan"))
    with pytest.raises(ValueError, match=r"'dense_block_bytes' must be an int >= 1, got 0"):
        ops.set_sparse_strategy(dense_block_bytes=0)
    assert ops.sparse_strategy() == before


def test_backward_ops_check_indices_when_called_directly():
    """Autograd passes check_indices=False (the forward checked); a direct call
    to a backward op still validates its indices."""
    v = torch.randn(4, 3)
    bad = torch.tensor([[0, 1, 9]] * 4)
    with pytest.raises(IndexError, match=r"'indices' must hold feature indices in \[0, 9\)"):
        torch.ops.dualenc_fast.sparse_decode_backward(torch.randn(4, 6), v, bad, torch.randn(9, 6), True, True)
    with pytest.raises(IndexError, match=r"'indices'.*got values in \[0, 9\]"):
        torch.ops.dualenc_fast.fm_interaction_backward(torch.randn(4, 5), v, bad, torch.randn(9, 5), True, True)
    with pytest.raises(IndexError, match=r"'indices'.*\[0, 9\)"):
        torch.ops.dualenc_fast.topk_encode_backward(
            torch.randn(4, 3), v, bad, torch.randn(4, 6), torch.randn(9, 6), None, True, True
        )


def test_index_checks_toggle():
    assert ops.index_checks()
    ops.set_index_checks(False)
    try:
        assert not ops.index_checks()
    finally:
        ops.set_index_checks(True)
    assert ops.index_checks()


def test_cuda_grid_sizes_are_checked():
    """Every CUDA launch takes its gridDim.x from checked_grid (csrc/ops/grid.h):
    sizes over 2^31 - 1 (or below 1) raise naming the kernel and the size
    instead of wrapping in a cast to unsigned."""
    check = ops._ext._C._checked_grid
    assert check(1, "k") == 1
    assert check(2**31 - 1, "k") == 2**31 - 1
    with pytest.raises(ValueError, match=r"kernel row_dot_kernel needs a grid of 2147483648 blocks"):
        check(2**31, "row_dot_kernel")
    with pytest.raises(ValueError, match=r"kernel gather_sum_kernel needs a grid of 0 blocks"):
        check(0, "gather_sum_kernel")
    check_y = ops._ext._C._checked_grid_y  # gridDim.y of the 2-D launches: at most 65535
    assert check_y(65535, "k") == 65535
    with pytest.raises(ValueError, match=r"kernel staged_rows_kernel needs 65536 blocks along gridDim.y"):
        check_y(65536, "staged_rows_kernel")
    # every launch site takes its grid from checked_grid (blocks_for: the
    # element-wise kernels' capped grid, itself checked)
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "ops" / "cuda"
    sources = {p.name: p.read_text() for p in sorted(root.glob("*.cu*"))}
    if not sources:
        pytest.skip("CUDA sources not present")
    assert "checked_grid(" in sources["integration_mlp_cuda.cu"].split("inline unsigned blocks_for", 1)[1][:300]
    launches = 0
    for name, text in sources.items():
        for m in re.finditer(r"<<<|DUALENC_LAUNCH\(", text):
            grid = text[m.end():].lstrip()
            if m.group(0) != "<<<":
                if grid.startswith("("):  # a kernel name in parentheses: (kernel<a, b>)
                    depth = 0
                    for i, ch in enumerate(grid):
                        depth += {"(": 1, ")": -1}.get(ch, 0)
                        if depth == 0:
                            grid = grid[i + 1:].lstrip()
                            break
                grid = grid.split(",", 1)[1].lstrip()  # DUALENC_LAUNCH(kernel, grid, ...)
            if grid.startswith("grid, block"):
                continue  # the macro's own definition
            if grid.startswith("grid,"):  # a 2-D grid declared just before, each dimension checked
                before = text[max(0, m.start() - 400):m.start()]
                assert re.search(r"const dim3 grid\(checked_grid\(.*\n?\s*(kDot \? 1u : )?checked_grid_y\(", before), \
                    (name, before[-200:])
                launches += 1
                continue
            assert grid.startswith(("checked_grid(", "blocks_for(")), (name, grid[:60])
            launches += 1
    assert launches >= 10


# --------------------------------------------------------------------------- dense_code
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("repeats", [False, True])
def test_dense_code_matches_reference(device, dtype, shape, repeats):
    B, _, F, k, _ = shape
    gen = torch.Generator().manual_seed(21)
    values, indices = random_code(B, k, F, device, dtype, gen, repeats)
    v = leaf(values)
    up = torch.randn(B, F, generator=gen, dtype=torch.float64).to(device, dtype)
    out, (gv,) = grads(lambda v: ops.dense_code(v, indices, F), (v,), up)
    ref, (rv,) = grads(lambda v: R.dense_code(v, indices, F), (leaf(values),), up)
    assert out.shape == (B, F) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **tol(dtype))
    torch.testing.assert_close(gv, rv, **tol(dtype))


def test_dense_code_gradcheck():
    gen = torch.Generator().manual_seed(22)
    values, indices = random_code(5, 4, 11, "cpu", torch.float64, gen, repeats=True)
    assert torch.autograd.gradcheck(lambda v: ops.dense_code(v, indices, 11), (leaf(values),))
    assert torch.autograd.gradgradcheck(lambda v: ops.dense_code(v, indices, 11), (leaf(values),))


def test_dense_code_large_rows_reuse_cached_memory_and_stay_exact():
    # [64, 8192] float32 = 2 MiB: above the cache's 1 MiB floor. A block that
    # comes back from the cache holds the previous code, which must not leak.
    gen = torch.Generator().manual_seed(23)
    ops.clear_buffer_cache()
    a_v, a_i = random_code(64, 16, 8192, "cpu", torch.float32, gen)
    b_v, b_i = random_code(64, 16, 8192, "cpu", torch.float32, gen)
    first = ops.dense_code(a_v, a_i, 8192)
    ptr = first.data_ptr()
    del first
    assert ops.buffer_cache_bytes() >= 64 * 8192 * 4
    second = ops.dense_code(b_v, b_i, 8192)
    assert second.data_ptr() == ptr  # the same block, reused
    torch.testing.assert_close(second, R.dense_code(b_v, b_i, 8192), rtol=0, atol=0)
    ops.clear_buffer_cache()


# --------------------------------------------------------------------------- buffer cache
def test_buffer_cache_serves_weight_gradients_exactly_and_can_be_turned_off():
    # W [1024, 256] float64 = 2 MiB: its gradient comes from the cache
    gen = torch.Generator().manual_seed(24)
    limit = ops.buffer_cache_limit()
    F, d = 1024, 256
    W = torch.randn(F, d, generator=gen, dtype=torch.float64).requires_grad_(True)
    x = torch.randn(16, d, generator=gen, dtype=torch.float64)
    b = torch.zeros(F, dtype=torch.float64, requires_grad=True)
    try:
        ops.clear_buffer_cache()
        for _ in range(3):
            v, i = ops.topk_encode(x, W, b, 8)
            out = ops.sparse_decode(v, i, W, check_indices=False)
            gw = torch.autograd.grad(out.square().sum(), W)[0]
            rv, ri = R.topk_encode(x, W, b, 8)
            ref = torch.autograd.grad(R.sparse_decode(rv, ri, W).square().sum(), W)[0]
            torch.testing.assert_close(gw, ref, **tol(torch.float64))
            del gw
        assert ops.buffer_cache_bytes() >= F * d * 8
        ops.set_buffer_cache_limit(0)
        assert ops.buffer_cache_limit() == 0 and ops.buffer_cache_bytes() == 0
        v, i = ops.topk_encode(x, W, b, 8)
        gw = torch.autograd.grad(ops.sparse_decode(v, i, W).sum(), W)[0]
        del gw
        assert ops.buffer_cache_bytes() == 0
    finally:
        ops.set_buffer_cache_limit(limit)
        ops.clear_buffer_cache()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("need", [(True, False), (False, True), (True, True)], ids=["v", "w", "vw"])
def test_sparse_decode_backward_each_gradient_alone(device, need, strategy):
    # the gather form computes both gradients in one feature-major pass when both are asked for
    gen = torch.Generator().manual_seed(25)
    values, indices = random_code(40, 7, 300, device, torch.float64, gen, repeats=True)
    W = torch.randn(300, 33, generator=gen, dtype=torch.float64).to(device)
    g = torch.randn(40, 33, generator=gen, dtype=torch.float64).to(device)
    gv, gw = torch.ops.dualenc_fast.sparse_decode_backward(g, values, indices, W, need[0], need[1])
    lv, lw = leaf(values), leaf(W)
    rv, rw = torch.autograd.grad(R.sparse_decode(lv, indices, lw), (lv, lw), g)
    if need[0]:
        torch.testing.assert_close(gv, rv, **tol(torch.float64))
    else:
        assert gv.numel() == 0
    if need[1]:
        torch.testing.assert_close(gw, rw, **tol(torch.float64))
    else:
        assert gw.numel() == 0


# ------------------------------------------------------------- feature-major passes at a larger shape
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("repeats", [False, True])
def test_feature_major_backward_larger_shape(device, dtype, repeats):
    """The weight-gradient passes over the code's CSR (prefetching the batch rows of
    later pairs, each pair's batch row stored beside it) at a shape past the small
    cases: 600 rows, a d of no special size, features firing in many rows; every
    gradient matches the reference, and twice the same bits."""
    B, d, F, k = 600, 300, 500, 8
    g = torch.Generator().manual_seed(5)
    values, indices = random_code(B, k, F, device, dtype, g, repeats=repeats)
    weight = torch.randn(F, d, generator=g, dtype=torch.float64).to(device, dtype)
    up = torch.randn(B, d, generator=g, dtype=torch.float64).to(device, dtype)
    with ops.sparse_strategy_scope("gather"):
        out, gr = grads(ops.sparse_decode, [leaf(values), indices, leaf(weight), None], up)
        _, gr2 = grads(ops.sparse_decode, [leaf(values), indices, leaf(weight), None], up)
    ref, rgr = grads(R.sparse_decode, [leaf(values), indices, leaf(weight), None], up)
    torch.testing.assert_close(out, ref, **tol(dtype))
    assert_close_all(gr, rgr, dtype)
    assert all(torch.equal(a, b) for a, b in zip(gr, gr2))

    x = torch.randn(B, d, generator=g, dtype=torch.float64).to(device, dtype)
    w_enc = torch.randn(F, d, generator=g, dtype=torch.float64).to(device, dtype)
    b_enc = torch.randn(F, generator=g, dtype=torch.float64).to(device, dtype)
    upv = torch.randn(B, k, generator=g, dtype=torch.float64).to(device, dtype)
    with ops.sparse_strategy_scope("gather"):
        wl, bl = leaf(w_enc), leaf(b_enc)
        vo, io = ops.topk_encode(x, wl, bl, k)
        egr = torch.autograd.grad(vo, [wl, bl], upv)
    wr, br = leaf(w_enc), leaf(b_enc)
    vr, ir = R.topk_encode(x, wr, br, k)
    assert torch.equal(io, ir)
    rgr = torch.autograd.grad(vr, [wr, br], upv)
    assert_close_all(egr, rgr, dtype)


_BLOCKED_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import dualenc_fast.ops as ops
import dualenc_fast.reference.functional as R
tol = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 1e-4), torch.bfloat16: (5e-2, 5e-2), torch.float16: (5e-3, 5e-3)}
torch.set_num_threads(2)
for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
    for d in (1, 63, 300, 700):
        g = torch.Generator().manual_seed(d)
        B, F, k = 90, 40, 5
        idx = torch.randint(0, F, (B, k), generator=g)
        v = torch.randn(B, k, generator=g, dtype=torch.float64).to(dt)  # no dvalues: scatter_rows alone
        W = torch.randn(F, d, generator=g, dtype=torch.float64).to(dt).requires_grad_()
        b = torch.randn(d, generator=g, dtype=torch.float64).to(dt)
        up = torch.randn(B, d, generator=g, dtype=torch.float64).to(dt)
        atol, rtol = tol[dt]
        with ops.sparse_strategy_scope("gather"):
            out = ops.sparse_decode(v, idx, W, b)
            (gw,) = torch.autograd.grad(out, [W], up)
        vr, Wr = v.double(), W.detach().double().requires_grad_()
        ref = R.sparse_decode(vr, idx, Wr, b.double())
        (rgw,) = torch.autograd.grad(ref, [Wr], up.double())
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol)
        torch.testing.assert_close(gw.double(), rgw, atol=atol, rtol=rtol)
        # both gradients in one feature-major pass: the same bits as each alone
        vg = v.clone().requires_grad_()
        with ops.sparse_strategy_scope("gather"):
            gv2, gw2 = torch.autograd.grad(ops.sparse_decode(vg, idx, W, b), [vg, W], up)
            (gv1,) = torch.autograd.grad(ops.sparse_decode(vg, idx, W.detach(), b), [vg], up)
        assert torch.equal(gv2, gv1) and torch.equal(gw2, gw), (dt, d)
        x = torch.randn(B, d, generator=g, dtype=torch.float64).to(dt)
        we = torch.randn(F, d, generator=g, dtype=torch.float64).to(dt).requires_grad_()
        be = torch.randn(F, generator=g, dtype=torch.float64).to(dt).requires_grad_()
        upv = torch.randn(B, k, generator=g, dtype=torch.float64).to(dt)
        with ops.sparse_strategy_scope("gather"):
            vo, io = ops.topk_encode(x, we, be, k)
            gwe, gbe = torch.autograd.grad(vo, [we, be], upv)  # scatter_rows with its sums
        # the reference's gradient for the same selection (a near-tie may pick differently in 16 bits)
        wr, br = we.detach().double().requires_grad_(), be.detach().double().requires_grad_()
        z = torch.relu(x.double() @ wr.t() + br).gather(1, io)
        rgwe, rgbe = torch.autograd.grad(z, [wr, br], upv.double())
        torch.testing.assert_close(gwe.double(), rgwe, atol=atol * 4, rtol=rtol * 4)
        torch.testing.assert_close(gbe.double(), rgbe, atol=atol * 4, rtol=rtol * 4)
        E = (0.3 * torch.randn(F, d, generator=g, dtype=torch.float64)).to(dt).requires_grad_()
        upk = torch.randn(B, d, generator=g, dtype=torch.float64).to(dt)
        (gE,) = torch.autograd.grad(ops.fm_interaction(v, idx, E), [E], upk)  # the grouped dE pass
        Er = E.detach().double().requires_grad_()
        (rgE,) = torch.autograd.grad(R.fm_interaction(v.double(), idx, Er), [Er], upk.double())
        torch.testing.assert_close(gE.double(), rgE, atol=atol * 4, rtol=rtol * 4)
        # sparse_weight_grads' one pass (three blocks of sums at once): the bits of the separate ops
        gl, pb = torch.randn(B, d, generator=g, dtype=torch.float64).to(dt), b
        gp = torch.ops.aten.threshold_backward(upv, vo, 0)
        n = 3
        with ops.sparse_strategy_scope("gather"):
            got = ops.sparse_weight_grads(io, vo, gp, up, gl, x, pb, F, n)
            Z = torch.zeros(F, d, dtype=dt)
            _, w1 = torch.ops.dualenc_fast.sparse_decode_backward(up, vo, io, Z, False, True)
            _, w2 = torch.ops.dualenc_fast.sparse_decode_backward(gl, vo[:, :n].contiguous(), io[:, :n].contiguous(), Z, False, True)
            _, w3, b3 = torch.ops.dualenc_fast.topk_encode_backward(upv, vo, io, x, Z, pb, False, True)
        for a_, b_ in zip(got, (w1, w2, w3, b3)):
            assert torch.equal(a_, b_), (dt, d)
print("ok")
"""


@pytest.mark.parametrize("narrow", ["0", "1"])
def test_register_blocked_loops_every_dtype(narrow, tmp_path):
    """The CPU gather, weight-gradient and FM dE loops keep a block of columns in
    registers (512 bytes of sums with 512-bit vectors, 256 otherwise,
    DUALENC_CPU_NARROW=1 forcing the latter): d below, between and above the
    block sizes of every dtype, against the reference, in a fresh process for
    each block size."""
    import os
    import subprocess
    import sys

    script = tmp_path / "blocked.py"
    script.write_text(_BLOCKED_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(ops.__file__)))
    env = dict(os.environ, DUALENC_CPU_NARROW=narrow)
    res = subprocess.run([sys.executable, str(script), root], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stdout + res.stderr


# --------------------------------------------------------------------------- shared transposes
def _joint_grads(model, x, share):
    ops.set_share_transposes(share)
    ops._shared_transpose_stats(reset=True)
    model.zero_grad(set_to_none=True)
    out = model.forward_sparse(x)
    (out.recon.float().pow(2).sum() + out.code.values.float().sum()).backward()
    stats = ops._shared_transpose_stats(reset=True)
    return stats, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_joint_step_builds_two_transposes_and_shares_them(device, dtype):
    """A joint step's backward walks the transpose of the code (decoder,
    encoder) and of its first N columns (NFM linear, FM): built once each and
    shared, with gradients bitwise those of a transpose per product."""
    from dualenc_fast.nn.modules import JointSAENFM

    torch.manual_seed(3)
    m = JointSAENFM(48, 300, 12, 8, top_n=5, backend="fused", dropout=0.0).to(device, dtype)
    x = torch.randn(37, 48, dtype=dtype, device=device)
    try:
        with ops.sparse_strategy_scope("gather"):
            shared, g1 = _joint_grads(m, x, True)
            alone, g0 = _joint_grads(m, x, False)
            again, g2 = _joint_grads(m, x, True)
    finally:
        ops.set_share_transposes(True)
    assert shared == (2, 2) and again == (2, 2)
    assert alone == (4, 0)
    assert g1.keys() == g0.keys() and len(g1) >= 8
    for name in g1:
        assert torch.equal(g1[name], g0[name]), name
        assert torch.equal(g2[name], g0[name]), name


def test_shared_transpose_only_for_the_same_code_view_and_version():
    """Reuse needs a code from topk_encode (marked), the same view and the
    same version: an in-place write, another view or a code made by hand is
    transposed afresh, and the gradients always match an unshared build."""
    torch.manual_seed(4)
    B, d, F, k = 9, 16, 40, 6
    x, w, b = torch.randn(B, d), torch.randn(F, d), torch.randn(F)
    ops.clear_buffer_cache()
    v, idx = ops.topk_encode(x, w, b, k)
    g = torch.randn(B, d)

    def dw(values, indices):
        return torch.ops.dualenc_fast.sparse_decode_backward(g, values, indices, w, False, True, False, 0)[1]

    ops._shared_transpose_stats(reset=True)
    first = dw(v, idx)
    assert ops._shared_transpose_stats() == (1, 0)
    assert torch.equal(dw(v, idx), first)
    assert ops._shared_transpose_stats() == (1, 1)
    # a view of the same code (its first columns) is its own transpose, then shared
    head = dw(v[:, :3], idx[:, :3])
    assert ops._shared_transpose_stats() == (2, 1)
    assert torch.equal(dw(v[:, :3], idx[:, :3]), head)
    assert ops._shared_transpose_stats() == (2, 2)
    # an in-place write gives a new version: transposed again, with the new code
    idx[0, 0] = (idx[0, 0] + 1) % F
    after = dw(v, idx)
    assert ops._shared_transpose_stats() == (3, 2)
    ops.set_share_transposes(False)
    try:
        assert torch.equal(after, dw(v, idx))
    finally:
        ops.set_share_transposes(True)
    # a code made by hand (not from topk_encode) is never shared
    ops._shared_transpose_stats(reset=True)
    own = idx.clone()
    dw(v, own), dw(v, own)
    assert ops._shared_transpose_stats() == (2, 0)
    # dropped with clear_buffer_cache (the marks too)
    ops.clear_buffer_cache()
    dw(v, idx)
    assert ops._shared_transpose_stats() == (3, 0)


def test_shared_transposes_switch_is_checked():
    with pytest.raises(TypeError, match="'enabled' must be a bool"):
        ops.set_share_transposes(1)
    assert ops.share_transposes() is True


def test_topn_reselect_codes_share_their_transpose_too():
    """The ops called directly, as the bench's fused path calls them: the top-N
    code from topn_reselect is transposed once for the NFM linear layer and
    the FM pooling."""
    torch.manual_seed(6)
    B, d, F, k, n, K = 21, 16, 50, 8, 3, 6
    x = torch.randn(B, d)
    w_enc, b_enc = torch.randn(F, d, requires_grad=True), torch.randn(F, requires_grad=True)
    w_dec, w_lin, emb = (torch.randn(F, c, requires_grad=True) for c in (d, d, K))
    with ops.sparse_strategy_scope("gather"):
        v, i = ops.topk_encode(x, w_enc, b_enc, k)
        vn, i_n = ops.topn_reselect(v, i, n)[:2]
        out = ops.sparse_decode(v, i, w_dec) + ops.sparse_decode(vn, i_n, w_lin)
        loss = out.pow(2).sum() + ops.fm_interaction(vn, i_n, emb).pow(2).sum()
        ops._shared_transpose_stats(reset=True)
        loss.backward()
    assert ops._shared_transpose_stats() == (2, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_dense_dvalues_in_feature_chunks(device, dtype):
    """The dense form's dvalues through feature chunks of g W^T read back via
    the transpose: the same values as the row-block form (bitwise on the CPU,
    whose GEMM rounds each entry alike), several chunks, repeated indices, an
    empty batch, and the setting checked."""
    g_ = torch.Generator().manual_seed(8)
    B, d, F, k = 7, 12, 4500, 300  # 2048-feature chunks: 3 of them
    v = torch.randn(B, k, generator=g_, dtype=torch.float64).to(device, dtype)
    idx = torch.randint(0, F, (B, k), generator=g_).to(device)  # repeats
    w = torch.randn(F, d, generator=g_, dtype=torch.float64).to(device, dtype)
    g = torch.randn(B, d, generator=g_, dtype=torch.float64).to(device, dtype)
    before = ops.dense_dv_block_bytes()
    try:
        ops.set_dense_dv_block_bytes(0)
        rows_form = torch.ops.dualenc_fast.sparse_decode_backward(g, v, idx, w, True, True, True, 1 << 20)
        ops.set_dense_dv_block_bytes(1)  # the 2048-feature minimum
        chunked = torch.ops.dualenc_fast.sparse_decode_backward(g, v, idx, w, True, True, True, 1 << 20)
        if device == "cpu":  # the same GEMM per entry; cuBLAS may pick other kernels per chunk width
            assert torch.equal(chunked[0], rows_form[0]) and torch.equal(chunked[1], rows_form[1])
        else:
            torch.testing.assert_close(chunked[0], rows_form[0])
            assert torch.equal(chunked[1], rows_form[1])
        ref = (g.double() @ w.double().T).gather(1, idx)
        tol = {torch.float64: dict(atol=1e-12, rtol=1e-12), torch.float32: dict(atol=1e-5, rtol=1e-4),
               torch.bfloat16: dict(atol=0.2, rtol=0.05)}[dtype]
        torch.testing.assert_close(chunked[0].double(), ref, **tol)
        empty = torch.ops.dualenc_fast.sparse_decode_backward(g[:0], v[:0], idx[:0], w, True, False, True, 1 << 20)
        assert empty[0].shape == (0, k)
        # a row block too small for even one chunk of 2048 features: the row-block form (no transpose)
        ops._shared_transpose_stats(reset=True)
        small = torch.ops.dualenc_fast.sparse_decode_backward(g, v, idx, w, True, False, True, 1000)[0]
        assert ops._shared_transpose_stats() == (0, 0)
        torch.testing.assert_close(small, chunked[0])
        torch.ops.dualenc_fast.sparse_decode_backward(g, v, idx, w, True, False, True, 1 << 20)
        assert ops._shared_transpose_stats()[0] == 1
    finally:
        ops.set_dense_dv_block_bytes(before)
    with pytest.raises(ValueError, match="'nbytes' must be an int >= 0"):
        ops.set_dense_dv_block_bytes(-1)


# --------------------------------------------------------------------------- sparse_weight_grads
WG_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def wg_inputs(B, d, F, k, dtype, seed, repeats=False, device="cpu"):
    """A code with rows sorted by value (as topk_encode gives) and every input
    of sparse_weight_grads; grad_values is the encoder's upstream before the
    ReLU mask, grad_pre the masked one (a third of the values are <= 0)."""
    g = torch.Generator().manual_seed(seed)
    values, indices = random_code(B, k, F, device, torch.float64, g, repeats)
    values[::3] = -values[::3].abs()
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    indices = indices.gather(1, order)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    grad_values = r(B, k)
    values = values.to(dtype)
    grad_pre = torch.ops.aten.threshold_backward(grad_values, values, 0)
    return dict(indices=indices, values=values, grad_pre=grad_pre, grad_dec=r(B, d), grad_lin=r(B, d), x=r(B, d),
                pre_bias=r(d)), grad_values


def wg_call(c, F, n, **kw):
    return ops.sparse_weight_grads(c["indices"], c["values"], c["grad_pre"], c["grad_dec"], c["grad_lin"], c["x"],
                                   c["pre_bias"], F, n, **kw)


def wg_existing(c, grad_values, F, n, form=-1):
    """What the three separate ops give: sparse_decode_backward's dW on the code
    and on its first n columns, topk_encode_backward's dW and db."""
    v, idx, d = c["values"], c["indices"], c["grad_dec"].shape[1]
    W = v.new_zeros(F, d)
    _, dec = _dualenc.sparse_decode_backward(c["grad_dec"], v, idx, W, False, True, True, form)
    if n > 0:
        _, lin = _dualenc.sparse_decode_backward(c["grad_lin"], v[:, :n].contiguous(), idx[:, :n].contiguous(), W,
                                                 False, True, True, form)
    else:
        lin = W.clone()
    _, enc, db = _dualenc.topk_encode_backward(grad_values, v, idx, c["x"], W, c["pre_bias"], False, True, True,
                                               form)
    return dec, lin, enc, db


_dualenc = torch.ops.dualenc_fast


@pytest.mark.parametrize("dtype", WG_DTYPES, ids=["f64", "f32", "bf16", "f16"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("repeats", [False, True])
def test_sparse_weight_grads_matches_reference_and_existing_ops(dtype, shape, repeats, strategy):
    """Against the reference (float64, with tolerance), and bit for bit against
    the three ops it replaces, in the same form, for n in {0, 1, k}."""
    B, d, F, k, _ = shape
    c, gvals = wg_inputs(B, d, F, k, dtype, seed=B * 31 + d + k, repeats=repeats)
    t = tol(dtype)
    for n in sorted({0, 1, k}):
        got = wg_call(c, F, n)
        ref = R.sparse_weight_grads(**{key: (val.double() if val.is_floating_point() else val)
                                       for key, val in c.items()}, num_features=F, n=n)
        scale = max(1.0, B ** 0.5)
        for a, b in zip(got, ref):
            assert a.dtype == dtype and a.shape == b.shape
            torch.testing.assert_close(a.double(), b, atol=t["atol"] * scale, rtol=t["rtol"])
        for name, a, b in zip(("dW_dec", "dW_lin", "dW_enc", "db_enc"), got, wg_existing(c, gvals, F, n)):
            assert torch.equal(a, b), (name, n)


@pytest.mark.parametrize("form", [0, 64, 1 << 20], ids=["gather", "dense_rows_of_64B", "dense_one_block"])
@pytest.mark.parametrize("dtype", WG_DTYPES, ids=["f64", "f32", "bf16", "f16"])
def test_sparse_weight_grads_recorded_form_bitwise(form, dtype):
    """An explicit sparse_form (the one a forward recorded): the gather pass,
    the dense form in many row blocks (16-bit sums widened to float32 across
    blocks) and in one; at a size where the CPU pass splits the features
    over threads, with repeated indices."""
    B, d, F, k = 300, 37, 400, 9  # 400 features: several parallel tasks (about 73 features each)
    c, gvals = wg_inputs(B, d, F, k, dtype, seed=5, repeats=True)
    for n in (0, 4, k):
        got = wg_call(c, F, n, sparse_form=form)
        for a, b in zip(got, wg_existing(c, gvals, F, n, form)):
            assert torch.equal(a, b)


def test_sparse_weight_grads_absent_inputs(strategy):
    """A None input gives an empty [0] result for its gradient(s), the others
    the very bits of the full call; grad_lin may be grad_dec itself."""
    c, _ = wg_inputs(20, 11, 30, 6, torch.float32, seed=3)
    full = wg_call(c, 30, 4)
    for drop in ("grad_dec", "grad_lin", "grad_pre", "x", "pre_bias"):
        c2 = dict(c, **{drop: None})
        got = wg_call(c2, 30, 4)
        for name, a, b in zip(("grad_dec", "grad_lin", "grad_pre", "grad_pre"), got, full):
            absent = c2[name] is None or (name == "grad_pre" and c2["x"] is None)
            if absent:
                assert a.shape == (0,), (drop, name)
            elif drop != "pre_bias":
                assert torch.equal(a, b), (drop, name)
    # without pre_bias: the encoder's rows are x itself
    c3 = dict(c, pre_bias=None)
    enc = wg_call(c3, 30, 4)[2]
    ref = R.sparse_weight_grads(**c3, num_features=30, n=4)[2]
    torch.testing.assert_close(enc, ref)
    none = wg_call(dict(c, grad_dec=None, grad_lin=None, grad_pre=None, x=None, pre_bias=None), 30, 4)
    assert all(t.shape == (0,) for t in none)
    # one tensor for both decoders (the joint model's dL/drecon)
    same = wg_call(dict(c, grad_lin=c["grad_dec"]), 30, 4)
    sep = wg_call(dict(c, grad_lin=c["grad_dec"].clone()), 30, 4)
    for a, b in zip(same, sep):
        assert torch.equal(a, b)


def test_sparse_weight_grads_noncontiguous_and_d0():
    c, _ = wg_inputs(9, 8, 15, 4, torch.float32, seed=4)
    want = wg_call(c, 15, 2)
    nc = {k_: (torch.stack([v, v], 2)[..., 0] if v.dim() == 2 else v) for k_, v in c.items()}
    assert not nc["grad_dec"].is_contiguous()
    for a, b in zip(wg_call(nc, 15, 2), want):
        assert torch.equal(a, b)
    z = {k_: (v[:, :0] if k_ in ("grad_dec", "grad_lin", "x") else v[:0] if k_ == "pre_bias" else v)
         for k_, v in c.items()}
    dec, lin, enc, db = wg_call(z, 15, 2)
    assert dec.shape == lin.shape == enc.shape == (15, 0)
    assert torch.equal(db, want[3])


@pytest.mark.parametrize("case", range(3))
def test_sparse_weight_grads_opcheck(case, strategy):
    c, _ = wg_inputs(6, 5, 9, 3, torch.float64, seed=12, repeats=True)
    args = [
        (c["indices"], c["values"], c["grad_pre"], c["grad_dec"], c["grad_lin"], c["x"], c["pre_bias"], 9, 2),
        (c["indices"], c["values"], None, c["grad_dec"], None, None, None, 9, 3, False, 0),
        (c["indices"], c["values"], c["grad_pre"], None, c["grad_lin"], c["x"], None, 9, 0, True, 64),
    ][case]
    torch.library.opcheck(_dualenc.sparse_weight_grads.default, args)


def wg_bad_cases():
    c, _ = wg_inputs(4, 6, 9, 3, torch.float32, seed=1)

    def call(F=9, n=2, **kw):
        return wg_call(dict(c, **kw), F, n)

    return [
        (lambda: call(n=4), ValueError, r"'n' must satisfy 0 <= n <= k = 3 \(values.shape\[1\]\), got n = 4"),
        (lambda: call(n=-1), ValueError, r"'n' must satisfy 0 <= n <= k = 3"),
        (lambda: call(F=-1), ValueError, r"'num_features' must be >= 0, got -1"),
        (lambda: call(F=5), IndexError, r"'indices' must hold feature indices in \[0, 5\)"),
        (lambda: call(indices=c["indices"].int()), TypeError, r"'indices' must be an int64 tensor"),
        (lambda: call(values=c["values"][:, :2]), ValueError, r"'indices' must have the shape of 'values'"),
        (lambda: call(grad_pre=c["grad_pre"][:, :2]), ValueError, r"'grad_pre' must have the shape of 'values'"),
        (lambda: call(grad_pre=c["grad_pre"].double()), TypeError, r"'grad_pre' must have the dtype of 'values'"),
        (lambda: call(grad_dec=c["grad_dec"][:3]), ValueError, r"'grad_dec' dim 0 must equal values.shape\[0\] \(B\) = 4"),
        (lambda: call(grad_lin=c["grad_lin"][:, :5]), ValueError, r"'grad_lin' dim 1 must equal grad_dec.shape\[1\] \(d\) = 6"),
        (lambda: call(grad_dec=None, x=c["x"][:, :5]), ValueError, r"'x' dim 1 must equal grad_lin.shape\[1\] \(d\) = 6"),
        (lambda: call(x=c["x"].half()), TypeError, r"'x' must have the dtype of 'values'"),
        (lambda: call(grad_dec=c["grad_dec"][0]), ValueError, r"'grad_dec' must have shape \[B, d\]"),
        (lambda: call(pre_bias=c["pre_bias"][:4]), ValueError, r"'pre_bias' dim 0 must equal grad_dec.shape\[1\] \(d\) = 6"),
        (lambda: call(values=c["values"].long()), TypeError, r"'values' must be a floating-point tensor"),
    ]


@pytest.mark.parametrize("case", range(15))
def test_sparse_weight_grads_bad_input_raises_naming_argument(case):
    fn, exc, pattern = wg_bad_cases()[case]
    with pytest.raises(exc, match=pattern):
        fn()


def test_sparse_weight_grads_shares_the_code_transpose():
    """sparse_weight_grads walks the transpose another product of the same code
    built (and builds it for them when it runs first)."""
    torch.manual_seed(7)
    B, d, F, k = 11, 8, 60, 5
    x, w, b = torch.randn(B, d), torch.randn(F, d), torch.randn(F)
    v, idx = ops.topk_encode(x, w, b, k)
    g = torch.randn(B, d)
    ops._shared_transpose_stats(reset=True)
    with ops.sparse_strategy_scope("gather"):
        dw = torch.ops.dualenc_fast.sparse_decode_backward(g, v, idx, w, False, True, False, 0)[1]
        dw2 = ops.sparse_weight_grads(idx, v, None, g, None, None, None, F, k)[0]
    assert ops._shared_transpose_stats() == (1, 1)
    assert torch.equal(dw, dw2)


def test_dense_weight_grads_setting_is_validated_restored_and_cpu_keeps_the_gemms():
    """ops.set_dense_weight_grads: "gemm" (default) or "staged"; anything else
    raises and leaves the setting alone. "staged" is CUDA only: on the CPU the
    dense form's weight gradients are the GEMMs' either way (bitwise)."""
    assert ops.dense_weight_grads() == "gemm"
    g_ = torch.Generator().manual_seed(12)
    B, d, F, k = 9, 7, 40, 12
    v = torch.randn(B, k, generator=g_)
    idx = torch.randint(0, F, (B, k), generator=g_)
    w, x, up, upk = (torch.randn(*s, generator=g_) for s in ((F, d), (B, d), (B, d), (B, k)))
    dense = 1 << 20

    def grads():
        return (torch.ops.dualenc_fast.sparse_decode_backward(up, v, idx, w, True, True, True, dense)
                + torch.ops.dualenc_fast.topk_encode_backward(upk, v, idx, x, w, None, True, True, True, dense))

    want = grads()
    try:
        ops.set_dense_weight_grads("staged")
        assert ops.dense_weight_grads() == "staged"
        for a, b in zip(grads(), want):
            assert torch.equal(a, b)
        for bad in ("GEMM", "", None, 1, True):
            with pytest.raises(ValueError, match="'mode' must be 'gemm' or 'staged'"):
                ops.set_dense_weight_grads(bad)
        assert ops.dense_weight_grads() == "staged"
    finally:
        ops.set_dense_weight_grads("gemm")
    assert ops.dense_weight_grads() == "gemm"
