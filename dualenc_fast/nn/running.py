"""Running any model on activations: device and dtype, evaluation mode, batches.

Shared by :mod:`dualenc_fast.eval` and :mod:`dualenc_fast.analysis`; works on
the fused modules, the reference modules and any ``[B, d] -> ...`` module.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator, Optional, Union

import torch
from torch import nn

Tensor = torch.Tensor
Activations = Union[Tensor, Iterable[Tensor]]


def model_device_dtype(model) -> tuple:
    """``(device, dtype)`` of a module's first floating parameter (CPU/float32 if none)."""
    if isinstance(model, nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.device, p.dtype
    return torch.device("cpu"), torch.float32


@contextmanager
def eval_mode(model):
    """Evaluation mode (dropout off) and no autograd, restoring the training flag."""
    was = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        if isinstance(model, nn.Module):
            model.train(was)


def iter_batches(activations: Activations, batch_size: int = 1024,
                 max_rows: Optional[int] = None) -> Iterator[Tensor]:
    """``[B, d]`` batches from a tensor (chunked) or an iterable of batches."""
    seen = 0
    if isinstance(activations, torch.Tensor):
        source: Iterable[Tensor] = activations.split(batch_size)
    else:
        source = activations
    for batch in source:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        batch = torch.as_tensor(batch)
        batch = batch.reshape(-1, batch.shape[-1])
        if max_rows is not None:
            if seen >= max_rows:
                return
            batch = batch[: max_rows - seen]
        seen += batch.shape[0]
        yield batch
