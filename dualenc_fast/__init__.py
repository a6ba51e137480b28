"""dualenc_fast: fast dual-encoding dictionary learning (TopK SAE + NFM).

``dualenc_fast.reference`` is the pure-PyTorch oracle; ``dualenc_fast.ops``
holds the compiled ops; the modules below are drop-in replacements for the
research modules, running on those ops.
"""
from __future__ import annotations

__version__ = "0.1.0"

from ._ext import build_info, extension_available  # noqa: E402

_LAZY = {
    "TopKSparseAutoencoder": "modules",
    "NeuralFactorizationMachine": "modules",
    "JointSAENFM": "modules",
    "SparseCode": "modules",
    "ops": None,
    "reference": None,
    "analysis": None,
    "eval": None,
    "integration": None,
    "report": None,
    "train": None,
    "data": None,
    "checkpoint": None,
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'dualenc_fast' has no attribute {name!r}")
    import importlib

    sub = _LAZY[name]
    if sub is None:
        return importlib.import_module(f".{name}", __name__)
    return getattr(importlib.import_module(f".{sub}", __name__), name)


__all__ = ["__version__", "build_info", "extension_available", *_LAZY]
