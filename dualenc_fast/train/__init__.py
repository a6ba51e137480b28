"""Training: the trainers (:mod:`.trainer`), resumable checkpoints and the SAELens
layout (:mod:`.checkpoint`), activation collection and stores (:mod:`.data`).

The trainer's names are available here as before (``dualenc_fast.train.TrainConfig``,
``dualenc_fast.train.train``), imported on first use."""
from .._compat import make_facade

make_facade(__name__)
