"""Times sparse_weight_grads (one feature-major pass for dW_dec, dW_lin,
dW_enc and db_enc) against the three ops it replaces (sparse_decode_backward
on the code and on its first n columns, topk_encode_backward), in the gather
form, and checks that they agree (bit for bit where they should).

    python bench/weight_grads_timing.py [--device cuda] [--config P|S|small] [--dtype float32]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dualenc_fast.ops  # noqa: E402,F401  (loads the compiled ops)

CONFIGS = {  # (B, d, F, k, n)
    "P": (4096, 3200, 50000, 1024, 512),
    "S": (8192, 2304, 65536, 64, 32),
    "small": (2048, 512, 8192, 32, 16),
}


def timed(fn, device, reps):
    fn()
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--config", default="S", choices=sorted(CONFIGS))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    B, d, F, k, n = CONFIGS[a.config]
    dt, dev = getattr(torch, a.dtype), a.device
    g = torch.Generator().manual_seed(0)
    idx = torch.stack([torch.randperm(F, generator=g)[:k] for _ in range(B)]).to(dev)
    v = torch.sort(torch.rand(B, k, generator=g), 1, descending=True).values.to(dev, dt)
    gv = torch.randn(B, k, generator=g).to(dev, dt)
    gp = torch.ops.aten.threshold_backward(gv, v, 0)
    gd, gl, x = (torch.randn(B, d, generator=g).to(dev, dt) for _ in range(3))
    W = torch.zeros(F, d, device=dev, dtype=dt)
    vn, i_n = v[:, :n].contiguous(), idx[:, :n].contiguous()
    O = torch.ops.dualenc_fast

    def three():
        return (O.sparse_decode_backward(gd, v, idx, W, False, True, False, 0)[1],
                O.sparse_decode_backward(gl, vn, i_n, W, False, True, False, 0)[1],
                *O.topk_encode_backward(gv, v, idx, x, W, None, False, True, False, 0)[1:])

    def one():
        return O.sparse_weight_grads(idx, v, gp, gd, gl, x, None, F, n, False, 0)

    def one_shared():  # grad_lin is grad_dec (the joint model's dL/drecon)
        return O.sparse_weight_grads(idx, v, gp, gd, gd, x, None, F, n, False, 0)

    ref, got = three(), one()
    same = [torch.equal(a_, b_) for a_, b_ in zip(got, ref)]
    err = max((a_.float() - b_.float()).abs().max().item() for a_, b_ in zip(got, ref))
    print(f"{a.config} B={B} d={d} F={F} k={k} n={n} {a.dtype} on {dev}"
          f" ({torch.cuda.get_device_name(0) if dev == 'cuda' else 'cpu'})")
    print(f"  bitwise equal (dW_dec, dW_lin, dW_enc, db_enc): {same}; max |diff| {err:.3g}")
    print(f"  three ops: {timed(three, dev, a.reps):.2f} ms")
    print(f"  sparse_weight_grads: {timed(one, dev, a.reps):.2f} ms")
    print(f"  sparse_weight_grads, grad_lin is grad_dec: {timed(one_shared, dev, a.reps):.2f} ms")


if __name__ == "__main__":
    main()
