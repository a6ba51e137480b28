"""Evaluation: reconstruction metrics, component ablations and the KL/CE splice
test (:mod:`.metrics`), the Markdown/PNG report and the demo hook (:mod:`.report`).

The names of :mod:`.metrics` (then :mod:`.report`) are available here as before
(``dualenc_fast.eval.splice_test``), imported on first use."""
from .._compat import make_facade

make_facade(__name__)
