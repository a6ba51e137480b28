"""Analysis: weight analysis of trained models (:mod:`.weights`: norm bimodality,
contributions, Gram statistics, PCA) and the integration-feature study
(:mod:`.integration`).

The names of :mod:`.weights` are available here as before
(``dualenc_fast.analysis.norm_bimodality``), imported on first use."""
from .._compat import make_facade

make_facade(__name__)
