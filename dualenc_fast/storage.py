"""Files written atomically: safetensors for tensors, JSON for everything else.

Every write goes to a temporary file in the target folder, is ``fsync``-ed and
then ``os.replace``-d onto the target (and the folder is ``fsync``-ed), so an
interrupted write leaves the previous file intact. Nothing here unpickles.
The layer under :mod:`dualenc_fast.nn.serialize` (model folders),
:mod:`dualenc_fast.train.checkpoint` (training checkpoints) and
:mod:`dualenc_fast.train.data` (activation stores).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(str(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path, writer) -> Path:
    """Call ``writer(tmp_path)``, fsync the result, then ``os.replace`` it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        writer(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    def writer(tmp):
        with open(tmp, "wb") as fh:
            fh.write(data)

    return _atomic_write(path, writer)


def atomic_write_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _prepare(tensors: dict) -> dict:
    out = {}
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{key}: expected a tensor, got {type(t).__name__}")
        out[key] = t.detach().to("cpu").contiguous()
    return out


def atomic_save_tensors(path, tensors: dict, metadata: Optional[dict] = None) -> Path:
    """Write ``tensors`` as one safetensors file, atomically."""
    tensors = _prepare(tensors)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    return _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def load_tensors(path, device="cpu") -> dict:
    return load_file(str(path), device=str(device))


def read_json(path) -> Any:
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)
