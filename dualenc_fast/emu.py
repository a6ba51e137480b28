"""The CUDA kernels of this package run on the CPU by an emulator of the CUDA
execution model (csrc/emu), for tests on machines without a GPU.

The emulated build is a second compiled module, ``dualenc_fast._C_emu``
(CMake option ``DUALENC_EMU=ON``; ``bash scripts/bootstrap.sh test`` builds
it), whose ops are ``torch.ops.dualenc_fast_emu.*`` and take CPU tensors. It
has its own settings: :func:`strategy_scope` forces the gather or dense form
(and the tiled forward of sparse_decode on or off) and the encoder's row-block size, :func:`schedule` picks the schedule seed.
``DUALENC_EMU_LIB=/path/to/_C_emu*.so`` loads another build of it (the ASan
build, the mutation check's mutants). See README, "Emulated CUDA tests".
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator, Optional

import torch

_MODES = ("auto", "gather", "dense")
_TILED = ("auto", "on", "off")
_module = None
_error: Optional[BaseException] = None


def module():
    """The emulated module; raises ImportError when it was not built."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise ImportError(str(_error))
    try:
        path = os.environ.get("DUALENC_EMU_LIB")
        if path:
            spec = importlib.util.spec_from_file_location("dualenc_fast._C_emu", path)
            if spec is None or spec.loader is None:
                raise ImportError(f"DUALENC_EMU_LIB={path!r} is not a loadable module")
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        else:
            from . import _C_emu as mod  # type: ignore[attr-defined]
    except ImportError as exc:
        _error = exc
        raise
    _module = mod
    return mod


def available() -> bool:
    try:
        module()
        return True
    except ImportError:
        return False


def ops():
    """``torch.ops.dualenc_fast_emu``: the emulated CUDA kernels (CPU tensors)."""
    module()
    return torch.ops.dualenc_fast_emu


def set_schedule_seed(seed: int) -> None:
    """0: the threads of a block and the blocks of a grid run in order; n > 0:
    in an order drawn from n at every synchronisation point (reproducible:
    each setting restarts the sequence). ``EMU_SEED=n`` sets the initial seed."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"dualenc_fast.emu: argument 'seed' must be an int >= 0, got {seed!r}")
    module().set_schedule_seed(seed)


def schedule_seed() -> int:
    return int(module().schedule_seed())


@contextlib.contextmanager
def schedule(seed: int) -> Iterator[None]:
    before = schedule_seed()
    set_schedule_seed(seed)
    try:
        yield
    finally:
        set_schedule_seed(before)


def strategy() -> dict:
    return dict(module().sparse_strategy())


def set_strategy(
    mode: Optional[str] = None, *, dense_block_bytes: Optional[int] = None, encode_block_bytes: Optional[int] = None,
    tiled: Optional[str] = None,
) -> None:
    """The emulated module's copy of :func:`dualenc_fast.ops.set_sparse_strategy`
    (mode, dense-form block size, tiled forward "auto"/"on"/"off") and
    :func:`dualenc_fast.ops.set_encode_block_bytes`. The emulated sparse_decode
    decides the tiled form by the CUDA rule (its tensors are on the CPU)."""
    cur = strategy()
    mode = cur["mode"] if mode is None else mode
    if mode not in _MODES:
        raise ValueError(f"dualenc_fast.emu: argument 'mode' must be one of {_MODES}, got {mode!r}")
    vals = {}
    for name, val in (("dense_block_bytes", dense_block_bytes), ("encode_block_bytes", encode_block_bytes)):
        val = cur[name] if val is None else val
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"dualenc_fast.emu: argument '{name}' must be an int >= 1, got {val!r}")
        vals[name] = val
    tiled = cur["tiled"] if tiled is None else tiled
    if tiled not in _TILED:
        raise ValueError(f"dualenc_fast.emu: argument 'tiled' must be one of {_TILED}, got {tiled!r}")
    module().set_sparse_strategy(_MODES.index(mode), vals["dense_block_bytes"], vals["encode_block_bytes"],
                                 _TILED.index(tiled))


@contextlib.contextmanager
def dense_dv_scope(nbytes: int) -> Iterator[None]:
    """The emulated module's :func:`dualenc_fast.ops.set_dense_dv_block_bytes`
    for the length of a ``with`` block."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"dualenc_fast.emu: argument 'nbytes' must be an int >= 0, got {nbytes!r}")
    before = int(module().dense_dv_block_bytes())
    module().set_dense_dv_block_bytes(nbytes)
    try:
        yield
    finally:
        module().set_dense_dv_block_bytes(before)


@contextlib.contextmanager
def dense_weight_grads_scope(mode: str, smem_bytes: int = 0) -> Iterator[None]:
    """The emulated module's :func:`dualenc_fast.ops.set_dense_weight_grads`
    for the length of a ``with`` block, with the staged kernel's shared-memory
    budget per block (``smem_bytes``; 0: sm_90's 227 KB), which tests lower to
    make a batch's slice not fit (the fallback to the feature-major kernel)."""
    if mode not in ("gemm", "staged"):
        raise ValueError(f"dualenc_fast.emu: argument 'mode' must be 'gemm' or 'staged', got {mode!r}")
    if isinstance(smem_bytes, bool) or not isinstance(smem_bytes, int) or smem_bytes < 0:
        raise ValueError(f"dualenc_fast.emu: argument 'smem_bytes' must be an int >= 0, got {smem_bytes!r}")
    before = (bool(module().dense_weight_grads_staged()), int(module().staged_smem_bytes()))
    module().set_dense_weight_grads_staged(mode == "staged")
    module().set_staged_smem_bytes(smem_bytes)
    try:
        yield
    finally:
        module().set_dense_weight_grads_staged(before[0])
        module().set_staged_smem_bytes(before[1])


@contextlib.contextmanager
def strategy_scope(mode: Optional[str] = None, **settings) -> Iterator[None]:
    before = strategy()
    set_strategy(mode, **settings)
    try:
        yield
    finally:
        set_strategy(before["mode"], dense_block_bytes=before["dense_block_bytes"],
                     encode_block_bytes=before["encode_block_bytes"], tiled=before["tiled"])
