"""Pure-PyTorch oracle for every compiled op in :mod:`dualenc_fast.ops`.

Each function here has exactly the signature of its fused twin and is written
for clarity, not speed. Shapes: ``B`` rows, ``d`` input width, ``F`` features,
``k`` active features per row, ``K`` embedding width.

Tie rule (shared with every kernel): among equal pre-activations the lower
feature index ranks first, and selected values come out sorted by value,
descending, then by feature index, ascending.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F_

Tensor = torch.Tensor


def select_topk(z: Tensor, k: int) -> Tuple[Tensor, Tensor]:
    """The k largest entries of each row of ``z`` under the package tie rule."""
    order = torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.gather(z, -1, order), order


def topk_encode(
    x: Tensor,  # [B, d]
    weight: Tensor,  # [F, d]
    bias: Tensor,  # [F]
    k: int,
    *,
    pre_bias: Optional[Tensor] = None,  # [d]
) -> Tuple[Tensor, Tensor]:
    """``ReLU((x - pre_bias) @ weight.T + bias)``, then the k largest per row.

    Returns ``values [B, k]`` (dtype of x) and ``indices [B, k]`` (int64).
    """
    if pre_bias is not None:
        x = x - pre_bias
    z = F_.relu(x @ weight.T + bias)
    return select_topk(z, k)


def sparse_decode(
    values: Tensor,  # [B, k]
    indices: Tensor,  # [B, k] int64
    weight: Tensor,  # [F, d]
    bias: Optional[Tensor] = None,  # [d]
    *,
    check_indices: bool = True,  # accepted for parity with the ops; indexing checks anyway
) -> Tensor:
    """``out[b] = bias + sum_j values[b, j] * weight[indices[b, j]]`` -> [B, d]."""
    out = (values.unsqueeze(-1) * weight[indices]).sum(dim=-2)
    if bias is not None:
        out = out + bias
    return out


def fm_interaction(
    values: Tensor,  # [B, k]
    indices: Tensor,  # [B, k] int64
    embeddings: Tensor,  # [F, K]
    *,
    check_indices: bool = True,  # accepted for parity with the ops; indexing checks anyway
) -> Tensor:
    """FM pooling ``0.5 * ((sum_i v_i V_i)^2 - sum_i (v_i V_i)^2)`` -> [B, K]."""
    terms = values.unsqueeze(-1) * embeddings[indices]  # [B, k, K]
    s = terms.sum(dim=-2)
    q = (terms * terms).sum(dim=-2)
    return 0.5 * (s * s - q)


def dropout_mask(shape, p: float, *, generator=None, device=None) -> Tensor:
    """A keep-mask (bool) for inverted dropout with drop probability ``p``."""
    return torch.rand(shape, generator=generator, device=device) >= p


def integration_mlp(
    p: Tensor,  # [B, K]
    w1: Tensor,  # [H, K]
    b1: Tensor,  # [H]
    w2: Tensor,  # [d, H]
    b2: Tensor,  # [d]
    dropout_p: float = 0.0,
    training: bool = False,
    *,
    mask: Optional[Tensor] = None,  # [B, K] bool keep-mask
) -> Tensor:
    """``w2 @ ReLU(w1 @ Dropout(p) + b1) + b2`` row-wise -> [B, d].

    In training with ``dropout_p > 0`` the keep-mask is ``mask`` when given,
    otherwise drawn from the global generator; kept entries are scaled by
    ``1 / (1 - dropout_p)`` (inverted dropout, as ``torch.nn.Dropout``).
    """
    if training and dropout_p > 0.0:
        if dropout_p >= 1.0:
            p = torch.zeros_like(p)
        else:
            if mask is None:
                mask = dropout_mask(p.shape, dropout_p, device=p.device)
            p = p * mask.to(p.dtype) / (1.0 - dropout_p)
    hidden = F_.relu(p @ w1.T + b1)
    return hidden @ w2.T + b2


def topn_reselect(values: Tensor, indices: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    """Keep the n largest of the k active values of each row (n <= k).

    Among equal values the lower feature index wins, as everywhere else; the
    kept entries come out sorted by value descending, then index ascending.
    """
    # sort by (value desc, index asc): first by index, then stable by value
    by_index = torch.sort(indices, dim=-1, stable=True)
    v = torch.gather(values, -1, by_index.indices)
    order = torch.sort(v, dim=-1, descending=True, stable=True).indices[..., :n]
    return torch.gather(v, -1, order), torch.gather(by_index.values, -1, order)


def dense_code(values: Tensor, indices: Tensor, num_features: int) -> Tensor:
    """Scatter a sparse code into the dense ``[B, F]`` layout (zeros elsewhere)."""
    out = values.new_zeros(values.shape[:-1] + (num_features,))
    return out.scatter_add(-1, indices, values)


def sparse_weight_grads(
    indices: Tensor,  # [B, k] int64
    values: Tensor,  # [B, k]
    grad_pre: Optional[Tensor],  # [B, k] or None
    grad_dec: Optional[Tensor],  # [B, d] or None
    grad_lin: Optional[Tensor],  # [B, d] or None
    x: Optional[Tensor],  # [B, d] or None
    pre_bias: Optional[Tensor],  # [d] or None
    num_features: int,
    n: int,
    *,
    check_indices: bool = True,  # accepted for parity with the op; index_add_ checks anyway
    sparse_form: int = -1,  # accepted for parity with the op
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The weight gradients of every product of one sparse code, each a sum
    over the pairs (b, j) with ``indices[b, j] = i``:

    - ``dW_dec[i] = sum values[b, j] * grad_dec[b]``  (sparse_decode's dW);
    - ``dW_lin[i]``: the same over the pairs with ``j < n``, with ``grad_lin``
      (the NFM linear part on the code's first n columns);
    - ``dW_enc[i] = sum grad_pre[b, j] * (x[b] - pre_bias)`` and
      ``db_enc[i] = sum grad_pre[b, j]`` (the encoder's, ``grad_pre`` the
      gradient of the selected pre-activations).

    Returns ``(dW_dec [F, d], dW_lin [F, d], dW_enc [F, d], db_enc [F])``; a
    gradient whose input is None is an empty ``[0]`` tensor (dW_enc and db_enc
    need grad_pre and x).
    """
    F = num_features
    flat = indices.reshape(-1)

    def scatter(coef: Tensor, idx: Tensor, rows: Tensor) -> Tensor:  # [B, k'], [B, k'], [B, d] -> [F, d]
        terms = coef.unsqueeze(-1) * rows.unsqueeze(1)  # [B, k', d]
        return rows.new_zeros((F, rows.shape[1])).index_add_(0, idx.reshape(-1), terms.reshape(-1, rows.shape[1]))

    empty = values.new_empty((0,))
    dec = scatter(values, indices, grad_dec) if grad_dec is not None else empty
    lin = scatter(values[:, :n], indices[:, :n], grad_lin) if grad_lin is not None else empty
    if grad_pre is not None and x is not None:
        xe = x - pre_bias if pre_bias is not None else x
        enc = scatter(grad_pre, indices, xe)
        db = values.new_zeros((F,)).index_add_(0, flat, grad_pre.reshape(-1))
    else:
        enc, db = empty, empty
    return dec, lin, enc, db
