"""Weight analysis of trained SAE / joint SAE+NFM models (SPEC, "The paper's measurements").

* :func:`norm_bimodality` - squared norms of the decoder columns (the Gram
  diagonal) and a statistical decision whether they are bimodal.
* :func:`contribution_norms`, :func:`group_comparison`, :func:`correlations`,
  :func:`feature_analysis` - per-feature ``||W_dec[:, i]||``, ``||W_lin[:, i]||``,
  ``||V[i]||``, their shares of the total, compared between norm groups.
* :func:`gram_offdiagonal_stats` - statistics of the off-diagonal entries of
  ``W_dec.T @ W_dec`` (and of the cosine Gram), computed in row blocks so an
  ``F x F`` matrix never exists in memory.
* :func:`pca_summary` - PCA of the per-feature weight vectors (components for
  90% of the variance), from a blocked ``d x d`` covariance.

The bimodality decision
-----------------------
Two tests must agree (both thresholds are arguments):

1. **Gaussian mixture, 1 vs 2 components, by BIC.**  ``delta_bic = BIC_1 -
   BIC_2`` must exceed ``min_delta_bic`` (default 10: "very strong" evidence on
   the Kass-Raftery scale).  BIC alone over-calls bimodality on skewed
   unimodal data (squared norms are positive and right-skewed), hence:
2. **Hartigan's dip test** of unimodality (Hartigan & Hartigan 1985): the dip
   statistic is computed exactly (our own implementation of the Hartigan
   algorithm, GCM/LCM of the empirical CDF); its p-value is a Monte-Carlo
   estimate against the uniform distribution, the least favourable unimodal
   null. For ``n > dip_ref_n`` (default 2000) the null is simulated at
   ``dip_ref_n`` and compared on the ``sqrt(n) * dip`` scale, which converges
   in distribution (Hartigan 1985); the p-value has the usual ``(1 + #{sim >=
   obs}) / (1 + n_sim)`` form, so its floor is ``1 / (1 + n_sim)``.  The dip
   p-value must be below ``alpha`` (default 0.05).

``bimodal = (delta_bic > min_delta_bic) and (dip_p_value < alpha)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch

Tensor = torch.Tensor

DEFAULT_THRESHOLD = 0.2  # squared-norm group threshold used in the paper


# ----------------------------------------------------------------------------
# weight access
# ----------------------------------------------------------------------------

def _as_tensor(w) -> Tensor:
    if isinstance(w, torch.Tensor):
        return w.detach()
    return torch.as_tensor(np.asarray(w))


def decoder_weight(model_or_weight) -> Tensor:
    """The primary SAE decoder ``W_dec [d, F]`` of a model, or the weight itself.

    Accepts a ``[d, F]`` tensor/array, a joint model (``primary_sae.decoder``),
    an SAE (``decoder``) or a state_dict holding either key.
    """
    obj = model_or_weight
    if isinstance(obj, dict):
        for key in ("primary_sae.decoder.weight", "decoder.weight"):
            if key in obj:
                return _as_tensor(obj[key])
        raise ValueError("state_dict has no primary_sae.decoder.weight / decoder.weight")
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        w = _as_tensor(obj)
        if w.dim() != 2:
            raise ValueError(f"decoder weight must be 2-D [d, F], got shape {tuple(w.shape)}")
        return w
    obj = _folded(obj)
    sae = getattr(obj, "primary_sae", obj)
    if isinstance(getattr(type(sae), "W_dec", None), property):
        return _as_tensor(sae.W_dec)  # fused modules: a [d, F] view of row-major storage
    dec = getattr(sae, "decoder", None)
    if dec is None:
        raise ValueError(f"{type(obj).__name__} has no primary_sae.decoder / decoder")
    return _linear_weight(dec)


def _folded(model):
    """Fused modules trained with input normalisation: the copy with it folded in."""
    fold = getattr(model, "folded", None)
    return fold() if callable(fold) and getattr(model, "normalizes_input", False) else model


def _linear_weight(layer) -> Tensor:
    """A linear layer's weight in ``nn.Linear`` orientation ``[out, in]``.

    Row-major layers (``weight`` stored ``[in, out]``, as the fused modules'
    ``RowMajorLinear``) are returned transposed (a view, no copy).
    """
    w = layer.weight if hasattr(layer, "weight") else layer
    if isinstance(layer, torch.nn.Linear) or not hasattr(layer, "in_features"):
        return _as_tensor(w)
    if tuple(w.shape) == (layer.in_features, layer.out_features):
        return _as_tensor(w).T
    return _as_tensor(w)


def nfm_weights(model) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``(W_lin [d, F], V [F, K])`` of a joint model, ``(None, None)`` without an NFM."""
    if isinstance(model, dict):
        lin = model.get("nfm.linear.weight")
        emb = model.get("nfm.feature_embeddings.weight")
        return (None if lin is None else _as_tensor(lin), None if emb is None else _as_tensor(emb))
    nfm = getattr(_folded(model), "nfm", None)
    if nfm is None:
        return None, None
    emb = getattr(nfm, "feature_embeddings", None)  # None: an NFM without the interaction path
    return _linear_weight(nfm.linear), None if emb is None else _as_tensor(emb.weight)


def column_norms(weight: Tensor, *, squared: bool = False, block: int = 8192) -> np.ndarray:
    """Norms of the columns of ``weight [d, F]`` (float64, computed in column blocks)."""
    w = _as_tensor(weight)
    out = np.empty(w.shape[1], dtype=np.float64)
    for s in range(0, w.shape[1], block):
        cols = w[:, s:s + block].to(torch.float64)
        out[s:s + cols.shape[1]] = (cols * cols).sum(0).cpu().numpy()
    return out if squared else np.sqrt(out)


def squared_norms(model_or_decoder_weight) -> np.ndarray:
    """``||W_dec[:, i]||^2`` for every feature: the diagonal of the decoder Gram."""
    return column_norms(decoder_weight(model_or_decoder_weight), squared=True)


# ----------------------------------------------------------------------------
# 1-D Gaussian mixture (EM) and BIC
# ----------------------------------------------------------------------------

@dataclass
class GaussianMixture1D:
    weights: np.ndarray
    means: np.ndarray
    stds: np.ndarray
    log_likelihood: float
    bic: float
    n_iter: int
    converged: bool

    @property
    def n_components(self) -> int:
        return len(self.weights)

    def pdf(self, x: np.ndarray) -> np.ndarray:
        """Mixture density at ``x`` (sum of weighted component densities)."""
        return self.component_pdfs(x).sum(axis=0)

    def component_pdfs(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        return np.stack([w * _normal_pdf(x, m, s) for w, m, s in zip(self.weights, self.means, self.stds)])

    def to_dict(self) -> Dict[str, Any]:
        return {
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "stds": self.stds.tolist(),
            "log_likelihood": self.log_likelihood,
            "bic": self.bic,
            "n_iter": self.n_iter,
            "converged": self.converged,
        }


def _normal_pdf(x, m, s):
    return np.exp(-0.5 * ((x - m) / s) ** 2) / (s * math.sqrt(2 * math.pi))


def _normal_logpdf(x, m, s):
    return -0.5 * ((x - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)


def fit_gaussian_mixture(
    x, n_components: int = 2, *, n_init: int = 5, max_iter: int = 500, tol: float = 1e-8,
    seed: int = 0, min_std_frac: float = 1e-4,
) -> GaussianMixture1D:
    """Maximum-likelihood 1-D Gaussian mixture by EM (best of ``n_init`` starts).

    Starts: quantile-spread means plus random data points. Each component's
    standard deviation is floored at ``min_std_frac * std(x)`` to avoid the
    degenerate zero-variance optimum. ``bic = p log n - 2 log L`` with
    ``p = 3 * n_components - 1`` free parameters.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    if n < 2:
        raise ValueError("need at least 2 points to fit a mixture")
    sd = float(x.std()) or 1.0
    floor = min_std_frac * sd
    n_params = 3 * n_components - 1
    if n_components == 1:
        s = max(float(x.std()), floor)
        ll = float(_normal_logpdf(x, float(x.mean()), s).sum())
        return GaussianMixture1D(np.ones(1), np.array([float(x.mean())]), np.array([s]), ll,
                                 n_params * math.log(n) - 2 * ll, 0, True)
    rng = np.random.default_rng(seed)
    starts = [np.quantile(x, (np.arange(n_components) + 0.5) / n_components)]
    for _ in range(max(0, n_init - 1)):
        starts.append(np.sort(rng.choice(x, n_components, replace=False)))
    best = None
    for mu0 in starts:
        mu = np.array(mu0, dtype=np.float64)
        sig = np.full(n_components, sd / n_components)
        w = np.full(n_components, 1.0 / n_components)
        prev = -np.inf
        converged = False
        for it in range(1, max_iter + 1):
            logp = np.stack([math.log(max(w[c], 1e-300)) + _normal_logpdf(x, mu[c], sig[c])
                             for c in range(n_components)])  # [C, n]
            mx = logp.max(axis=0)
            lse = mx + np.log(np.exp(logp - mx).sum(axis=0))
            ll = float(lse.sum())
            resp = np.exp(logp - lse)
            nk = resp.sum(axis=1) + 1e-12
            w = nk / n
            mu = (resp @ x) / nk
            var = np.array([(resp[c] * (x - mu[c]) ** 2).sum() / nk[c] for c in range(n_components)])
            sig = np.maximum(np.sqrt(var), floor)
            if abs(ll - prev) <= tol * max(1.0, abs(ll)):
                converged = True
                break
            prev = ll
        # final likelihood at the final parameters
        logp = np.stack([math.log(max(w[c], 1e-300)) + _normal_logpdf(x, mu[c], sig[c])
                         for c in range(n_components)])
        mx = logp.max(axis=0)
        ll = float((mx + np.log(np.exp(logp - mx).sum(axis=0))).sum())
        if best is None or ll > best[0]:
            best = (ll, w.copy(), mu.copy(), sig.copy(), it, converged)
    ll, w, mu, sig, it, converged = best
    order = np.argsort(mu)
    return GaussianMixture1D(w[order], mu[order], sig[order], ll, n_params * math.log(n) - 2 * ll,
                             it, converged)


def mixture_split(gmm: GaussianMixture1D) -> float:
    """The point between the two component means where the posteriors are equal.

    Falls back to the midpoint of the means when the equal-posterior equation
    has no root between them.
    """
    (w1, w2), (m1, m2), (s1, s2) = gmm.weights, gmm.means, gmm.stds
    # log w1 N(x; m1, s1) = log w2 N(x; m2, s2)  ->  a x^2 + b x + c = 0
    a = 0.5 / s2 ** 2 - 0.5 / s1 ** 2
    b = m1 / s1 ** 2 - m2 / s2 ** 2
    c = (0.5 * m2 ** 2 / s2 ** 2 - 0.5 * m1 ** 2 / s1 ** 2
         + math.log(w1 / s1) - math.log(w2 / s2))
    if abs(a) < 1e-12:
        roots = [-c / b] if abs(b) > 1e-300 else []
    else:
        disc = b * b - 4 * a * c
        roots = [] if disc < 0 else [(-b + sgn * math.sqrt(disc)) / (2 * a) for sgn in (1, -1)]
    inside = [r for r in roots if m1 <= r <= m2]
    if inside:
        return float(min(inside, key=lambda r: abs(r - 0.5 * (m1 + m2))))
    return float(0.5 * (m1 + m2))


# ----------------------------------------------------------------------------
# Hartigan's dip test
# ----------------------------------------------------------------------------

def dip_statistic(x) -> float:
    """Hartigan's dip statistic of a 1-D sample (in CDF units, in ``[1/(2n), 1/4]``).

    The dip is the sup-distance between the empirical CDF and the closest
    unimodal CDF. Computed with the Hartigan & Hartigan (1985) algorithm:
    alternately take the greatest convex minorant (GCM) and least concave
    majorant (LCM) of the empirical CDF on the current modal interval
    ``[low, high]``, find the largest GCM-LCM gap, shrink the interval, until
    the gap no longer exceeds the running dip.
    """
    xs = np.sort(np.asarray(x, dtype=np.float64).ravel())
    n = xs.size
    if n < 2 or xs[0] == xs[-1]:
        return 0.0 if n < 1 else 1.0 / (2 * n)
    # 1-based arrays, index 0 unused
    X = np.concatenate(([0.0], xs))
    X_l = X.tolist()
    mn = [0] * (n + 1)
    mj = [0] * (n + 1)
    # mn[j]: the previous vertex of the GCM of points 1..j
    mn[1] = 1
    for j in range(2, n + 1):
        mn[j] = j - 1
        while True:
            mnj = mn[j]
            mnmnj = mn[mnj]
            if mnj == 1 or (X_l[j] - X_l[mnj]) * (mnj - mnmnj) < (X_l[mnj] - X_l[mnmnj]) * (j - mnj):
                break
            mn[j] = mnmnj
    # mj[k]: the next vertex of the LCM of points k..n
    mj[n] = n
    for k in range(n - 1, 0, -1):
        mj[k] = k + 1
        while True:
            mjk = mj[k]
            mjmjk = mj[mjk]
            if mjk == n or (X_l[k] - X_l[mjk]) * (mjk - mjmjk) < (X_l[mjk] - X_l[mjmjk]) * (k - mjk):
                break
            mj[k] = mjmjk

    dip = 1.0  # in units of 1/n counts; the final dip is dip / (2n)
    low, high = 1, n
    while True:
        # GCM change points from high down to low
        gcm = [0, high]
        while gcm[-1] > low:
            gcm.append(mn[gcm[-1]])
        l_gcm = len(gcm) - 1
        # LCM change points from low up to high
        lcm = [0, low]
        while lcm[-1] < high:
            lcm.append(mj[lcm[-1]])
        l_lcm = len(lcm) - 1

        ig, ih = l_gcm, l_lcm
        ix, iv = l_gcm - 1, 2
        d = 0.0
        if l_gcm != 2 or l_lcm != 2:
            while True:
                gcmix, lcmiv = gcm[ix], lcm[iv]
                if gcmix > lcmiv:
                    # the next LCM vertex lies under this GCM segment
                    gcmi1 = gcm[ix + 1]
                    dx = (lcmiv - gcmi1 + 1) - (X_l[lcmiv] - X_l[gcmi1]) * (gcmix - gcmi1) / (X_l[gcmix] - X_l[gcmi1])
                    iv += 1
                    if dx >= d:
                        d, ig, ih = dx, ix + 1, iv - 1
                else:
                    # the next GCM vertex lies under this LCM segment
                    lcmiv1 = lcm[iv - 1]
                    dx = (X_l[gcmix] - X_l[lcmiv1]) * (lcmiv - lcmiv1) / (X_l[lcmiv] - X_l[lcmiv1]) - (gcmix - lcmiv1 - 1)
                    ix -= 1
                    if dx >= d:
                        d, ig, ih = dx, ix + 1, iv
                if ix < 1:
                    ix = 1
                if iv > l_lcm:
                    iv = l_lcm
                if gcm[ix] == lcm[iv]:
                    break
        else:
            d = 1.0
        if d < dip:
            break
        # dip of the GCM on its part left of the modal interval
        dip_l = 0.0
        for j in range(ig, l_gcm):
            jb, je = gcm[j + 1], gcm[j]
            max_t = 1.0
            if je - jb > 1 and X_l[je] != X_l[jb]:
                c = (je - jb) / (X_l[je] - X_l[jb])
                jj = np.arange(jb, je + 1)
                t = (jj - jb + 1) - (X[jb:je + 1] - X_l[jb]) * c
                max_t = max(max_t, float(t.max()))
            dip_l = max(dip_l, max_t)
        # dip of the LCM on its part right of the modal interval
        dip_u = 0.0
        for j in range(ih, l_lcm):
            jb, je = lcm[j], lcm[j + 1]
            max_t = 1.0
            if je - jb > 1 and X_l[je] != X_l[jb]:
                c = (je - jb) / (X_l[je] - X_l[jb])
                jj = np.arange(jb, je + 1)
                t = (X[jb:je + 1] - X_l[jb]) * c - (jj - jb - 1)
                max_t = max(max_t, float(t.max()))
            dip_u = max(dip_u, max_t)
        dip = max(dip, dip_l, dip_u)
        if low == gcm[ig] and high == lcm[ih]:
            break
        low, high = gcm[ig], lcm[ih]
    return dip / (2 * n)


_DIP_NULL_CACHE: Dict[Tuple[int, int, int], np.ndarray] = {}


def _dip_null(n: int, n_sim: int, seed: int) -> np.ndarray:
    key = (n, n_sim, seed)
    if key not in _DIP_NULL_CACHE:
        rng = np.random.default_rng(seed)
        _DIP_NULL_CACHE[key] = np.sort([dip_statistic(rng.random(n)) for _ in range(n_sim)])
    return _DIP_NULL_CACHE[key]


@dataclass
class DipTest:
    dip: float
    p_value: float
    n: int
    n_sim: int
    ref_n: int

    def to_dict(self) -> Dict[str, Any]:
        return dict(dip=self.dip, p_value=self.p_value, n=self.n, n_sim=self.n_sim, ref_n=self.ref_n)


def dip_test(x, *, n_sim: int = 500, ref_n: int = 2000, seed: int = 0) -> DipTest:
    """Hartigan's dip test of unimodality with a Monte-Carlo (uniform-null) p-value.

    For ``n > ref_n`` the null distribution is simulated at ``ref_n`` samples
    and compared on the ``sqrt(n) * dip`` scale (asymptotic approximation).
    Null simulations are cached per ``(size, n_sim, seed)``.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    n = x.size
    d = dip_statistic(x)
    m = min(n, ref_n)
    null = _dip_null(m, n_sim, seed)
    obs = d * math.sqrt(n / m)
    count = int(null.size - np.searchsorted(null, obs - 1e-15, side="left"))
    return DipTest(dip=d, p_value=(1 + count) / (1 + n_sim), n=n, n_sim=n_sim, ref_n=m)


# ----------------------------------------------------------------------------
# norm bimodality
# ----------------------------------------------------------------------------

@dataclass
class BimodalityResult:
    """Outcome of :func:`norm_bimodality`. ``low``/``high`` refer to the two
    mixture components, ordered by mean."""

    squared_norms: np.ndarray
    bimodal: bool
    gmm1: GaussianMixture1D
    gmm2: GaussianMixture1D
    dip: DipTest
    split: float
    alpha: float
    min_delta_bic: float
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def delta_bic(self) -> float:
        return self.gmm1.bic - self.gmm2.bic

    @property
    def group_means(self) -> Tuple[float, float]:
        """Means of the low and high mixture components."""
        return float(self.gmm2.means[0]), float(self.gmm2.means[1])

    @property
    def group_fractions(self) -> Tuple[float, float]:
        """Weights of the low and high mixture components."""
        return float(self.gmm2.weights[0]), float(self.gmm2.weights[1])

    @property
    def split_fractions(self) -> Tuple[float, float]:
        """Fractions of features below / above the fitted split."""
        low = float((self.squared_norms < self.split).mean())
        return low, 1.0 - low

    @property
    def split_means(self) -> Tuple[float, float]:
        """Empirical mean squared norm below / above the fitted split."""
        sq = self.squared_norms
        lo, hi = sq[sq < self.split], sq[sq >= self.split]
        return (float(lo.mean()) if lo.size else float("nan"), float(hi.mean()) if hi.size else float("nan"))

    @property
    def ashman_d(self) -> float:
        """Ashman's D of the two components (> 2: clean separation)."""
        (m1, m2), (s1, s2) = self.gmm2.means, self.gmm2.stds
        return float(math.sqrt(2.0) * abs(m2 - m1) / math.sqrt(s1 ** 2 + s2 ** 2))

    def to_dict(self, include_norms: bool = False) -> Dict[str, Any]:
        sq = self.squared_norms
        out = {
            "bimodal": bool(self.bimodal),
            "n_features": int(sq.size),
            "mean": float(sq.mean()),
            "std": float(sq.std()),
            "median": float(np.median(sq)),
            "group_means": list(self.group_means),
            "group_fractions": list(self.group_fractions),
            "split": self.split,
            "split_means": list(self.split_means),
            "split_fractions": list(self.split_fractions),
            "fraction_below_0.2": float((sq < DEFAULT_THRESHOLD).mean()),
            "ashman_d": self.ashman_d,
            "bic_1": self.gmm1.bic,
            "bic_2": self.gmm2.bic,
            "delta_bic": self.delta_bic,
            "dip": self.dip.to_dict(),
            "gmm1": self.gmm1.to_dict(),
            "gmm2": self.gmm2.to_dict(),
            "decision_rule": (f"bimodal iff BIC_1 - BIC_2 > {self.min_delta_bic:g} "
                              f"and dip-test p < {self.alpha:g}"),
            **self.extra,
        }
        if include_norms:
            out["squared_norms"] = sq.tolist()
        return out

    def summary(self) -> str:
        lo, hi = self.group_means
        wl, wh = self.group_fractions
        verdict = "BIMODAL" if self.bimodal else "not bimodal"
        return (f"{verdict}: dBIC={self.delta_bic:.1f}, dip={self.dip.dip:.4f} (p={self.dip.p_value:.3g}); "
                f"groups mean {lo:.3f} ({wl:.1%}) / {hi:.3f} ({wh:.1%}), split {self.split:.3f}")


def norm_bimodality(
    model_or_decoder_weight, *, alpha: float = 0.05, min_delta_bic: float = 10.0,
    n_sim: int = 500, ref_n: int = 2000, n_init: int = 5, seed: int = 0,
) -> BimodalityResult:
    """Are the decoder columns' squared norms bimodal?

    ``model_or_decoder_weight``: a joint model, an SAE, a state_dict, or a
    ``[d, F]`` weight; or a 1-D array of squared norms directly.
    Decision: ``BIC_1 - BIC_2 > min_delta_bic`` and dip-test ``p < alpha``
    (see the module docstring).
    """
    obj = model_or_decoder_weight
    if isinstance(obj, (np.ndarray, torch.Tensor)) and _as_tensor(obj).dim() == 1:
        sq = _as_tensor(obj).to(torch.float64).cpu().numpy()
    else:
        sq = squared_norms(obj)
    if sq.size < 4:
        raise ValueError("need at least 4 features for a bimodality test")
    g1 = fit_gaussian_mixture(sq, 1)
    g2 = fit_gaussian_mixture(sq, 2, n_init=n_init, seed=seed)
    dip = dip_test(sq, n_sim=n_sim, ref_n=ref_n, seed=seed)
    split = mixture_split(g2)
    bimodal = bool((g1.bic - g2.bic) > min_delta_bic and dip.p_value < alpha)
    return BimodalityResult(sq, bimodal, g1, g2, dip, split, alpha, min_delta_bic)


# ----------------------------------------------------------------------------
# per-feature contributions and group comparisons
# ----------------------------------------------------------------------------

@dataclass
class ContributionNorms:
    """Per-feature norms of each component's weights and their shares.

    ``total = decoder + linear + embedding`` (sum of the three norms); the
    ratios are each norm over that total. Without an NFM only ``decoder`` is set.
    """

    decoder: np.ndarray
    linear: Optional[np.ndarray]
    embedding: Optional[np.ndarray]

    @property
    def total(self) -> np.ndarray:
        t = self.decoder.copy()
        for a in (self.linear, self.embedding):
            if a is not None:
                t = t + a
        return t

    def ratios(self) -> Dict[str, np.ndarray]:
        tot = self.total
        safe = np.where(tot > 0, tot, 1.0)
        out = {"decoder": self.decoder / safe}
        if self.linear is not None:
            out["linear"] = self.linear / safe
        if self.embedding is not None:
            out["embedding"] = self.embedding / safe
        return out

    def as_dict(self) -> Dict[str, np.ndarray]:
        """Every per-feature quantity by name: ``*_norm`` and ``*_ratio``."""
        out = {"decoder_norm": self.decoder}
        if self.linear is not None:
            out["linear_norm"] = self.linear
        if self.embedding is not None:
            out["embedding_norm"] = self.embedding
        if self.linear is not None or self.embedding is not None:
            out.update({f"{k}_ratio": v for k, v in self.ratios().items()})
        return out


def contribution_norms(model) -> ContributionNorms:
    """``||W_dec[:, i]||``, ``||W_lin[:, i]||``, ``||V[i]||`` for every feature i."""
    dec = column_norms(decoder_weight(model))
    lin, emb = nfm_weights(model)
    return ContributionNorms(
        decoder=dec,
        linear=None if lin is None else column_norms(lin),
        embedding=None if emb is None else column_norms(emb.T),
    )


def correlations(x, y) -> Dict[str, float]:
    """Spearman and Pearson correlations of two per-feature arrays, with p-values."""
    from scipy import stats

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        nan = float("nan")
        return {"spearman_rho": nan, "spearman_p": nan, "pearson_r": nan, "pearson_p": nan, "n": int(x.size)}
    sp = stats.spearmanr(x, y)
    pe = stats.pearsonr(x, y)
    return {
        "spearman_rho": float(sp.statistic), "spearman_p": float(sp.pvalue),
        "pearson_r": float(pe.statistic), "pearson_p": float(pe.pvalue), "n": int(x.size),
    }


def group_comparison(values: Dict[str, np.ndarray], squared_norms, threshold: float) -> Dict[str, Dict[str, float]]:
    """Compare each per-feature quantity between ``sq < threshold`` and ``sq >= threshold``.

    Per quantity: group sizes, means, medians, Mann-Whitney U p-value, Welch t
    p-value and Cohen's d (high minus low, pooled SD).
    """
    from scipy import stats

    sq = np.asarray(squared_norms, dtype=np.float64)
    low = sq < threshold
    out: Dict[str, Dict[str, float]] = {}
    for name, v in values.items():
        v = np.asarray(v, dtype=np.float64)
        a, b = v[low], v[~low]
        row = {"threshold": float(threshold), "n_low": int(a.size), "n_high": int(b.size),
               "mean_low": float(a.mean()) if a.size else float("nan"),
               "mean_high": float(b.mean()) if b.size else float("nan"),
               "median_low": float(np.median(a)) if a.size else float("nan"),
               "median_high": float(np.median(b)) if b.size else float("nan")}
        if a.size >= 2 and b.size >= 2 and np.ptp(v) > 0:
            row["mannwhitney_p"] = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
            row["welch_t_p"] = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
            pooled = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))
            row["cohens_d"] = float((b.mean() - a.mean()) / pooled) if pooled > 0 else float("nan")
        else:
            row["mannwhitney_p"] = row["welch_t_p"] = row["cohens_d"] = float("nan")
        out[name] = row
    return out


# ----------------------------------------------------------------------------
# off-diagonal Gram statistics, in blocks
# ----------------------------------------------------------------------------

_GRAM_EDGES = np.linspace(-1.0, 1.0, 401)  # histogram of cosine similarities


class _Acc:
    """Streaming count / sum / sum of squares / abs sum / max |.| of values."""

    def __init__(self, edges=None):
        self.n = 0
        self.s = 0.0
        self.s2 = 0.0
        self.sa = 0.0
        self.maxabs = 0.0
        self.edges = edges
        self.hist = None if edges is None else np.zeros(len(edges) - 1, dtype=np.int64)
        self.counts = {}

    def add(self, v: Tensor, thresholds=()):
        if v.numel() == 0:
            return
        v64 = v.to(torch.float64)
        self.n += v.numel()
        self.s += float(v64.sum())
        self.s2 += float((v64 * v64).sum())
        a = v64.abs()
        self.sa += float(a.sum())
        self.maxabs = max(self.maxabs, float(a.max()))
        for t in thresholds:
            self.counts[t] = self.counts.get(t, 0) + int((a > t).sum())
        if self.edges is not None:
            h = torch.histc(v.float().clamp(-1, 1).cpu(), bins=len(self.edges) - 1, min=-1.0, max=1.0)
            self.hist += h.to(torch.int64).numpy()

    def result(self) -> Dict[str, float]:
        if self.n == 0:
            return {"n_pairs": 0}
        mean = self.s / self.n
        out = {"n_pairs": int(self.n), "mean": mean, "std": math.sqrt(max(self.s2 / self.n - mean * mean, 0.0)),
               "mean_abs": self.sa / self.n, "rms": math.sqrt(self.s2 / self.n), "max_abs": self.maxabs}
        for t, c in sorted(self.counts.items()):
            out[f"frac_abs_gt_{t:g}"] = c / self.n
        if self.hist is not None and self.hist.sum() > 0:
            cdf = np.cumsum(self.hist) / self.hist.sum()
            centers = 0.5 * (self.edges[1:] + self.edges[:-1])
            for q in (0.01, 0.5, 0.99):
                out[f"q{int(q * 100):02d}_approx"] = float(centers[np.searchsorted(cdf, q)])
        return out


def gram_offdiagonal_stats(
    weight, *, block: int = 1024, groups: Optional[np.ndarray] = None,
    max_features: Optional[int] = None, seed: int = 0, device=None,
    cos_thresholds: Sequence[float] = (0.1, 0.3, 0.5),
) -> Dict[str, Any]:
    """Statistics of the off-diagonal entries of ``G = W.T @ W`` for ``W [d, F]``.

    Computed over the unordered pairs ``i < j`` in row panels of ``block``
    features, so memory is ``O(block * F)``, never ``F x F``. Returns stats for
    the raw Gram (``gram``) and the cosine Gram (``cosine``: columns
    normalised), and, when ``groups`` (bool per feature, True = low group) is
    given, cosine stats within low, within high, and across groups.
    ``max_features`` subsamples features uniformly (seeded) first; the result
    then records ``sampled_features``.
    """
    w = _as_tensor(decoder_weight(weight) if not isinstance(weight, (torch.Tensor, np.ndarray)) else weight)
    if device is not None:
        w = w.to(device)
    w = w.float() if w.dtype not in (torch.float32, torch.float64) else w
    F = w.shape[1]
    idx = None
    if max_features is not None and F > max_features:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(F, generator=g)[:max_features].sort().values
        w = w[:, idx.to(w.device)]
        if groups is not None:
            groups = np.asarray(groups)[idx.numpy()]
        F = w.shape[1]
    norms = w.norm(dim=0)
    wn = w / norms.clamp_min(1e-12)
    grp = None if groups is None else torch.as_tensor(np.asarray(groups, dtype=bool), device=w.device)
    acc_g = _Acc()
    acc_c = _Acc(_GRAM_EDGES)
    acc_grp = {k: _Acc() for k in ("low_low", "high_high", "low_high")} if grp is not None else {}
    for s in range(0, F, block):
        e = min(F, s + block)
        # rows s..e against columns s..F; keep j > i
        g_raw = w[:, s:e].T @ w[:, s:]  # [b, F - s]
        g_cos = wn[:, s:e].T @ wn[:, s:]
        rows = torch.arange(s, e, device=w.device).unsqueeze(1)
        cols = torch.arange(s, F, device=w.device).unsqueeze(0)
        mask = cols > rows
        acc_g.add(g_raw[mask])
        acc_c.add(g_cos[mask], cos_thresholds)
        if grp is not None:
            gi = grp[s:e].unsqueeze(1)
            gj = grp[s:].unsqueeze(0)
            acc_grp["low_low"].add(g_cos[mask & gi & gj])
            acc_grp["high_high"].add(g_cos[mask & ~gi & ~gj])
            acc_grp["low_high"].add(g_cos[mask & (gi ^ gj)])
    out: Dict[str, Any] = {"n_features": int(F), "gram": acc_g.result(), "cosine": acc_c.result()}
    if grp is not None:
        out["cosine_by_group"] = {k: a.result() for k, a in acc_grp.items()}
    if idx is not None:
        out["sampled_features"] = int(F)
    return out


# ----------------------------------------------------------------------------
# PCA of per-feature weight vectors
# ----------------------------------------------------------------------------

def pca_summary(vectors, *, var_targets: Sequence[float] = (0.5, 0.9, 0.99), block: int = 8192,
                top: int = 10) -> Dict[str, Any]:
    """PCA of ``vectors [F, D]`` (one row per feature), centred over features.

    The ``D x D`` covariance is accumulated in row blocks (float64). Returns
    the number of components needed for each variance target (key
    ``n_components_90`` for 0.9), the top explained-variance ratios and the
    participation ratio ``(sum l)^2 / sum l^2`` (an effective dimension).
    """
    v = _as_tensor(vectors)
    n, D = v.shape
    mean = torch.zeros(D, dtype=torch.float64, device=v.device)
    for s in range(0, n, block):
        mean += v[s:s + block].to(torch.float64).sum(0)
    mean /= n
    cov = torch.zeros(D, D, dtype=torch.float64, device=v.device)
    for s in range(0, n, block):
        c = v[s:s + block].to(torch.float64) - mean
        cov += c.T @ c
    cov /= max(n - 1, 1)
    ev = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0).cpu().numpy()
    total = ev.sum()
    out: Dict[str, Any] = {"n": int(n), "dim": int(D), "total_variance": float(total)}
    if total <= 0:
        return out
    ratio = ev / total
    cum = np.cumsum(ratio)
    for t in var_targets:
        out[f"n_components_{int(round(t * 100))}"] = int(min(np.searchsorted(cum, t - 1e-12) + 1, D))
    out["explained_variance_ratio_top"] = ratio[:top].tolist()
    out["participation_ratio"] = float(total ** 2 / (ev ** 2).sum())
    return out


# ----------------------------------------------------------------------------
# everything for one model
# ----------------------------------------------------------------------------

def feature_analysis(
    model, *, bimodality: Optional[BimodalityResult] = None, threshold: float = DEFAULT_THRESHOLD,
    gram_max_features: Optional[int] = None, gram_block: int = 1024, n_sim: int = 500, seed: int = 0,
    pca: bool = True,
) -> Dict[str, Any]:
    """The full weight analysis of one model, as a JSON-ready dict.

    Keys: ``bimodality``; ``contributions`` (summary per quantity);
    ``groups_at_threshold`` / ``groups_at_split`` (see :func:`group_comparison`);
    ``correlations`` (squared norm vs every ratio/norm); ``gram``; ``pca``.
    Per-feature arrays are returned separately under ``"_arrays"`` (not JSON)
    for plotting.
    """
    bim = bimodality or norm_bimodality(model, n_sim=n_sim, seed=seed)
    sq = bim.squared_norms
    contrib = contribution_norms(model)
    quantities = contrib.as_dict()
    out: Dict[str, Any] = {"bimodality": bim.to_dict()}
    out["contributions"] = {k: {"mean": float(v.mean()), "std": float(v.std()), "median": float(np.median(v))}
                            for k, v in quantities.items()}
    out["groups_at_threshold"] = group_comparison(quantities, sq, threshold)
    out["groups_at_split"] = group_comparison(quantities, sq, bim.split)
    out["correlations"] = {k: correlations(sq, v) for k, v in quantities.items() if k != "decoder_norm"}
    out["gram"] = gram_offdiagonal_stats(decoder_weight(model), block=gram_block, groups=sq < threshold,
                                         max_features=gram_max_features, seed=seed)
    if pca:
        lin, emb = nfm_weights(model)
        out["pca"] = {"decoder": pca_summary(decoder_weight(model).T)}
        if lin is not None:
            out["pca"]["linear"] = pca_summary(lin.T)
        if emb is not None:
            out["pca"]["embedding"] = pca_summary(emb)
    out["_arrays"] = {"squared_norm": sq, **quantities}
    return out
