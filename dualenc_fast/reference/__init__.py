"""Pure-PyTorch reference: the oracle every compiled kernel is tested against.

Nothing here imports compiled code.
"""
from . import functional
from .functional import (
    dense_code,
    fm_interaction,
    integration_mlp,
    select_topk,
    sparse_decode,
    sparse_weight_grads,
    topk_encode,
    topn_reselect,
)
from .modules import JointSAENFM, NeuralFactorizationMachine, TopKSparseAutoencoder

__all__ = [
    "functional",
    "dense_code",
    "fm_interaction",
    "integration_mlp",
    "select_topk",
    "sparse_decode",
    "sparse_weight_grads",
    "topk_encode",
    "topn_reselect",
    "JointSAENFM",
    "NeuralFactorizationMachine",
    "TopKSparseAutoencoder",
]
