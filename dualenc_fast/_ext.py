"""Loads the compiled extension ``dualenc_fast._C`` and describes the build."""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch before the extension)

try:
    from . import _C  # registers the dualenc_fast:: ops with the dispatcher
    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = exc

#: Every op the extension registers, in schema order.
OP_NAMES = (
    "sparse_decode",
    "sparse_decode_backward",
    "topk_encode",
    "topk_encode_backward",
    "fm_interaction",
    "fm_interaction_backward",
    "integration_mlp",
    "integration_mlp_backward",
    "topn_reselect",
)

_BACKEND_KEYS = ("CPU", "CUDA", "Meta")


def extension_available() -> bool:
    """True when the compiled kernels were built and load in this process."""
    return _C is not None


def require_extension() -> None:
    if _C is None:
        raise RuntimeError(
            "dualenc_fast's compiled extension (dualenc_fast._C) could not be imported: "
            f"{_IMPORT_ERROR}. Reinstall with `pip install --no-build-isolation .` against "
            "the torch in this environment, or use backend='reference'."
        )


def registered_ops() -> dict:
    """``{op name: [dispatch keys with a kernel]}`` for every dualenc_fast op."""
    out = {}
    for name in OP_NAMES:
        qual = f"dualenc_fast::{name}"
        try:
            keys = [
                key for key in _BACKEND_KEYS
                if torch._C._dispatch_has_kernel_for_dispatch_key(qual, key)
            ]
        except RuntimeError:
            continue  # op not registered
        if torch._C._dispatch_has_kernel_for_dispatch_key(qual, "CompositeImplicitAutograd"):
            keys.append("CompositeImplicitAutograd")
        out[name] = keys
    return out


def build_info() -> dict:
    """Package version, the torch built against, CUDA status and registered ops."""
    from ._version import __version__

    info = {
        "version": __version__,
        "extension_loaded": _C is not None,
        "torch_runtime": torch.__version__,
    }
    if _C is None:
        info.update(
            torch_built_against=None,
            cuda_compiled=False,
            cuda_version=None,
            cuda_architectures=[],
            import_error=str(_IMPORT_ERROR),
            ops={},
        )
        return info
    info.update(_C.build_info())
    info["cuda_available"] = torch.cuda.is_available()
    info["ops"] = registered_ops()
    return info
