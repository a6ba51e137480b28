"""Public op API: the compiled ``torch.ops.dualenc_fast`` kernels, with fake
(meta) implementations for torch.compile and autograd formulas.

Every function has the signature of its pure-PyTorch twin in
:mod:`dualenc_fast.reference.functional`, which is the oracle the tests compare
against. Shapes: ``B`` rows, ``d`` width, ``F`` features, ``k`` active, ``K``
embedding width, ``H`` integration-MLP hidden width.

Tie rule: equal pre-activations rank by lower feature index; rows of codes are
sorted by value descending, then feature index ascending.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Tuple

import torch
from torch import Tensor

from . import _ext

_ext.require_extension()
_ops = torch.ops.dualenc_fast

__all__ = [
    "buffer_cache_bytes",
    "buffer_cache_limit",
    "clear_buffer_cache",
    "dense_code",
    "dense_dv_block_bytes",
    "dense_weight_grads",
    "fm_interaction",
    "encode_block_bytes",
    "index_checks",
    "integration_mlp",
    "integration_mlp_with_hidden",
    "set_encode_block_bytes",
    "set_buffer_cache_limit",
    "set_dense_dv_block_bytes",
    "set_dense_weight_grads",
    "set_index_checks",
    "set_share_transposes",
    "set_sparse_strategy",
    "share_transposes",
    "sparse_decode",
    "sparse_strategy",
    "sparse_strategy_scope",
    "sparse_weight_grads",
    "topk_encode",
    "topn_reselect",
    "uses_dense_path",
    "uses_tiled_forward",
]


def set_index_checks(enabled: bool) -> None:
    """Turn the range check of ``indices`` arguments on or off (default on).

    On CUDA the check costs a device-to-host sync per call; code that passes
    indices produced by :func:`topk_encode` may switch it off.
    """
    _ext._C.set_index_checks(bool(enabled))


def index_checks() -> bool:
    return bool(_ext._C.index_checks())


_MODES = ("auto", "gather", "dense")
_TILED = ("auto", "on", "off")


def sparse_strategy() -> dict:
    """The current gather-or-dense choice of the sparse products (see
    :func:`set_sparse_strategy`): ``{"mode", "cpu_min_density",
    "cuda_min_density", "cuda_fp32_min_density", "dense_block_bytes", "tiled",
    "tiled_min_reuse", "tiled_max_density", "tiled_fp32_max_density"}``."""
    return dict(_ext._C.sparse_strategy())


def _code_traits(values: Tensor, num_features: int) -> tuple:
    """What the strategy decides by: (on CPU, 16-bit, float32, B, k, F)."""
    return (
        values.device.type == "cpu",
        values.dtype in (torch.float16, torch.bfloat16),
        values.dtype == torch.float32,
        int(values.shape[0]),
        int(values.shape[1]),
        int(num_features),
    )


def uses_dense_path(values: Tensor, num_features: int) -> bool:
    """Whether the sparse ops would take the dense form for a code ``values``
    [B, k] over ``num_features`` features (device, dtype and the current
    :func:`set_sparse_strategy` settings decide)."""
    return bool(_ext._C.use_dense_path(*_code_traits(values, num_features)))


def uses_tiled_forward(values: Tensor, num_features: int) -> bool:
    """Whether :func:`sparse_decode`'s forward would take the batch-tiled CUDA
    form for a code ``values`` [B, k] over ``num_features`` features (never on
    the CPU; see ``tiled`` in :func:`set_sparse_strategy`)."""
    return bool(_ext._C.use_tiled_forward(*_code_traits(values, num_features)))


def _sparse_form(values: Tensor, num_features: int) -> int:
    """The form a forward records for its backward (0: gather, n > 0: dense in
    row blocks of about n bytes), from the strategy in force now."""
    return int(_ext._C.sparse_form(*_code_traits(values, num_features)))


def set_sparse_strategy(
    mode: Optional[str] = None,
    *,
    cpu_min_density: Optional[float] = None,
    cuda_min_density: Optional[float] = None,
    cuda_fp32_min_density: Optional[float] = None,
    dense_block_bytes: Optional[int] = None,
    tiled: Optional[str] = None,
    tiled_min_reuse: Optional[float] = None,
    tiled_max_density: Optional[float] = None,
    tiled_fp32_max_density: Optional[float] = None,
) -> None:
    """How :func:`sparse_decode` (forward and backward) and the backward of
    :func:`topk_encode` form their sparse-times-dense products.

    - ``"gather"``: per-row gathers of the selected weight rows, O(B*k*d) work,
      bound by memory traffic; no [B, F] buffer.
    - ``"dense"``: the code scattered into dense [rows, F] blocks (about 256 MiB
      each, freed before the op returns) and multiplied on the GEMM units,
      O(B*F*d) work.
    - ``"auto"``: dense when the density k/F reaches the threshold for
      the device and dtype: ``cpu_min_density`` (default 0.10, measured on the
      development CPU), ``cuda_min_density`` for half, bfloat16 and float32 with
      TF32 GEMMs allowed (default 0.01), ``cuda_fp32_min_density`` for float32
      without TF32 and float64 (default 0.05). The CUDA defaults are arithmetic
      from KERNELS.md, not yet measured; ``dualenc bench`` times both forms.

    ``dense_block_bytes`` (default 256 MiB) bounds the dense form's transient
    memory: it works through the batch in row blocks whose [rows, F] code
    stays near that size. Arguments left as None keep their current value
    (the mode starts as ``"auto"``). The setting is process-wide; under
    autograd each forward records the form it picked (and the block size)
    and its backward uses that form, even if the setting changed in between
    (under ``torch.compile`` the form is fixed when the graph is traced).

    ``tiled`` (CUDA only): the batch-tiled forward of :func:`sparse_decode`
    (blocks of 256 batch rows stream the weight table through shared memory
    and add each row's pairs, sorted by feature, into register accumulators).
    ``"on"`` forces it, ``"off"`` never takes it, ``"auto"`` (default) takes
    it in ``"auto"`` mode when each staged weight element serves at least
    ``tiled_min_reuse`` pairs (k * min(B, 256) / F, default 2) and the density
    k/F is below ``tiled_max_density`` (default 0.02; 16-bit or TF32, against
    tensor-core GEMMs: at the paper's 2.05% the estimate is a toss-up, so the
    dense GEMM stays until measured) or ``tiled_fp32_max_density`` (default 0.25; float32
    without TF32, against SIMT GEMMs); the model is in csrc/strategy.h. It is
    a forward-only form: the backward takes the gather or dense form the
    forward recorded, as without it. Its sum runs over each row's pairs in
    ascending feature order (the gather form: in code order), so the two
    agree up to rounding; each is deterministic.

    Both forms give the same result up to rounding. On CUDA the dense form's
    scatter adds repeated indices of a row with atomics (order-dependent
    rounding when an index repeats three or more times in one row); the gather
    form is deterministic everywhere.
    """
    cur = sparse_strategy()
    mode = cur["mode"] if mode is None else mode
    if mode not in _MODES:
        raise ValueError(f"dualenc_fast: argument 'mode' must be one of {_MODES}, got {mode!r}")
    vals = {}
    for name, val in (
        ("cpu_min_density", cpu_min_density),
        ("cuda_min_density", cuda_min_density),
        ("cuda_fp32_min_density", cuda_fp32_min_density),
    ):
        if val is None:
            val = cur[name]
        val = float(val)
        if not (val >= 0.0):
            raise ValueError(f"dualenc_fast: argument '{name}' must be a density >= 0, got {val!r}")
        vals[name] = val
    block = cur["dense_block_bytes"] if dense_block_bytes is None else dense_block_bytes
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"dualenc_fast: argument 'dense_block_bytes' must be an int >= 1, got {block!r}")
    tiled = cur["tiled"] if tiled is None else tiled
    if tiled not in _TILED:
        raise ValueError(f"dualenc_fast: argument 'tiled' must be one of {_TILED}, got {tiled!r}")
    for name, val in (
        ("tiled_min_reuse", tiled_min_reuse),
        ("tiled_max_density", tiled_max_density),
        ("tiled_fp32_max_density", tiled_fp32_max_density),
    ):
        if val is None:
            val = cur[name]
        val = float(val)
        if not (val >= 0.0):
            raise ValueError(f"dualenc_fast: argument '{name}' must be a number >= 0, got {val!r}")
        vals[name] = val
    _ext._C.set_sparse_strategy(_MODES.index(mode), vals["cpu_min_density"], vals["cuda_min_density"],
                                vals["cuda_fp32_min_density"], block, _TILED.index(tiled),
                                vals["tiled_min_reuse"], vals["tiled_max_density"],
                                vals["tiled_fp32_max_density"])


@contextlib.contextmanager
def sparse_strategy_scope(mode: Optional[str] = None, **settings) -> Iterator[None]:
    """:func:`set_sparse_strategy` for the length of a ``with`` block: the
    settings in force before it (including changes made inside it) are put
    back when the block ends."""
    before = sparse_strategy()
    set_sparse_strategy(mode, **settings)
    try:
        yield
    finally:
        set_sparse_strategy(**before)


def encode_block_bytes() -> int:
    """See :func:`set_encode_block_bytes`."""
    return int(_ext._C.encode_block_bytes())


def set_encode_block_bytes(nbytes: int) -> None:
    """``topk_encode`` on CUDA runs its encoder GEMM ``(x - pre_bias) @ W.T + b``
    in row blocks whose ``[rows, F]`` pre-activations stay near ``nbytes``
    (default 256 MiB; at least one row per block). Process-wide."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 1:
        raise ValueError(f"dualenc_fast: argument 'nbytes' must be an int >= 1, got {nbytes!r}")
    _ext._C.set_encode_block_bytes(nbytes)


def dense_dv_block_bytes() -> int:
    """Size of the chunks of the dense form's dvalues product (0: row blocks);
    see :func:`set_dense_dv_block_bytes`."""
    return int(_ext._C.dense_dv_block_bytes())


def set_dense_dv_block_bytes(nbytes: int) -> None:
    """In the dense form, ``sparse_decode``'s dvalues are the entries of
    ``g @ weight.T`` [B, F] at the selected indices. With ``nbytes > 0``
    (default 24 MiB) that product is formed in chunks of features whose
    ``[B, chunk]`` result stays near ``nbytes`` (at least 2048 features) and
    each chunk's selected entries are read back through the code's transpose
    (:func:`set_share_transposes`) while the chunk is still in cache: no
    ``[rows, F]`` product goes to memory. ``0``: the product in the row blocks
    of ``dense_block_bytes``, gathered row by row. Both give the same values up
    to the GEMM's rounding. Process-wide."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"dualenc_fast: argument 'nbytes' must be an int >= 0, got {nbytes!r}")
    _ext._C.set_dense_dv_block_bytes(nbytes)


def dense_weight_grads() -> str:
    """``"gemm"`` or ``"staged"``; see :func:`set_dense_weight_grads`."""
    return "staged" if _ext._C.dense_weight_grads_staged() else "gemm"


def set_dense_weight_grads(mode: str) -> None:
    """How the dense form computes the weight gradients of ``sparse_decode``
    (``code^T @ grad_out``) and ``topk_encode`` (``gcode^T @ x`` and the bias
    gradient) on CUDA. ``"gemm"`` (default): GEMMs on the code scattered into
    ``[rows, F]`` blocks. ``"staged"``: a feature-major kernel over the code's
    transpose (:func:`set_share_transposes`) that stages column slices of the
    dense operand for all batch rows in shared memory (a batch whose slice does
    not fit, over ~14,500 rows on an H100, takes the gather form's kernel).
    Both give the same values up to float32 rounding order. CUDA only: the CPU
    always takes the GEMMs. Process-wide."""
    if mode not in ("gemm", "staged"):
        raise ValueError(f"dualenc_fast: argument 'mode' must be 'gemm' or 'staged', got {mode!r}")
    _ext._C.set_dense_weight_grads_staged(mode == "staged")


def buffer_cache_limit() -> int:
    """The most bytes the CPU buffer cache keeps idle (default 1 GiB).

    On CPU the large outputs of the ops (weight gradients, dense codes) take
    their memory from a cache of blocks that earlier outputs of the same size
    gave back when their tensors died, so a training loop that frees its
    gradients every step (``zero_grad(set_to_none=True)``) does not fault
    fresh pages in every step. Blocks under 1 MiB and other devices use the
    ordinary allocator."""
    return int(_ext._C.buffer_cache_limit())


def set_buffer_cache_limit(max_bytes: int) -> None:
    """Cap the idle bytes of the CPU buffer cache; 0 turns the cache off and
    frees what it holds. Process-wide."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"dualenc_fast: argument 'max_bytes' must be an int >= 0, got {max_bytes!r}")
    _ext._C.set_buffer_cache_limit(max_bytes)


def buffer_cache_bytes() -> int:
    """Bytes held idle by the CPU buffer cache now."""
    return int(_ext._C.buffer_cache_bytes())


def clear_buffer_cache() -> None:
    """Free every idle block of the CPU buffer cache (the limit stays) and drop
    the transposes kept for sharing (:func:`set_share_transposes`)."""
    _ext._C.clear_buffer_cache()
    _ext._C.clear_shared_csrs()


def share_transposes() -> bool:
    """Whether the backward products of one code share one transpose of it."""
    return bool(_ext._C.share_csrs())


def set_share_transposes(enabled: bool) -> None:
    """The weight gradients of a sparse product walk the code's transpose
    (pairs grouped by feature). In a joint step the decoder and the encoder
    walk that of the same ``[B, k]`` code, the NFM-linear layer and the FM
    pooling that of its first N columns. With sharing on (the default) the
    transpose of a code that :func:`topk_encode` returned, or of a view of it,
    is built once and reused by the later products of the same code, on every
    device: two builds per step instead of four (:func:`topn_reselect`'s codes
    count as :func:`topk_encode`'s). A transpose is reused only for
    the same storage, view, version counter (an in-place write gives a new
    one), number of features and stream; codes built any other way are
    transposed on every call. At most four transposes are kept; those of codes
    that died are dropped at the next step. Nothing is shared while the CUDA
    stream is being captured into a graph. Writes that bypass the version
    counter (through ``.data``, or a NumPy or DLPack alias of the indices) are
    not seen: after such a write call :func:`clear_buffer_cache` or turn
    sharing off. Off: every product builds its own (the results are bitwise
    the same). Process-wide."""
    if not isinstance(enabled, bool):
        raise TypeError(f"dualenc_fast: argument 'enabled' must be a bool, got {enabled!r}")
    _ext._C.set_share_csrs(enabled)


def _shared_transpose_stats(reset: bool = False) -> Tuple[int, int]:
    """(transposes built, transposes reused) since the last reset."""
    built, reused = _ext._C.shared_csr_stats(reset)
    return int(built), int(reused)


def _empty_or(t: Tensor, shape, needed: bool) -> Tensor:
    return t.new_empty(shape) if needed else t.new_empty((0,))


# --------------------------------------------------------------------------- sparse_decode
def sparse_decode(
    values: Tensor, indices: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *, check_indices: bool = True
) -> Tensor:
    """``out[b] = bias + sum_j values[b, j] * weight[indices[b, j]]``.

    values [B, k], indices [B, k] int64, weight [F, d], bias [d] or None -> [B, d].
    Repeated indices within a row add up. ``weight`` receives a dense [F, d]
    gradient built deterministically (pairs grouped by feature, no atomics).
    At high density (k/F) the products run as dense GEMMs instead of gathers:
    see :func:`set_sparse_strategy`. ``check_indices=False`` skips the range
    check of ``indices`` (a device sync on CUDA), for indices this package's
    own selection produced; out-of-range indices are then undefined behaviour.
    """
    return _ops.sparse_decode.default(values, indices, weight, bias, bool(check_indices))


@torch.library.register_fake("dualenc_fast::sparse_decode")
def _sparse_decode_fake(values, indices, weight, bias, check_indices=True):
    torch._check(values.dim() == 2 and weight.dim() == 2, lambda: "sparse_decode: values [B, k], weight [F, d]")
    return values.new_empty((values.shape[0], weight.shape[1]))


@torch.library.register_fake("dualenc_fast::sparse_decode_backward")
def _sparse_decode_backward_fake(grad_out, values, indices, weight, need_values, need_weight, check_indices=True,
                                 sparse_form=-1):
    return _empty_or(values, values.shape, need_values), _empty_or(weight, weight.shape, need_weight)


def _sparse_decode_setup(ctx, inputs, output):
    # inputs may omit check_indices when it has its default value
    values, indices, weight, bias = inputs[:4]
    ctx.save_for_backward(values, indices, weight)
    ctx.has_bias = bias is not None
    ctx.sparse_form = _sparse_form(values, weight.shape[0])


def _sparse_decode_backward(ctx, grad):
    values, indices, weight = ctx.saved_tensors
    need_v, _, need_w, need_b = ctx.needs_input_grad[:4]
    grad = grad.contiguous()
    gv = gw = gb = None
    if need_v or need_w:
        gv, gw = _ops.sparse_decode_backward.default(
            grad, values, indices, weight, need_v, need_w, check_indices=False, sparse_form=ctx.sparse_form
        )
    if ctx.has_bias and need_b:
        gb = grad.sum(0)
    grads = ((gv if need_v else None), None, (gw if need_w else None), gb)
    return grads + (None,) * (len(ctx.needs_input_grad) - len(grads))


torch.library.register_autograd(
    "dualenc_fast::sparse_decode", _sparse_decode_backward, setup_context=_sparse_decode_setup
)


# --------------------------------------------------------------------------- sparse_weight_grads
def sparse_weight_grads(
    indices: Tensor,
    values: Tensor,
    grad_pre: Optional[Tensor],
    grad_dec: Optional[Tensor],
    grad_lin: Optional[Tensor],
    x: Optional[Tensor],
    pre_bias: Optional[Tensor],
    num_features: int,
    n: int,
    *,
    check_indices: bool = True,
    sparse_form: int = -1,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The weight gradients of every product of one sparse code in one
    feature-major pass over one transpose of the code (a gradient op: no
    autograd formula). Sums over the pairs (b, j) with ``indices[b, j] = i``:

    - ``dW_dec[i] = sum values[b, j] * grad_dec[b]`` (sparse_decode's dW);
    - ``dW_lin[i]``: the same over the pairs with ``j < n``, with ``grad_lin``
      (the NFM linear part on the top-n code: rows of ``values`` are sorted
      descending, so the top n are the first n columns);
    - ``dW_enc[i] = sum grad_pre[b, j] * (x[b] - pre_bias)``,
      ``db_enc[i] = sum grad_pre[b, j]`` (topk_encode's dW and db, with
      ``grad_pre`` the gradient of the selected pre-activations, ReLU mask
      applied: ``threshold_backward(grad_values, values, 0)``).

    indices [B, k] int64, values and grad_pre [B, k], grad_dec, grad_lin and x
    [B, d], pre_bias [d]; 0 <= n <= k; every float tensor one dtype, one
    device. Returns ``(dW_dec [F, d], dW_lin [F, d], dW_enc [F, d],
    db_enc [F])`` with F = num_features; a gradient whose input is None comes
    back as an empty [0] tensor (dW_enc and db_enc need grad_pre and x).
    Each result equals the existing op's (sparse_decode_backward's dW,
    topk_encode_backward's dW and db) in the same form. ``sparse_form``: the
    gather/dense form the forward recorded (see sparse_decode_backward), or -1
    for the current strategy's pick; ``check_indices=False`` skips the range
    check of ``indices`` (a device sync on CUDA).
    """
    return _ops.sparse_weight_grads.default(
        indices, values, grad_pre, grad_dec, grad_lin, x, pre_bias, int(num_features), int(n),
        bool(check_indices), int(sparse_form),
    )


@torch.library.register_fake("dualenc_fast::sparse_weight_grads")
def _sparse_weight_grads_fake(indices, values, grad_pre, grad_dec, grad_lin, x, pre_bias, num_features, n,
                              check_indices=True, sparse_form=-1):
    torch._check(0 <= n <= values.shape[1], lambda: f"sparse_weight_grads: need 0 <= n <= k, got n={n}")
    rows = next((t for t in (grad_dec, grad_lin, x) if t is not None), None)
    d = rows.shape[1] if rows is not None else 0
    empty = values.new_empty((0,))
    enc = grad_pre is not None and x is not None
    return (
        values.new_empty((num_features, d)) if grad_dec is not None else empty,
        values.new_empty((num_features, d)) if grad_lin is not None else values.new_empty((0,)),
        values.new_empty((num_features, d)) if enc else values.new_empty((0,)),
        values.new_empty((num_features,)) if enc else values.new_empty((0,)),
    )


# --------------------------------------------------------------------------- dense_code
def dense_code(values: Tensor, indices: Tensor, num_features: int, *, check_indices: bool = True) -> Tensor:
    """The dense ``[B, F]`` layout of a code: ``out[b, indices[b, j]] += values[b, j]``,
    zeros elsewhere (repeated indices add up), as
    :func:`dualenc_fast.reference.functional.dense_code`. Differentiable in
    ``values`` (the gradient is the dense gradient gathered at ``indices``).
    On CPU each row is zeroed and filled in one pass, in memory from the
    buffer cache (:func:`buffer_cache_limit`). ``check_indices`` as in
    :func:`sparse_decode`."""
    if isinstance(num_features, bool) or not isinstance(num_features, int):
        raise TypeError(
            f"dualenc_fast: argument 'num_features' must be an int, got {type(num_features).__name__} {num_features!r}"
        )
    return _ops.dense_code.default(values, indices, num_features, bool(check_indices))


@torch.library.register_fake("dualenc_fast::dense_code")
def _dense_code_fake(values, indices, num_features, check_indices=True):
    torch._check(values.dim() == 2, lambda: "dense_code: values [B, k]")
    return values.new_empty((values.shape[0], num_features))


def _dense_code_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _dense_code_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    pad = (None,) * (len(ctx.needs_input_grad) - 1)
    if not ctx.needs_input_grad[0]:
        return (None,) + pad
    return (grad.gather(1, indices),) + pad


torch.library.register_autograd("dualenc_fast::dense_code", _dense_code_backward, setup_context=_dense_code_setup)


# --------------------------------------------------------------------------- topk_encode
def topk_encode(
    x: Tensor, weight: Tensor, bias: Tensor, k: int, *, pre_bias: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """``ReLU((x - pre_bias) @ weight.T + bias)``, then the k largest per row.

    x [B, d], weight [F, d], bias [F], pre_bias [d] or None ->
    (values [B, k], indices [B, k] int64). Nothing of size [B, F] is kept for
    backward; in its gather form the backward touches only the selected rows
    of ``weight`` (dense form above a density threshold: see
    :func:`set_sparse_strategy`). A selected value that ReLU clamped to zero
    passes no gradient.

    A NaN pre-activation ranks first, above ``+Inf`` (as :func:`torch.topk`;
    NaNs among themselves by lower index), and the NaN is returned in
    ``values``, so a loss built on them goes NaN.

    In bfloat16 / float16 the pre-activation ``x @ weight.T + bias`` is
    rounded once (the reference rounds the product, then the sum), so it may
    differ from the reference's by one rounding (``eps * |z|``). Indices can
    differ only there: the selected set is the reference's unless its k-th and
    (k+1)-th values lie within one rounding of each other, and the order
    differs only among neighbours within one rounding.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"dualenc_fast: argument 'k' must be an int, got {type(k).__name__} {k!r}")
    return _ops.topk_encode.default(x, weight, bias, k, pre_bias)


@torch.library.register_fake("dualenc_fast::topk_encode")
def _topk_encode_fake(x, weight, bias, k, pre_bias):
    torch._check(x.dim() == 2 and weight.dim() == 2, lambda: "topk_encode: x [B, d], weight [F, d]")
    torch._check(0 < k <= weight.shape[0], lambda: f"topk_encode: need 0 < k <= F, got k={k}")
    return x.new_empty((x.shape[0], k)), x.new_empty((x.shape[0], k), dtype=torch.long)


@torch.library.register_fake("dualenc_fast::topk_encode_backward")
def _topk_encode_backward_fake(grad_values, values, indices, x, weight, pre_bias, need_x, need_w, check_indices=True,
                               sparse_form=-1):
    return (
        _empty_or(x, x.shape, need_x),
        _empty_or(weight, weight.shape, need_w),
        _empty_or(weight, (weight.shape[0],), need_w),
    )


def _topk_encode_setup(ctx, inputs, output):
    x, weight, bias, k, pre_bias = inputs
    values, indices = output
    ctx.save_for_backward(x, weight, pre_bias, values, indices)
    ctx.mark_non_differentiable(indices)
    ctx.sparse_form = _sparse_form(values, weight.shape[0])


def _topk_encode_backward(ctx, grad_values, grad_indices):
    x, weight, pre_bias, values, indices = ctx.saved_tensors
    need_x, need_w, need_b, _, need_pre = ctx.needs_input_grad
    need_pre = need_pre and pre_bias is not None
    if grad_values is None:
        return None, None, None, None, None
    want_w = need_w or need_b
    gx = gw = gb = None
    if need_x or want_w:
        gx, gw, gb = _ops.topk_encode_backward.default(
            grad_values.contiguous(), values, indices, x, weight, pre_bias, need_x, want_w,
            check_indices=False, sparse_form=ctx.sparse_form,
        )
    g_pre = None
    if need_pre:
        # d/d pre_bias = -sum_b dx_b = -(sum_b dz_b) @ W = -(grad_bias @ W): a GEMV,
        # no [B, d] dx (summing dx is cheaper only when dx is wanted anyway)
        if need_x:
            g_pre = -gx.sum(0)
        else:
            if not want_w:  # grad_bias alone: dz summed per feature
                dz = torch.ops.aten.threshold_backward(grad_values, values, 0)
                acc = torch.float32 if dz.dtype in (torch.float16, torch.bfloat16) else dz.dtype
                gb = dz.new_zeros(weight.shape[0], dtype=acc).index_add_(
                    0, indices.reshape(-1), dz.reshape(-1).to(acc)
                ).to(dz.dtype)
            g_pre = -(gb @ weight)
    return (
        gx if need_x else None,
        gw if need_w else None,
        gb if need_b else None,
        None,
        g_pre,
    )


torch.library.register_autograd(
    "dualenc_fast::topk_encode", _topk_encode_backward, setup_context=_topk_encode_setup
)


# --------------------------------------------------------------------------- fm_interaction
def fm_interaction(values: Tensor, indices: Tensor, embeddings: Tensor, *, check_indices: bool = True) -> Tensor:
    """FM pooling ``0.5 * ((sum_j v_j E[i_j])^2 - sum_j (v_j E[i_j])^2)``.

    values [B, k], indices [B, k] int64, embeddings [F, K] -> [B, K], in one
    pass over the active rows; backward gives dvalues and the touched rows of
    dembeddings (dense [F, K], deterministic). ``check_indices`` as in
    :func:`sparse_decode`.
    """
    return _ops.fm_interaction.default(values, indices, embeddings, bool(check_indices))


@torch.library.register_fake("dualenc_fast::fm_interaction")
def _fm_interaction_fake(values, indices, embeddings, check_indices=True):
    return values.new_empty((values.shape[0], embeddings.shape[1]))


@torch.library.register_fake("dualenc_fast::fm_interaction_backward")
def _fm_interaction_backward_fake(grad_p, values, indices, embeddings, need_v, need_e, check_indices=True):
    return _empty_or(values, values.shape, need_v), _empty_or(embeddings, embeddings.shape, need_e)


def _fm_interaction_setup(ctx, inputs, output):
    values, indices, embeddings = inputs[:3]  # check_indices may be omitted
    ctx.save_for_backward(values, indices, embeddings)


def _fm_interaction_backward(ctx, grad):
    values, indices, embeddings = ctx.saved_tensors
    need_v, _, need_e = ctx.needs_input_grad[:3]
    pad = (None,) * (len(ctx.needs_input_grad) - 3)
    if not (need_v or need_e):
        return (None, None, None) + pad
    gv, ge = _ops.fm_interaction_backward.default(
        grad.contiguous(), values, indices, embeddings, need_v, need_e, check_indices=False
    )
    return ((gv if need_v else None), None, (ge if need_e else None)) + pad


torch.library.register_autograd(
    "dualenc_fast::fm_interaction", _fm_interaction_backward, setup_context=_fm_interaction_setup
)


# --------------------------------------------------------------------------- integration_mlp
def _dropout_args(p: Tensor, dropout_p: float, training: bool, mask: Optional[Tensor]):
    if not (0.0 <= float(dropout_p) <= 1.0):
        raise ValueError(f"dualenc_fast: argument 'dropout_p' must lie in [0, 1], got {dropout_p!r}")
    if not training or dropout_p == 0.0:
        return None, 1.0
    if dropout_p >= 1.0:
        return torch.zeros(p.shape, dtype=torch.bool, device=p.device), 0.0
    if mask is None:
        mask = torch.rand(p.shape, device=p.device) >= dropout_p
    return mask, 1.0 / (1.0 - float(dropout_p))


def integration_mlp_with_hidden(
    p: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """:func:`integration_mlp` that also returns the hidden pre-activation [B, H]."""
    keep, scale = _dropout_args(p, dropout_p, training, mask)
    return _ops.integration_mlp.default(p, w1, b1, w2, b2, keep, scale)


def integration_mlp(
    p: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """``w2 @ ReLU(w1 @ Dropout(p) + b1) + b2`` row-wise.

    p [B, K], w1 [H, K], b1 [H], w2 [d, H], b2 [d] -> [B, d]. In training with
    ``dropout_p > 0`` the bool keep-mask is ``mask`` or drawn from the global
    generator exactly as :func:`dualenc_fast.reference.functional.dropout_mask`
    (so seeded runs match the reference); kept entries scale by 1/(1-dropout_p).
    The backward is one fused op that reapplies the ReLU and dropout masks.
    """
    return integration_mlp_with_hidden(p, w1, b1, w2, b2, dropout_p, training, mask=mask)[0]


@torch.library.register_fake("dualenc_fast::integration_mlp")
def _integration_mlp_fake(p, w1, b1, w2, b2, mask, scale):
    return p.new_empty((p.shape[0], w2.shape[0])), p.new_empty((p.shape[0], w1.shape[0]))


@torch.library.register_fake("dualenc_fast::integration_mlp_backward")
def _integration_mlp_backward_fake(grad_out, grad_hidden, p, hidden_pre, w1, w2, mask, scale):
    return (
        p.new_empty(p.shape),
        w1.new_empty(w1.shape),
        w1.new_empty((w1.shape[0],)),
        w2.new_empty(w2.shape),
        w2.new_empty((w2.shape[0],)),
    )


def _integration_mlp_setup(ctx, inputs, output):
    p, w1, b1, w2, b2, mask, scale = inputs
    ctx.save_for_backward(p, output[1], w1, w2, mask)
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # an unused hidden output passes None, not zeros


def _integration_mlp_backward(ctx, grad_out, grad_hidden):
    p, hidden_pre, w1, w2, mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros(p.shape[0], w2.shape[0], dtype=p.dtype, device=p.device)
    dp, dw1, db1, dw2, db2 = _ops.integration_mlp_backward.default(
        grad_out.contiguous(), grad_hidden, p, hidden_pre, w1, w2, mask, ctx.scale
    )
    need = ctx.needs_input_grad
    pick = lambda g, i: g if need[i] else None  # noqa: E731
    return pick(dp, 0), pick(dw1, 1), pick(db1, 2), pick(dw2, 3), pick(db2, 4), None, None


torch.library.register_autograd(
    "dualenc_fast::integration_mlp", _integration_mlp_backward, setup_context=_integration_mlp_setup
)


# --------------------------------------------------------------------------- topn_reselect
def topn_reselect(values: Tensor, indices: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """Keep the n largest of each row's k active values (n <= k), tie rule as
    everywhere: (values [B, n], indices [B, n])."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"dualenc_fast: argument 'n' must be an int, got {type(n).__name__} {n!r}")
    v, i, _ = _ops.topn_reselect.default(values, indices, n)
    return v, i


@torch.library.register_fake("dualenc_fast::topn_reselect")
def _topn_reselect_fake(values, indices, n):
    torch._check(0 < n <= values.shape[1], lambda: f"topn_reselect: need 0 < n <= k, got n={n}")
    shape = (values.shape[0], n)
    return values.new_empty(shape), indices.new_empty(shape), indices.new_empty(shape)


def _topn_reselect_setup(ctx, inputs, output):
    values = inputs[0]
    ctx.save_for_backward(output[2])
    ctx.k = values.shape[1]
    ctx.mark_non_differentiable(output[1], output[2])


def _topn_reselect_backward(ctx, grad_values, grad_indices, grad_positions):
    (positions,) = ctx.saved_tensors
    if grad_values is None:
        return None, None, None
    full = grad_values.new_zeros((grad_values.shape[0], ctx.k))
    return full.scatter(1, positions, grad_values), None, None


torch.library.register_autograd(
    "dualenc_fast::topn_reselect", _topn_reselect_backward, setup_context=_topn_reselect_setup
)


from . import _autocast  # noqa: E402,F401  (autocast rules for the ops above)
