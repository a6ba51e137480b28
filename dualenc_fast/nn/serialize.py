"""Model folders: ``config.json`` + ``model.safetensors`` (safetensors + JSON, never pickle).

:func:`save_model` writes the reference parameter names with input
normalisation folded in; :func:`read_model` finds and reads a model folder
(or the exact, unfolded ``model.json`` + ``model.safetensors`` of a training
checkpoint folder, or a run folder's ``model/``). Building the module from
what it returns is :func:`dualenc_fast.nn.modules.build_model`'s job, so this
module needs no module class; :func:`dualenc_fast.train.checkpoint.load_model`
adds run folders still in training and SAELens folders.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .._version import __version__
from ..storage import atomic_save_tensors, atomic_write_json, file_record, load_tensors, read_json, verify_file

MODEL_FORMAT = "dualenc_fast.model"
FORMAT_VERSION = 1


def save_model(model, path, *, extra: Optional[dict] = None) -> Path:
    """Write ``path/config.json`` + ``path/model.safetensors`` (reference names;
    input normalisation folded into the weights)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    scale = 1.0
    if getattr(model, "normalizes_input", False):
        scale = float(getattr(model, "primary_sae", model).input_scale)
    folded = model.folded()
    config = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "dualenc_fast_version": __version__,
        **folded.config(),
        "folded_input_scale": scale,
    }
    if extra:
        config["extra"] = extra
    atomic_save_tensors(path / "model.safetensors", folded.state_dict(), metadata={"format": MODEL_FORMAT})
    config["files"] = {"model.safetensors": file_record(path / "model.safetensors")}
    atomic_write_json(path / "config.json", config)
    return path


def load_verified_weights(folder: Path, config: dict) -> dict:
    """``folder/model.safetensors``, checked against the hash ``config.json`` records
    (folders written before hashes were recorded are read unchecked)."""
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"{folder} has a config.json but no model.safetensors")
    record = (config.get("files") or {}).get("model.safetensors")
    if record is not None:
        verify_file(weights, record)
    return load_tensors(weights)


def read_model(path) -> tuple:
    """``(config, state_dict)`` of a model folder written by :func:`save_model`, a
    training checkpoint folder (``model.json``) or a run folder (its ``model/``)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if (path / "model" / "config.json").exists():  # a finished training run folder
        path = path / "model"
    if (path / "config.json").exists():
        config = read_json(path / "config.json")
        if config.get("format") != MODEL_FORMAT:
            raise ValueError(f"{path / 'config.json'} is not a dualenc_fast model config "
                             f"(format={config.get('format')!r})")
    elif (path / "model.json").exists():  # a training checkpoint: the exact, unfolded state
        config = read_json(path / "model.json")
    else:
        raise FileNotFoundError(f"{path} holds no config.json/model.safetensors (for run folders still in "
                                "training and SAELens folders use dualenc_fast.train.checkpoint.load_model)")
    if (path / "config.json").exists():
        return config, load_verified_weights(path, config)
    return config, load_tensors(path / "model.safetensors")
