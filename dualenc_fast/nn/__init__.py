"""The modules: drop-in TopK SAE / NFM / joint modules on the compiled ops
(:mod:`.modules`), their model folders (:mod:`.serialize`) and helpers to run any
model (:mod:`.running`). Names of :mod:`.modules` and :mod:`.serialize` are
available here (``dualenc_fast.nn.JointSAENFM``), imported on first use."""
from .._compat import make_facade

make_facade(__name__)
