"""Autocast rules for the compiled ops.

Without a rule, an op called inside ``torch.autocast`` gets float32 inputs
while the ATen products inside its kernel are autocast to 16 bits, and the
kernel fails on the mixed dtypes. The rule below does what autocast does for
``torch.mm``: floating-point float32 inputs on the autocast device are cast to
the autocast dtype (``torch.get_autocast_dtype``: bfloat16 on CPU, float16 or
bfloat16 on CUDA), other inputs (indices, float64, tensors on another device)
pass unchanged, and the op runs with autocast off. The casts are recorded by
autograd, so float32 master weights receive float32 gradients. The backward
ops get the same rule, so ``loss.backward()`` inside an autocast region works.
"""
from __future__ import annotations

import torch

OPS = (
    "topk_encode", "topk_encode_backward",
    "sparse_decode", "sparse_decode_backward",
    "fm_interaction", "fm_interaction_backward",
    "integration_mlp", "integration_mlp_backward",
    "sparse_weight_grads",
)
DEVICE_TYPES = ("cpu", "cuda")

_lib = torch.library.Library("dualenc_fast", "IMPL")


def _rule(device_type: str, op):
    key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))
    excluded = torch._C.DispatchKeySet(key)

    def cast(v, dtype):
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and v.device.type == device_type:
            return v.to(dtype)
        return v

    def kernel(keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*(cast(a, dtype) for a in args))

    return kernel


def register() -> None:
    ns = torch.ops.dualenc_fast
    for name in OPS:
        if not hasattr(ns, name):
            continue
        op = getattr(ns, name).default
        for device_type in DEVICE_TYPES:
            key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
            if op.has_kernel_for_dispatch_key(getattr(torch._C.DispatchKey, key)):
                continue
            _lib.impl(name, _rule(device_type, op), key, with_keyset=True)


register()
