"""Files written atomically: safetensors for tensors, JSON for everything else.

Every write goes to a temporary file in the target folder, is ``fsync``-ed and
then ``os.replace``-d onto the target (and the folder is ``fsync``-ed), so an
interrupted write leaves the previous file intact. Nothing here unpickles.
The layer under :mod:`dualenc_fast.nn.serialize` (model folders),
:mod:`dualenc_fast.train.checkpoint` (training checkpoints) and
:mod:`dualenc_fast.train.data` (activation stores).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .errors import DISK_FULL_ERRNOS, CorruptFileError, DiskFullError


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
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if _is_disk_full(exc):
            raise DiskFullError(path) from exc
        raise
    _fsync_dir(path.parent)
    return path


def _is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, as an OSError or inside another library's error (safetensors reports
    ``I/O error: No space left on device (os error 28)`` as a SafetensorError)."""
    if isinstance(exc, DiskFullError):
        return False
    if isinstance(exc, OSError):
        return exc.errno in DISK_FULL_ERRNOS
    text = str(exc)
    return any(f"(os error {n})" in text for n in DISK_FULL_ERRNOS) or "No space left on device" in text


def file_sha256(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def file_record(path) -> dict:
    """``{"sha256", "bytes"}`` of a file, as stored in checkpoint and model JSON."""
    return {"sha256": file_sha256(path), "bytes": os.path.getsize(path)}


def verify_file(path, record: dict, error=CorruptFileError) -> None:
    """Raise ``error`` naming ``path`` unless it exists with the size and sha256 in ``record``."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} is missing")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise error(f"no content hash recorded for {path}")
    size = os.path.getsize(path)
    if "bytes" in record and size != record["bytes"]:
        raise error(f"{path} is corrupt: {size} bytes, {record['bytes']} expected (truncated or overwritten)")
    digest = file_sha256(path)
    if digest != record["sha256"]:
        raise error(f"{path} is corrupt: its sha256 is {digest[:12]}..., {record['sha256'][:12]}... expected")


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
    """The tensors of a safetensors file; a file that is not one (truncated, damaged header)
    raises :class:`CorruptFileError` naming it."""
    try:
        return load_file(str(path), device=str(device))
    except OSError as exc:
        if exc.errno is not None:  # missing, unreadable, I/O error: not a format problem
            raise
        raise CorruptFileError(f"{path} is not a readable safetensors file ({_one_line(exc)})") from exc
    except Exception as exc:  # safetensors' own SafetensorError: truncated or damaged header/data
        raise CorruptFileError(f"{path} is not a readable safetensors file ({_one_line(exc)})") from exc


def read_json(path) -> Any:
    """Parse a JSON file; one that does not parse raises :class:`CorruptFileError` naming it."""
    try:
        with open(path, "r", encoding="utf-8") as fh:
            return json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFileError(f"{path} is not valid JSON ({_one_line(exc)})") from exc


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
