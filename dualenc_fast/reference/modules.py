"""The research modules, in plain PyTorch, parameter for parameter.

Class names, constructor signatures, parameter names and shapes, initialisation
and forward outputs follow the reference research code (see SPEC.md,
"Reference research code names"), so a state_dict moves between these modules,
the research scripts and :mod:`dualenc_fast`'s fused modules unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as RF


class TopKSparseAutoencoder(nn.Module):
    """TopK SAE: ``encoder.0`` (Linear d->F), ReLU, top-k, ``decoder`` (F->d, no bias).

    ``forward(x)`` returns ``(sparse_features [B, F], reconstruction [B, d])``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, k: int):
        super().__init__()
        if not 0 < k <= hidden_dim:
            raise ValueError(f"k must satisfy 0 < k <= hidden_dim={hidden_dim}, got k={k}")
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.k = k
        self.encoder = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU())
        self.decoder = nn.Linear(hidden_dim, input_dim, bias=False)
        nn.init.kaiming_normal_(self.decoder.weight, mode="fan_in", nonlinearity="relu")
        with torch.no_grad():
            self.encoder[0].weight.copy_(self.decoder.weight.T)
            self.encoder[0].bias.zero_()

    def forward(self, x: torch.Tensor):
        z = self.encoder(x)
        values, indices = RF.select_topk(z, self.k)
        sparse_features = RF.dense_code(values, indices, self.hidden_dim)
        return sparse_features, self.decoder(sparse_features)


class NeuralFactorizationMachine(nn.Module):
    """NFM on a (dense-layout) sparse code: linear part plus FM interaction MLP.

    ``forward(sae_features [B, F])`` returns
    ``(linear_out + interaction_out, linear_out, interaction_out)``.
    With ``top_n`` set, both parts see only the ``top_n`` largest entries of
    each row.
    """

    def __init__(
        self,
        num_sae_features: int,
        embedding_dim: int,
        output_dim: int,
        *,
        top_n: Optional[int] = None,
        dropout: float = 0.15,
    ):
        super().__init__()
        if top_n is not None and top_n <= 0:
            raise ValueError(f"top_n must be a positive int or None, got {top_n}")
        self.num_sae_features = num_sae_features
        self.embedding_dim = embedding_dim
        self.output_dim = output_dim
        self.top_n = top_n
        self.feature_embeddings = nn.Embedding(num_sae_features, embedding_dim)
        self.linear = nn.Linear(num_sae_features, output_dim)
        self.interaction_mlp = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(embedding_dim, embedding_dim),
            nn.ReLU(),
            nn.Linear(embedding_dim, output_dim),
        )
        nn.init.normal_(self.feature_embeddings.weight, std=0.05)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)
        for layer in (self.interaction_mlp[1], self.interaction_mlp[3]):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def forward(self, sae_features: torch.Tensor):
        f = sae_features
        if self.top_n is not None and self.top_n < f.shape[-1]:
            values, indices = RF.select_topk(f, self.top_n)
            f = RF.dense_code(values, indices, f.shape[-1])
        linear_out = self.linear(f)
        V = self.feature_embeddings.weight
        s = f @ V
        q = (f * f) @ (V * V)
        p = 0.5 * (s * s - q)
        interaction_out = self.interaction_mlp(p)
        return linear_out + interaction_out, linear_out, interaction_out


class JointSAENFM(nn.Module):
    """Primary TopK SAE plus an NFM on its code, trained on one MSE loss.

    ``forward(x)`` returns
    ``(recon, sparse_features, sae_recon, linear_out, interaction_out)``.
    """

    def __init__(
        self,
        input_dim: int,
        sae_features: int,
        sae_k: int,
        nfm_embedding_dim: int,
        *,
        top_n: Optional[int] = None,
        dropout: float = 0.15,
    ):
        super().__init__()
        self.primary_sae = TopKSparseAutoencoder(input_dim, sae_features, sae_k)
        self.nfm = NeuralFactorizationMachine(
            sae_features, nfm_embedding_dim, input_dim, top_n=top_n, dropout=dropout
        )

    def forward(self, x: torch.Tensor):
        sparse_features, sae_recon = self.primary_sae(x)
        nfm_out, linear_out, interaction_out = self.nfm(sparse_features)
        return sae_recon + nfm_out, sparse_features, sae_recon, linear_out, interaction_out
