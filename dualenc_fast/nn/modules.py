"""Drop-in TopK SAE / NFM / joint modules running on the compiled ops.

Constructor signatures, ``state_dict`` names and shapes, initialisation (same
RNG consumption) and ``forward`` outputs match :mod:`dualenc_fast.reference.modules`,
so a ``state_dict`` moves between the two unchanged. Internally the decoder and
the NFM linear part are stored row-major (``[F, d]``, one row per feature,
the layout the kernels gather); ``state_dict`` hooks present them as the
reference ``[d, F]`` ``decoder.weight`` / ``linear.weight``.

On top of the reference forward (which returns the dense ``[B, F]`` code)
every module has a sparse API that never builds a ``[B, F]`` tensor:
``encode(x) -> SparseCode``, ``decode(code)``, ``forward_sparse(x) -> SparseOutput``.

Peer options (all off by default, so defaults reproduce the reference):
``pre_bias`` (a ``b_dec`` subtracted from x before encoding and added to the
output), ``decoder_bias`` (an output-only bias: the fair "SAE + bias"
baseline), ``unit_norm_decoder`` (unit-norm decoder rows; the trainer calls
:meth:`TopKSparseAutoencoder.remove_parallel_decoder_grad` before and
:meth:`TopKSparseAutoencoder.normalize_decoder` after each optimizer step),
``aux_k`` (AuxK loss on dead features) and ``normalize_input`` (inputs scaled
to unit mean squared norm; the scale is folded back into the weights by
:meth:`save`).
"""
from __future__ import annotations

import copy
import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..reference import functional as RF

Tensor = torch.Tensor

BACKENDS = ("auto", "fused", "reference")
_AUTO_WARNED = False


def resolve_backend(backend: str):
    """``(name, functions)`` for a backend request: ``"fused"`` -> :mod:`dualenc_fast.ops`,
    ``"reference"`` -> :mod:`dualenc_fast.reference.functional`, ``"auto"`` -> fused when
    the compiled extension loads, else reference (warning once per process)."""
    global _AUTO_WARNED
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference", RF
    if backend == "fused":
        from .._ext import require_extension

        require_extension()
        try:
            return "fused", importlib.import_module("dualenc_fast.ops")
        except ImportError as exc:
            raise RuntimeError(
                f"backend='fused' requested but dualenc_fast.ops cannot be imported ({exc}); "
                "use backend='reference'"
            ) from exc
    from .._ext import extension_available

    reason = "the compiled extension dualenc_fast._C is not available"
    if extension_available():
        try:
            return "fused", importlib.import_module("dualenc_fast.ops")
        except ImportError as exc:
            reason = f"dualenc_fast.ops cannot be imported ({exc})"
    if not _AUTO_WARNED:
        _AUTO_WARNED = True
        warnings.warn(
            f"dualenc_fast: backend='auto' falls back to the pure-PyTorch reference ops: {reason}",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference", RF


# --------------------------------------------------------------------------- outputs


def _dense_code_op():
    """The compiled dense_code op (one pass per row, cached memory on CPU), or
    None when the extension is not available."""
    from ._ext import extension_available

    if not extension_available():
        return None
    return importlib.import_module("dualenc_fast.ops").dense_code


@dataclass
class SparseCode:
    """A TopK code stored sparsely: ``values [B, k]``, ``indices [B, k]`` (int64).

    ``trusted`` marks indices made by this package's own selection (``encode``),
    which are in range by construction: the compiled ops then skip their index
    range check, a device sync per call on CUDA. Leave it False for indices
    from elsewhere, and do not modify a trusted code's indices in place.

    ``sorted`` marks rows already ordered by value descending, then index
    ascending (``topk_encode`` returns them so): the NFM's top-N re-selection
    of such a code is its first N columns, taken without a sort.
    """

    values: Tensor
    indices: Tensor
    num_features: int
    trusted: bool = field(default=False, compare=False, repr=False)
    sorted: bool = field(default=False, compare=False, repr=False)

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def dense(self) -> Tensor:
        """The dense ``[B, F]`` code (zeros off the active set); differentiable."""
        if self.values.dim() == 2 and _dense_code_op() is not None:
            return _dense_code_op()(self.values, self.indices, self.num_features, check_indices=not self.trusted)
        return RF.dense_code(self.values, self.indices, self.num_features)

    def detach(self) -> "SparseCode":
        return SparseCode(self.values.detach(), self.indices, self.num_features, self.trusted, self.sorted)

    def l0(self) -> Tensor:
        """Mean number of non-zero entries per row."""
        return (self.values != 0).sum(-1).float().mean()


class SparseOutput(NamedTuple):
    """What ``forward_sparse`` returns; ``linear_out``/``interaction_out`` are None for an SAE."""

    recon: Tensor
    code: SparseCode
    sae_recon: Tensor
    linear_out: Optional[Tensor]
    interaction_out: Optional[Tensor]


class NFMOutput(NamedTuple):
    out: Tensor
    linear_out: Tensor
    interaction_out: Tensor


# --------------------------------------------------------------------------- helpers


def _transpose_weight_on_save(module, state_dict, prefix, local_metadata):
    key = prefix + "weight"
    if key in state_dict:
        state_dict[key] = state_dict[key].t().contiguous()
    return state_dict


def _transpose_weight_on_load(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
    key = prefix + "weight"
    if key in state_dict:
        w = state_dict[key]
        if tuple(w.shape) == (module.out_features, module.in_features):
            state_dict[key] = w.t()


class RowMajorLinear(nn.Module):
    """``y = x @ weight + bias`` with ``weight`` stored as ``[in_features, out_features]``
    (one row per feature). ``state_dict`` shows it as an ``nn.Linear`` (``[out, in]``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self._register_state_dict_hook(_transpose_weight_on_save)
        self._register_load_state_dict_pre_hook(_transpose_weight_on_load, with_module=True)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, row-major"


class _Common:
    """Backend selection plus save/load, shared by all three modules."""

    def _init_backend(self, backend: str) -> None:
        self.backend = backend
        self.backend_name, _ = resolve_backend(backend)

    @property
    def _fn(self):
        """The op functions of the resolved backend (a property, so modules deep-copy and pickle)."""
        if self.backend_name == "reference":
            return RF
        return importlib.import_module("dualenc_fast.ops")

    def set_backend(self, backend: str):
        for m in self.modules():
            if isinstance(m, _Common):
                m._init_backend(backend)
        return self

    def save(self, path) -> None:
        """Write ``path/`` = ``model.safetensors`` (reference names, normalisation
        folded in) + ``config.json``. Atomic per file."""
        from .serialize import save_model

        save_model(self, path)

    @classmethod
    def load(cls, path, *, backend: str = "auto", device="cpu"):
        """Load a model written by :meth:`save` (safetensors + JSON; never unpickles), or the
        model of a training checkpoint or finished run folder (see
        :func:`dualenc_fast.nn.serialize.read_model`)."""
        from .serialize import read_model

        config, state = read_model(path)
        model = build_model(config, backend=backend)
        model.load_state_dict(state)
        model = model.to(device)
        if not isinstance(model, cls):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a {cls.__name__}")
        return model

    def folded(self):
        """A copy with input normalisation folded into the weights (self if none)."""
        if not getattr(self, "normalizes_input", False):
            return self
        other = copy.deepcopy(self)
        other.fold_input_normalization_()
        return other


# --------------------------------------------------------------------------- SAE


class TopKSparseAutoencoder(_Common, nn.Module):
    """TopK SAE, drop-in for the reference module (``encoder.0``, ``decoder``).

    ``forward(x)`` returns ``(sparse_features [B, F], reconstruction [B, d])``.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        k: int,
        *,
        backend: str = "auto",
        pre_bias: bool = False,
        decoder_bias: bool = False,
        unit_norm_decoder: bool = False,
        aux_k: Optional[int] = None,
        aux_coef: float = 1.0 / 32.0,
        normalize_input: bool = False,
    ):
        super().__init__()
        if not 0 < k <= hidden_dim:
            raise ValueError(f"k must satisfy 0 < k <= hidden_dim={hidden_dim}, got k={k}")
        if aux_k is not None and aux_k <= 0:
            raise ValueError(f"aux_k must be a positive int or None, got {aux_k}")
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.k = k
        self.unit_norm_decoder = bool(unit_norm_decoder)
        self.aux_k = aux_k
        self.aux_coef = float(aux_coef)
        # same modules, same order, same RNG draws as the reference
        self.encoder = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU())
        tmp = nn.Linear(hidden_dim, input_dim, bias=False)
        self.decoder = RowMajorLinear(hidden_dim, input_dim, bias=decoder_bias)
        nn.init.kaiming_normal_(tmp.weight, mode="fan_in", nonlinearity="relu")
        with torch.no_grad():
            self.decoder.weight.copy_(tmp.weight.T)
            if self.unit_norm_decoder:
                self._normalize_rows(self.decoder.weight)
            self.encoder[0].weight.copy_(self.decoder.weight)
            self.encoder[0].bias.zero_()
        self.b_dec = nn.Parameter(torch.zeros(input_dim)) if pre_bias else None
        self.normalizes_input = bool(normalize_input)
        if self.normalizes_input:
            self.register_buffer("input_scale", torch.ones(()))
        self._init_backend(backend)

    # ---- views in the reference orientation
    @property
    def W_enc(self) -> Tensor:  # [F, d]
        return self.encoder[0].weight

    @property
    def b_enc(self) -> Tensor:  # [F]
        return self.encoder[0].bias

    @property
    def W_dec(self) -> Tensor:  # [d, F] view (reference orientation)
        return self.decoder.weight.T

    @property
    def W_dec_rows(self) -> Tensor:  # [F, d], one row per feature
        return self.decoder.weight

    def config(self) -> dict:
        return {
            "class": "TopKSparseAutoencoder",
            "args": [self.input_dim, self.hidden_dim, self.k],
            "kwargs": {
                "pre_bias": self.b_dec is not None,
                "decoder_bias": self.decoder.bias is not None,
                "unit_norm_decoder": self.unit_norm_decoder,
                "aux_k": self.aux_k,
                "aux_coef": self.aux_coef,
                "normalize_input": self.normalizes_input,
            },
        }

    # ---- sparse API
    def _scale(self) -> Optional[Tensor]:
        return self.input_scale if self.normalizes_input else None

    def output_bias(self) -> Optional[Tensor]:
        """Everything added to the decoder output: ``b_dec`` + ``decoder.bias``."""
        bias = self.b_dec
        if self.decoder.bias is not None:
            bias = self.decoder.bias if bias is None else bias + self.decoder.bias
        return bias

    def encode(self, x: Tensor) -> SparseCode:
        s = self._scale()
        if s is not None:
            x = x * s
        values, indices = self._fn.topk_encode(x, self.W_enc, self.b_enc, self.k, pre_bias=self.b_dec)
        return SparseCode(values, indices, self.hidden_dim, trusted=True, sorted=True)

    def decode(self, code: SparseCode) -> Tensor:
        out = self._fn.sparse_decode(code.values, code.indices, self.decoder.weight, self.output_bias(),
                                     check_indices=not code.trusted)
        s = self._scale()
        return out if s is None else out / s

    def forward_sparse(self, x: Tensor) -> SparseOutput:
        code = self.encode(x)
        recon = self.decode(code)
        return SparseOutput(recon, code, recon, None, None)

    def forward(self, x: Tensor):
        code = self.encode(x)
        return code.dense(), self.decode(code)

    # ---- unit-norm decoder
    @staticmethod
    def _normalize_rows(w: Tensor) -> None:
        w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale every decoder row (reference: column) to unit norm. Call after ``optimizer.step()``."""
        self._normalize_rows(self.decoder.weight)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Remove from each decoder row's gradient its component along the row.
        Call after ``backward()`` and before ``optimizer.step()``."""
        w, g = self.decoder.weight, self.decoder.weight.grad
        if g is None:
            return
        unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
        g.sub_((g * unit).sum(dim=1, keepdim=True) * unit)

    # ---- pre-encoder bias from data
    @torch.no_grad()
    def init_pre_bias(self, x: Tensor, method: str = "geometric_median", iters: int = 100) -> Tensor:
        """Set ``b_dec`` to the geometric median (Weiszfeld) or mean of a batch ``x``."""
        if self.b_dec is None:
            raise ValueError("init_pre_bias needs a model built with pre_bias=True")
        x = x.detach().float()
        s = self._scale()
        if s is not None:
            x = x * s
        if method == "mean":
            center = x.mean(0)
        elif method == "geometric_median":
            center = geometric_median(x, iters=iters)
        else:
            raise ValueError(f"method must be 'geometric_median' or 'mean', got {method!r}")
        self.b_dec.copy_(center.to(self.b_dec))
        return self.b_dec

    # ---- input normalisation
    @torch.no_grad()
    def fit_input_normalization(self, x: Optional[Tensor] = None, *, mean_squared_norm: Optional[float] = None) -> float:
        """Set the input scale so scaled inputs have unit mean squared norm."""
        if not self.normalizes_input:
            raise ValueError("fit_input_normalization needs a model built with normalize_input=True")
        if mean_squared_norm is None:
            if x is None:
                raise ValueError("pass a batch x or mean_squared_norm")
            mean_squared_norm = float(x.detach().float().pow(2).sum(-1).mean())
        if not mean_squared_norm > 0:
            raise ValueError(f"mean squared norm must be positive, got {mean_squared_norm}")
        self.input_scale.fill_(1.0 / math.sqrt(mean_squared_norm))
        return float(self.input_scale)

    @torch.no_grad()
    def fold_input_normalization_(self) -> float:
        """Fold the input scale into the weights (in place); returns the scale folded."""
        if not self.normalizes_input:
            return 1.0
        s = float(self.input_scale)
        self.W_enc.mul_(s)
        self.decoder.weight.div_(s)
        if self.decoder.bias is not None:
            self.decoder.bias.div_(s)
        if self.b_dec is not None:
            self.b_dec.div_(s)
        del self.input_scale
        self.normalizes_input = False
        self.unit_norm_decoder = self.unit_norm_decoder and s == 1.0
        return s

    # ---- AuxK
    def auxk_loss(self, x: Tensor, residual: Tensor, dead_mask: Tensor) -> Tensor:
        """AuxK (Gao et al. 2024): reconstruct the (detached) residual ``x - recon`` from
        the ``aux_k`` largest pre-activations among dead features; normalised MSE.

        Gradients reach the encoder rows and decoder rows of the dead features.
        Returns a 0-dim tensor (0 when no feature is dead or aux_k is unset)."""
        dead = torch.nonzero(dead_mask.to(self.W_enc.device), as_tuple=False).squeeze(1)
        if self.aux_k is None or dead.numel() == 0:
            return x.new_zeros(())
        s = self._scale()
        if s is not None:
            x = x * s
            residual = residual * s
        residual = residual.detach()
        kk = min(self.aux_k, dead.numel())
        w = self.W_enc.index_select(0, dead)
        b = self.b_enc.index_select(0, dead)
        values, local = self._fn.topk_encode(x, w, b, kk, pre_bias=self.b_dec)
        # dead[local] lies in range by construction
        estimate = self._fn.sparse_decode(values, dead[local], self.decoder.weight, check_indices=False)
        err = (estimate - residual).pow(2).sum(-1).mean()
        scale = residual.pow(2).sum(-1).mean().clamp_min(1e-12)
        return err / scale


def geometric_median(x: Tensor, iters: int = 100, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of distances to the rows of x."""
    y = x.mean(0)
    for _ in range(iters):
        dist = (x - y).norm(dim=1).clamp_min(eps)
        w = 1.0 / dist
        y_new = (w[:, None] * x).sum(0) / w.sum()
        if (y_new - y).norm() <= 1e-7 * (1.0 + y.norm()):
            y = y_new
            break
        y = y_new
    return y


# --------------------------------------------------------------------------- NFM


class NeuralFactorizationMachine(_Common, nn.Module):
    """NFM on a TopK code: linear part plus FM pooling -> integration MLP.

    ``forward(sae_features [B, F])`` returns ``(linear_out + interaction_out,
    linear_out, interaction_out)`` like the reference; ``forward_sparse(code)``
    does the same from a :class:`SparseCode`.
    """

    def __init__(
        self,
        num_sae_features: int,
        embedding_dim: int,
        output_dim: int,
        *,
        top_n: Optional[int] = None,
        dropout: float = 0.15,
        backend: str = "auto",
        interaction: bool = True,
    ):
        super().__init__()
        if top_n is not None and top_n <= 0:
            raise ValueError(f"top_n must be a positive int or None, got {top_n}")
        self.num_sae_features = num_sae_features
        self.embedding_dim = embedding_dim
        self.output_dim = output_dim
        self.top_n = top_n
        # interaction=False: the linear part only (a second decoder on the code), no
        # embeddings and no MLP; interaction_out is zero. A control for the joint model.
        self.interaction = bool(interaction)
        self._dropout_p = float(dropout)
        self.feature_embeddings = nn.Embedding(num_sae_features, embedding_dim) if self.interaction else None
        tmp = nn.Linear(num_sae_features, output_dim)  # same RNG draws as the reference
        self.linear = RowMajorLinear(num_sae_features, output_dim, bias=True)
        self.interaction_mlp = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(embedding_dim, embedding_dim),
            nn.ReLU(),
            nn.Linear(embedding_dim, output_dim),
        ) if self.interaction else None
        if self.interaction:
            nn.init.normal_(self.feature_embeddings.weight, std=0.05)
        nn.init.normal_(tmp.weight, std=0.01)
        for layer in ((self.interaction_mlp[1], self.interaction_mlp[3]) if self.interaction else ()):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.linear.weight.copy_(tmp.weight.T)
            self.linear.bias.zero_()
        self._init_backend(backend)

    @property
    def dropout(self) -> float:
        return float(self.interaction_mlp[0].p) if self.interaction else self._dropout_p

    def config(self) -> dict:
        kwargs = {"top_n": self.top_n, "dropout": self.dropout}
        if not self.interaction:
            kwargs["interaction"] = False
        return {
            "class": "NeuralFactorizationMachine",
            "args": [self.num_sae_features, self.embedding_dim, self.output_dim],
            "kwargs": kwargs,
        }

    def _mlp(self, p: Tensor) -> Tensor:
        m = self.interaction_mlp
        return self._fn.integration_mlp(
            p, m[1].weight, m[1].bias, m[3].weight, m[3].bias, self.dropout, self.training
        )

    def forward_sparse(self, code: SparseCode) -> NFMOutput:
        values, indices = code.values, code.indices
        if self.top_n is not None and self.top_n < values.shape[-1]:
            if code.sorted:  # rows ordered as topn_reselect orders them: the first N columns
                values, indices = values[..., : self.top_n], indices[..., : self.top_n]
            else:
                values, indices = self._fn.topn_reselect(values, indices, self.top_n)
        check = not code.trusted  # top-N re-selection keeps a subset of the indices
        linear_out = self._fn.sparse_decode(values, indices, self.linear.weight, self.linear.bias,
                                            check_indices=check)
        if not self.interaction:
            return NFMOutput(linear_out, linear_out, torch.zeros_like(linear_out))
        p = self._fn.fm_interaction(values, indices, self.feature_embeddings.weight, check_indices=check)
        interaction_out = self._mlp(p)
        return NFMOutput(linear_out + interaction_out, linear_out, interaction_out)

    def forward(self, sae_features: Tensor):
        f = sae_features
        if torch.is_grad_enabled() and f.requires_grad:
            # dense path: the reference's gradient w.r.t. every entry of f, zeros included
            if self.top_n is not None and self.top_n < f.shape[-1]:
                v, i = RF.select_topk(f, self.top_n)
                f = RF.dense_code(v, i, f.shape[-1])
            linear_out = f @ self.linear.weight + self.linear.bias
            if not self.interaction:
                return linear_out, linear_out, torch.zeros_like(linear_out)
            V = self.feature_embeddings.weight
            s = f @ V
            p = 0.5 * (s * s - (f * f) @ (V * V))
            interaction_out = self._mlp(p)
            return linear_out + interaction_out, linear_out, interaction_out
        width = int((f != 0).sum(-1).max()) if f.numel() else 0
        if self.top_n is not None:
            width = min(width, self.top_n)
        width = max(1, min(width, f.shape[-1]))
        values, indices = RF.select_topk(f, width)
        return tuple(self.forward_sparse(SparseCode(values, indices, f.shape[-1], trusted=True, sorted=True)))

    @torch.no_grad()
    def _scale_outputs_(self, factor: float) -> None:
        self.linear.weight.mul_(factor)
        self.linear.bias.mul_(factor)
        if self.interaction:
            self.interaction_mlp[3].weight.mul_(factor)
            self.interaction_mlp[3].bias.mul_(factor)


# --------------------------------------------------------------------------- joint


class JointSAENFM(_Common, nn.Module):
    """Primary TopK SAE plus an NFM on its code: ``recon = sae_recon + linear_out + interaction_out``.

    ``forward(x)`` returns ``(recon, sparse_features [B, F], sae_recon, linear_out,
    interaction_out)`` like the reference; ``forward_sparse(x)`` returns a
    :class:`SparseOutput` with the code kept sparse. Extra keyword arguments
    (``pre_bias``, ``decoder_bias``, ``unit_norm_decoder``, ``aux_k``, ``aux_coef``,
    ``normalize_input``) go to the primary SAE.
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
        backend: str = "auto",
        interaction: bool = True,
        **sae_options,
    ):
        super().__init__()
        self.primary_sae = TopKSparseAutoencoder(input_dim, sae_features, sae_k, backend=backend, **sae_options)
        self.nfm = NeuralFactorizationMachine(
            sae_features, nfm_embedding_dim, input_dim, top_n=top_n, dropout=dropout, backend=backend,
            interaction=interaction,
        )
        self._init_backend(backend)

    @property
    def normalizes_input(self) -> bool:
        return self.primary_sae.normalizes_input

    def config(self) -> dict:
        sae = self.primary_sae.config()
        return {
            "class": "JointSAENFM",
            "args": [self.primary_sae.input_dim, self.primary_sae.hidden_dim, self.primary_sae.k,
                     self.nfm.embedding_dim],
            "kwargs": {"top_n": self.nfm.top_n, "dropout": self.nfm.dropout, **sae["kwargs"],
                       **({} if self.nfm.interaction else {"interaction": False})},
        }

    def encode(self, x: Tensor) -> SparseCode:
        return self.primary_sae.encode(x)

    def decode(self, code: SparseCode) -> Tensor:
        """Full reconstruction from a code: SAE decoder + NFM."""
        return self._decode_parts(code)[0]

    def _decode_parts(self, code: SparseCode):
        sae_recon = self.primary_sae.decode(code)
        _, linear_out, interaction_out = self.nfm.forward_sparse(code)
        s = self.primary_sae._scale()
        if s is not None:
            linear_out = linear_out / s
            interaction_out = interaction_out / s
        return sae_recon + linear_out + interaction_out, sae_recon, linear_out, interaction_out

    def forward_sparse(self, x: Tensor) -> SparseOutput:
        code = self.encode(x)
        recon, sae_recon, linear_out, interaction_out = self._decode_parts(code)
        return SparseOutput(recon, code, sae_recon, linear_out, interaction_out)

    def forward(self, x: Tensor):
        out = self.forward_sparse(x)
        return out.recon, out.code.dense(), out.sae_recon, out.linear_out, out.interaction_out

    def auxk_loss(self, x: Tensor, residual: Tensor, dead_mask: Tensor) -> Tensor:
        return self.primary_sae.auxk_loss(x, residual, dead_mask)

    @torch.no_grad()
    def fold_input_normalization_(self) -> float:
        s = self.primary_sae.fold_input_normalization_()
        if s != 1.0:
            self.nfm._scale_outputs_(1.0 / s)
        return s


@torch.no_grad()
def fold_standardization_(model: nn.Module, mean: Tensor, std: Tensor) -> nn.Module:
    """Fold a per-dimension standardisation ``z = (x - mean) / std`` into a model trained on ``z``.

    Afterwards ``model(x) == std * model_before((x - mean) / std) + mean`` for raw ``x``:
    same top-k selection (the encoder's pre-activations are unchanged), outputs in raw
    units. ``W_enc`` columns are divided by ``std``; ``b_enc`` absorbs ``-W_enc' @ mean``
    (or, with a pre-encoder bias, ``b_dec' = mean + std * b_dec``); decoder, NFM linear
    and interaction output rows are multiplied by ``std``; ``mean`` becomes part of the
    output bias (a decoder bias is added when the SAE had none). In place; returns ``model``.
    """
    sae = model.primary_sae if isinstance(model, JointSAENFM) else model
    if not isinstance(sae, TopKSparseAutoencoder):
        raise ValueError(f"fold_standardization_ needs a TopKSparseAutoencoder or JointSAENFM, got {type(model).__name__}")
    if sae.normalizes_input:
        raise ValueError("fold the input normalisation first (fold_input_normalization_): the two are not combined")
    w = sae.W_enc
    mean = torch.as_tensor(mean).to(w)
    std = torch.as_tensor(std).to(w)
    if mean.shape != (sae.input_dim,) or std.shape != (sae.input_dim,):
        raise ValueError(f"mean and std must have shape ({sae.input_dim},), got {tuple(mean.shape)} and {tuple(std.shape)}")
    if not bool((std > 0).all()):
        raise ValueError("std must be positive in every dimension")
    w.div_(std)  # [F, d]: column j scaled by 1 / std_j
    dec = sae.decoder
    if sae.b_dec is not None:
        sae.b_dec.mul_(std).add_(mean)
        out_shift = torch.zeros_like(mean)
    else:
        sae.b_enc.sub_(w @ mean)
        out_shift = mean
    if dec.bias is None:
        new = RowMajorLinear(dec.in_features, dec.out_features, bias=True).to(w)
        new.weight.copy_(dec.weight)
        sae.decoder = dec = new
    dec.weight.mul_(std)  # [F, d] row-major: every feature's output scaled per dimension
    dec.bias.mul_(std).add_(out_shift)
    if sae.unit_norm_decoder:
        sae.unit_norm_decoder = False  # the folded rows are no longer unit norm
    if isinstance(model, JointSAENFM):
        nfm = model.nfm
        nfm.linear.weight.mul_(std)
        nfm.linear.bias.mul_(std)
        if nfm.interaction:
            nfm.interaction_mlp[3].weight.mul_(std[:, None])
            nfm.interaction_mlp[3].bias.mul_(std)
    return model


MODEL_CLASSES = {
    "TopKSparseAutoencoder": TopKSparseAutoencoder,
    "NeuralFactorizationMachine": NeuralFactorizationMachine,
    "JointSAENFM": JointSAENFM,
}


def build_model(config: dict, *, backend: str = "auto") -> nn.Module:
    """Instantiate a module from its ``config()`` dict."""
    name = config.get("class")
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown model class {name!r}; expected one of {sorted(MODEL_CLASSES)}")
    return MODEL_CLASSES[name](*config.get("args", []), backend=backend, **config.get("kwargs", {}))


__all__ = [
    "BACKENDS",
    "JointSAENFM",
    "NeuralFactorizationMachine",
    "NFMOutput",
    "RowMajorLinear",
    "SparseCode",
    "SparseOutput",
    "TopKSparseAutoencoder",
    "build_model",
    "fold_standardization_",
    "geometric_median",
    "resolve_backend",
]
