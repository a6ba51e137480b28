"""Optional experiment tracking: Weights & Biases (``dualenc train --wandb PROJECT``).

Off by default and never a hard dependency: ``pip install wandb`` (or the
``wandb`` extra) to use it. Only the rank-0 process of a ``torch.distributed``
job logs. The W&B run id is kept in ``RUN/wandb.json``, so ``--resume`` logs
into the same W&B run. A resumed run re-trains the steps after its checkpoint
bit for bit, so steps W&B already holds are logged again with the same values
(W&B keeps the first copy of a step it has seen).
"""
from __future__ import annotations

import uuid
from pathlib import Path
from typing import Optional

RUN_FILE = "wandb.json"


def is_rank0() -> bool:
    """True unless this is a non-zero rank of an initialised ``torch.distributed`` job."""
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return True


def _import_wandb():
    try:
        import wandb
    except ImportError:
        from ..errors import UserError

        raise UserError("--wandb needs the wandb package: pip install wandb (or pip install 'dualenc_fast[wandb]')") \
            from None
    return wandb


class WandbLogger:
    """Sends metric rows to one W&B run; ``log(row, step)`` and ``finish(ok)``."""

    def __init__(self, run):
        self.run = run

    def log(self, row: dict, step: int) -> None:
        data = {}
        prefix = "val/" if row.get("split") == "val" else "train/"
        for key, value in row.items():
            if key in ("step", "split") or isinstance(value, (str, bool)) or value is None:
                continue
            if isinstance(value, (int, float)):
                data[prefix + key] = value
        if data:
            self.run.log(data, step=int(step))

    def finish(self, ok: bool = True) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None


def start_wandb(project: Optional[str], run_dir, *, config: dict, resume: bool) -> Optional[WandbLogger]:
    """A :class:`WandbLogger` for ``project`` (None when ``project`` is None or this is not
    rank 0). The run id comes from ``run_dir/wandb.json`` when resuming, else is new and
    written there."""
    if not project or not is_rank0():
        return None
    from ..storage import atomic_write_json, read_json

    wandb = _import_wandb()
    run_dir = Path(run_dir)
    path = run_dir / RUN_FILE
    saved = read_json(path) if resume and path.exists() else None
    if saved and saved.get("project") == project and saved.get("id"):
        run_id, how = str(saved["id"]), "allow"
    else:
        run_id, how = uuid.uuid4().hex[:12], None
        atomic_write_json(path, {"project": project, "id": run_id})
    run = wandb.init(project=project, id=run_id, resume=how, dir=str(run_dir), config=config,
                     name=run_dir.resolve().name)
    return WandbLogger(run)
