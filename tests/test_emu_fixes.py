"""The CUDA-side behaviour of the review fixes (NaN semantics, float32 sums of
dense-form weight gradients, the recorded sparse form), run through the CUDA
kernels and their host code on the CPU by the emulator (torch.ops.dualenc_fast_emu,
backward ops called directly), against the pure-PyTorch reference."""
import pytest
import torch

import dualenc_fast.reference.functional as R
from emu_util import require_emu

from dualenc_fast import emu

require_emu()
E = emu.ops()


def leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("mode", ["eval", "dropout", "drop_all"])
def test_mlp_kernels_keep_nan_as_torch(mode, seed):
    """relu_kernel, relu_backward_kernel and apply_dropout_kernel keep NaN as
    torch: relu(NaN) = NaN, a dropped NaN or Inf is NaN, a rate of 1 gives
    zeros; forward and every gradient equal the reference's, NaNs included."""
    g = torch.Generator().manual_seed(3)
    B, K, H, d = 4, 6, 5, 3
    p, w1, b1, w2, b2 = (torch.randn(*s, generator=g) for s in ((B, K), (H, K), (H,), (d, H), (d,)))
    rate, training = {"eval": (0.0, False), "dropout": (0.5, True), "drop_all": (1.0, True)}[mode]
    mask = torch.ones(B, K, dtype=torch.bool)
    mask[0, 1] = mask[1, 2] = False
    p[0, 1], p[1, 2], p[2, 3] = float("nan"), float("inf"), float("nan")  # dropped, dropped, kept
    b1[4] = float("nan")  # a NaN hidden unit: relu must keep it
    if not training:
        op_mask, scale = None, 1.0
    elif rate >= 1.0:
        op_mask, scale = torch.zeros(B, K, dtype=torch.bool), 0.0
    else:
        op_mask, scale = mask, 1.0 / (1.0 - rate)
    up = torch.randn(B, d, generator=g)
    with emu.schedule(seed):
        out, hidden = E.integration_mlp(p, w1, b1, w2, b2, op_mask, scale)
        grads = E.integration_mlp_backward(up, None, p, hidden, w1, w2, op_mask, scale)
    ins = [leaf(t) for t in (p, w1, b1, w2, b2)]
    ref = R.integration_mlp(*ins, rate, training, mask=mask)
    rgrads = torch.autograd.grad(ref, ins, up, allow_unused=True)
    assert out.isnan().any()
    torch.testing.assert_close(out, ref, equal_nan=True)
    for a, e in zip(grads, rgrads):
        e = torch.zeros_like(a) if e is None else e  # rate 1: p does not reach the reference's output
        torch.testing.assert_close(a, e, equal_nan=True)


def test_topk_nan_passes_its_gradient_as_torch_relu():
    """A selected NaN passes its gradient (torch's ReLU backward); a selected
    value ReLU clamped to 0 passes none."""
    F, k = 40, 5
    bias = torch.zeros(F)
    bias[:3] = torch.tensor([1.0, 2.0, 3.0])
    bias[7], bias[30] = float("nan"), float("inf")
    x = torch.zeros(2, 3)
    w = torch.randn(F, 3, generator=torch.Generator().manual_seed(4))
    v, i = E.topk_encode(x, w, bias, k, None)
    ins = [leaf(x), leaf(w), leaf(bias)]
    rv, ri = R.topk_encode(*ins, k)
    assert torch.equal(i, ri) and i[0, 0] == 7
    torch.testing.assert_close(v, rv, equal_nan=True)
    up = torch.arange(1.0, 2 * k + 1).reshape(2, k)
    gx, gw, gb = E.topk_encode_backward(up, v, i, x, w, None, True, True, True)
    rgx, rgw, rgb = torch.autograd.grad(rv, ins, up)
    for a, e in ((gx, rgx), (gw, rgw), (gb, rgb)):
        torch.testing.assert_close(a, e, equal_nan=True)


def test_dense_weight_gradients_sum_blocks_in_float32():
    """bfloat16 weight gradients over 512 one-row dense blocks are summed in
    float32 (a bfloat16 running sum stalls once its spacing exceeds the terms)."""
    g = torch.Generator().manual_seed(31)
    B, d, F = 512, 4, 8
    bf = lambda t: t.to(torch.bfloat16)  # noqa: E731
    values = bf(1 + torch.rand(B, F, generator=g))
    indices = torch.arange(F).repeat(B, 1)
    weight = bf(torch.rand(F, d, generator=g))
    up = bf(1 + torch.rand(B, d, generator=g))
    x = bf(torch.rand(B, d, generator=g))

    def rel_err(a, e):
        return ((a.double() - e).abs().max() / e.abs().max()).item()

    with emu.strategy_scope("dense", dense_block_bytes=1):
        _, gw = E.sparse_decode_backward(up, values, indices, weight, False, True, True)
        _, gwe, gbe = E.topk_encode_backward(values, values, indices, x, weight, None, False, True, True)
    assert rel_err(gw, values.double().T @ up.double()) < 1e-2
    assert rel_err(gwe, values.double().T @ x.double()) < 1e-2
    assert rel_err(gbe, values.double().sum(0)) < 1e-2


def _ran_dense(fn) -> bool:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return any("scatter_add" in e.name for e in prof.events()), out


def test_backward_ops_take_the_recorded_form():
    """sparse_form=0 runs the gather form and n > 0 the dense form whatever the
    emulated strategy says now; -1 follows the strategy; both forms agree."""
    g = torch.Generator().manual_seed(32)
    values = torch.randn(6, 3, generator=g)
    indices = torch.stack([torch.randperm(20, generator=g)[:3] for _ in range(6)])
    w = torch.randn(20, 5, generator=g)
    x = torch.randn(6, 5, generator=g)
    up = torch.randn(6, 5, generator=g)
    results = []
    for now, form, dense in (("dense", 0, False), ("gather", 1 << 20, True), ("dense", -1, True),
                             ("gather", -1, False)):
        with emu.strategy_scope(now):
            ran, out = _ran_dense(lambda: E.sparse_decode_backward(up, values, indices, w, True, True, False, form))
            assert ran == dense, (now, form)
            ran, out2 = _ran_dense(
                lambda: E.topk_encode_backward(values, values.abs(), indices, x, w, None, True, True, False, form))
            assert ran == dense, (now, form)
        results.append(out + out2)
    for r in results[1:]:
        for a, e in zip(r, results[0]):
            torch.testing.assert_close(a, e)
