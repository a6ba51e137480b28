"""Devices, precision and data-parallel plumbing (torch.distributed, launched by torchrun).

One process: ``dualenc train ...``. N processes on one machine:
``torchrun --standalone --nproc-per-node N -m dualenc_fast train ...``; torchrun
sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT`` and
:func:`init_from_env` joins the process group (NCCL on CUDA, gloo on CPU) with
a timeout, so a rank whose peer died stops with an error instead of waiting
forever. Gradients are averaged with one all-reduce per step over a flat
buffer (the same arithmetic as DDP, without wrapping the module: the trainers
call ``forward_sparse``, which DDP's forward hooks would not see).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
from typing import Iterable, List, Optional

import torch

PRECISIONS = ("fp32", "bf16")
DEFAULT_TIMEOUT_S = 300.0


class PeerFailure(RuntimeError):
    """Another rank died, hung past the timeout, or the launcher stopped this one."""


# --------------------------------------------------------------------------- devices


def resolve_device(spec=None) -> torch.device:
    """``None``/``"auto"``: CUDA when available (under torchrun ``cuda:LOCAL_RANK``), else
    the CPU. Otherwise ``cpu``, ``cuda`` or ``cuda:N``; asking for CUDA without a GPU is
    an error naming ``--device``."""
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {spec!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {spec!r}")
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {spec}: no CUDA device is available here (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda}); use --device cpu")
    if dev.index is not None and launched_by_torchrun():
        raise ValueError(f"--device {spec}: under torchrun pass --device cuda; each process then takes "
                         "cuda:LOCAL_RANK (limit the GPUs with CUDA_VISIBLE_DEVICES)")
    if dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    if dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return dev


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {PRECISIONS}, got {precision!r}")
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def describe_device(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{device} ({p.name}, {p.total_memory / 2**30:.0f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- process group


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def rank_from_env() -> int:
    """This process's rank as the launcher set it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if is_initialized() else 1


def _on_sigterm(signum, frame):  # pragma: no cover - exercised through subprocess tests
    raise PeerFailure(f"rank {rank()}: stopped by the launcher (signal {signum}); another rank has "
                      "probably failed: see its error above")


def init_from_env(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes in the environment (no-op in one
    process). Returns whether this process is part of a multi-process run."""
    if not launched_by_torchrun():
        return False
    if is_initialized():
        return True
    import torch.distributed as dist

    if timeout_s <= 0:
        raise ValueError(f"--dist-timeout must be positive, got {timeout_s}")
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kwargs["device_id"] = device
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def shutdown() -> None:
    if is_initialized():
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()


@contextlib.contextmanager
def collective(what: str):
    """Turn a failed collective into a :class:`PeerFailure` naming this rank and the step."""
    try:
        yield
    except PeerFailure:
        raise
    except Exception as exc:  # DistBackendError, RuntimeError from gloo/NCCL, timeouts
        if not is_initialized():
            raise
        raise PeerFailure(
            f"rank {rank()} of {world_size()}: {what} failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); another rank died or stopped responding "
            "within the timeout (--dist-timeout)") from exc


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank (identity in one process)."""
    if world_size() == 1:
        return obj
    box = [obj]
    with collective("broadcast"):
        torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj) -> List:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    with collective("all_gather"):
        torch.distributed.all_gather_object(out, obj)
    return out


def all_reduce_sum_(t: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
    if world_size() > 1:
        with collective(what):
            torch.distributed.all_reduce(t)
    return t


def barrier() -> None:
    if world_size() > 1:
        with collective("barrier"):
            torch.distributed.barrier()


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` of ``params`` over the ranks with one all-reduce of a flat
    buffer (every rank holds gradients for the same parameters)."""
    n = world_size()
    if n == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    with collective("gradient all-reduce"):
        torch.distributed.all_reduce(flat)
    flat.div_(n)
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if rank() == 0:
        kwargs.setdefault("file", sys.stderr)
        print(*args, **kwargs)
