"""dualenc_fast: fast dual-encoding dictionary learning (TopK SAE + NFM).

Layout (see README, "Package layout"):

- ``dualenc_fast.ops`` (compiled ops), ``dualenc_fast.reference`` (the pure-PyTorch
  oracle), ``dualenc_fast.storage`` (atomic files, safetensors, JSON), ``dualenc_fast.lm``
  (the language model side);
- ``dualenc_fast.nn``: drop-in replacements for the research modules, running on
  the ops, and their model folders;
- ``dualenc_fast.train``: trainers, resumable checkpoints, activation stores;
- ``dualenc_fast.analysis``: weight analysis and the integration-feature study;
- ``dualenc_fast.eval``: reconstruction metrics, ablations, the KL/CE splice test, reports;
- ``dualenc_fast.commands`` + ``dualenc_fast.cli``: the ``dualenc`` command line.

The flat layout's module names (``dualenc_fast.checkpoint``, ``.modules``,
``.data``, ``.report``, ``.integration``) still import: see ``dualenc_fast._compat``.
"""
from __future__ import annotations

from ._version import __version__
from ._ext import build_info, extension_available  # noqa: E402
from . import _compat

_compat.install()


def __getattr__(name):
    if name not in _compat.ROOT_NAMES:
        raise AttributeError(f"module 'dualenc_fast' has no attribute {name!r}")
    return _compat.resolve_root(name)


def __dir__():
    return sorted(set(globals()) | set(_compat.ROOT_NAMES))


__all__ = ["__version__", "build_info", "extension_available",
           *[n for n in _compat.ROOT_NAMES if n not in ("modules", "storage", "nn")]]
