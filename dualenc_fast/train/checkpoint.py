"""Saving and loading: safetensors for tensors, JSON for everything else.

Nothing here unpickles: ``torch.load`` is never used. Every file is written
atomically (a temporary file in the same folder, ``fsync``, ``os.replace``),
and a training checkpoint is a folder written under a temporary name and
renamed into place, so an interrupted write leaves the previous checkpoint
loadable. The atomic writes are :mod:`dualenc_fast.storage`'s and model folders
(``save_model``) :mod:`dualenc_fast.nn.serialize`'s; both are importable from here.

Layouts
- model folder (``save_model``): ``config.json`` + ``model.safetensors`` with the
  reference parameter names; input normalisation folded in.
- SAELens folder (``export_saelens``): ``cfg.json`` + ``sae_weights.safetensors``.
- training checkpoint (``save_checkpoint``): ``run/checkpoints/step_XXXXXXXX/``
  holding ``model.safetensors`` + ``model.json`` (exact, unfolded state),
  ``state.safetensors`` + ``state.json`` (optimizer, scheduler, RNG states,
  step, trainer extras) + ``checkpoint.json`` (the sha256 and size of each of
  those four files, itself sealed by a hash of its own content; written last,
  so its presence marks a complete folder); ``run/checkpoints/latest.json``
  names the newest.

Verification: :func:`verify_checkpoint` checks every file of a checkpoint
against ``checkpoint.json``, :func:`load_checkpoint` calls it, and
:func:`find_resumable` walks a run's checkpoints newest first, skipping (and
reporting) the ones that are incomplete or fail their hashes. A model folder's
``config.json`` records the sha256 of its ``model.safetensors``;
:func:`load_model` checks it. Failures raise
:class:`dualenc_fast.errors.CorruptFileError` (a ``ValueError``) naming the file.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import DISK_FULL_ERRNOS, CheckpointError, CorruptFileError, DiskFullError, NoGoodCheckpointError  # noqa: F401
from ..nn.serialize import MODEL_FORMAT, load_verified_weights, save_model  # noqa: F401  (model folders live in nn/)
from ..storage import (_atomic_write, _fsync_dir, _prepare, atomic_save_tensors, atomic_write_bytes,  # noqa: F401
                       atomic_write_json, atomic_write_text, file_record, file_sha256, load_tensors, read_json,
                       verify_file)

from .._compat import share_names

share_names(__name__)  # patching save_file, atomic_* here patches them in storage too

CHECKPOINT_FORMAT = "dualenc_fast.checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_MANIFEST = "checkpoint.json"
MANIFEST_FORMAT_NAME = "dualenc_fast.checkpoint_manifest"
CHECKPOINT_FILES = ("model.safetensors", "model.json", "state.safetensors", "state.json")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (incomplete or corrupt) while looking for one to resume from."""


# --------------------------------------------------------------------------- nested state <-> (JSON, tensors)


def split_state(obj, tensors: dict, prefix: str = "t"):
    """A JSON-able copy of ``obj`` with every tensor moved into ``tensors`` (by key)."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if type(obj).__module__ == "numpy" and type(obj).__name__ == "ndarray":
        key = f"{prefix}"
        import numpy as np

        tensors[key] = torch.from_numpy(obj.astype(np.int64) if obj.dtype.kind in "uib" else obj.astype(np.float64))
        return {"__ndarray__": key, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"__dict__": [[split_state(k, tensors, f"{prefix}.k{i}"), split_state(v, tensors, f"{prefix}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [split_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [split_state(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"__float__": repr(obj)}
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if type(obj).__module__ == "numpy":  # numpy scalar
        return split_state(obj.item(), tensors, prefix)
    raise TypeError(f"cannot store a {type(obj).__name__} at {prefix} in a checkpoint")


def join_state(obj, tensors: dict):
    """Inverse of :func:`split_state`."""
    if isinstance(obj, list):
        return [join_state(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__ndarray__" in obj:
            return tensors[obj["__ndarray__"]].numpy().astype(obj["dtype"])
        if "__tuple__" in obj:
            return tuple(join_state(v, tensors) for v in obj["__tuple__"])
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__dict__" in obj:
            return {join_state(k, tensors): join_state(v, tensors) for k, v in obj["__dict__"]}
        raise ValueError(f"malformed checkpoint entry: {sorted(obj)}")
    return obj


def save_state(path_json, path_tensors, state) -> None:
    tensors: dict = {}
    doc = split_state(state, tensors)
    atomic_save_tensors(path_tensors, tensors)
    atomic_write_json(path_json, {"format": CHECKPOINT_FORMAT, "format_version": FORMAT_VERSION, "state": doc})


def load_state(path_json, path_tensors):
    doc = read_json(path_json)
    tensors = load_tensors(path_tensors) if Path(path_tensors).exists() else {}
    return join_state(doc["state"], tensors)


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


# --------------------------------------------------------------------------- models


def load_model(path, *, backend: str = "auto", device="cpu"):
    """Load a module from a model folder written by ``save()``, a training run folder
    (its ``model/``), a checkpoint folder, or a SAELens folder. Never unpickles."""
    from ..nn.modules import build_model

    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}")
    if (path / "cfg.json").exists() and (path / "sae_weights.safetensors").exists():
        return import_saelens(path, backend=backend, device=device)
    if (path / "model" / "config.json").exists():  # a training run folder
        return load_model(path / "model", backend=backend, device=device)
    if not (path / "config.json").exists():
        if (path / "model.json").exists():  # a training checkpoint
            verify_checkpoint(path)
            config = read_json(path / "model.json")
            model = build_model(config, backend=backend)
            model.load_state_dict(load_tensors(path / "model.safetensors"))
            return model.to(device)
        ckpt = _newest_good_or_none(path)
        if ckpt is not None:
            return load_model(ckpt, backend=backend, device=device)
        raise FileNotFoundError(f"{path} holds no config.json/model.safetensors (nor a run or SAELens folder)")
    config = read_json(path / "config.json")
    if not isinstance(config, dict) or config.get("format") != MODEL_FORMAT:
        ckpt = _newest_good_or_none(path)  # a training run still in progress: its newest checkpoint
        if ckpt is not None:
            return load_model(ckpt, backend=backend, device=device)
        fmt = config.get("format") if isinstance(config, dict) else None
        raise CorruptFileError(f"{path / 'config.json'} is not a dualenc_fast model config (format={fmt!r})")
    model = build_model(config, backend=backend)
    model.load_state_dict(load_verified_weights(path, config))
    return model.to(device)


def _newest_good_or_none(run_dir) -> Optional[Path]:
    """The newest checkpoint of a run that verifies (skipped ones are warned about), or None;
    a run whose checkpoints all fail raises :class:`NoGoodCheckpointError`."""
    found, skipped = find_resumable(run_dir)
    _warn_skipped(skipped)
    if found is None and skipped:
        raise NoGoodCheckpointError(_none_good_message(run_dir, skipped))
    return found


# --------------------------------------------------------------------------- training checkpoints


def checkpoint_dir(run_dir) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _complete(folder: Path) -> bool:
    return all((folder / f).exists() for f in ("model.safetensors", "model.json", "state.json", CHECKPOINT_MANIFEST))


def _step_folders(run_dir) -> list:
    """Every ``step_*`` folder of a run, complete or not, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), key=lambda p: p.name)


def list_checkpoints(run_dir) -> list:
    """Complete checkpoint folders of a run, oldest first (complete: every file present;
    :func:`verify_checkpoint` checks their contents)."""
    return [p for p in _step_folders(run_dir) if _complete(p)]


def _manifest_seal(doc: dict) -> str:
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


def verify_checkpoint(folder) -> dict:
    """Check a checkpoint folder against its ``checkpoint.json``: the manifest's own seal,
    then the size and sha256 of each file. Returns the manifest; raises
    :class:`CheckpointError` (a ``ValueError``) naming the first bad file."""
    folder = Path(folder)
    manifest = folder / CHECKPOINT_MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a checkpoint folder")
    if not manifest.exists():
        missing = [f for f in CHECKPOINT_FILES if not (folder / f).exists()]
        what = f"lacks {', '.join(missing + [CHECKPOINT_MANIFEST])}" if missing else f"has no {CHECKPOINT_MANIFEST}"
        raise CheckpointError(f"checkpoint {folder} is incomplete: it {what}")
    try:
        doc = read_json(manifest)
    except CorruptFileError as exc:
        raise CheckpointError(str(exc)) from exc
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT_NAME:
        raise CheckpointError(f"{manifest} is not a dualenc_fast checkpoint manifest")
    if doc.get("sha256") != _manifest_seal(doc):
        raise CheckpointError(f"{manifest} is corrupt: its content does not match its own sha256")
    files = doc.get("files")
    if not isinstance(files, dict) or any(f not in files for f in CHECKPOINT_FILES):
        raise CheckpointError(f"{manifest} does not list every checkpoint file")
    for name in CHECKPOINT_FILES:
        verify_file(folder / name, files[name], error=CheckpointError)
    return doc


def find_resumable(run_dir):
    """``(newest checkpoint that verifies or None, [(skipped folder, reason), ...])``,
    walking the run's ``step_*`` folders newest first."""
    skipped = []
    for folder in reversed(_step_folders(run_dir)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as exc:
            skipped.append((folder, str(exc)))
            continue
        return folder, skipped
    return None, skipped


def _warn_skipped(skipped) -> None:
    for folder, reason in skipped:
        warnings.warn(CheckpointWarning(f"skipping checkpoint {folder.name}: {reason}"), stacklevel=3)


def _none_good_message(run_dir, skipped) -> str:
    names = ", ".join(f.name for f, _ in skipped)
    return (f"no usable checkpoint in {checkpoint_dir(run_dir)}: all {len(skipped)} fail verification ({names}); "
            f"first reason: {skipped[0][1]}")


def latest_checkpoint(run_dir) -> Optional[Path]:
    """The newest complete checkpoint of a run (``latest.json`` first, else a scan)."""
    root = checkpoint_dir(run_dir)
    pointer = root / "latest.json"
    if pointer.exists():
        try:
            cand = root / read_json(pointer)["name"]
            if _complete(cand):
                return cand
        except (ValueError, KeyError, OSError):
            pass
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir, step: int, model, optimizer=None, scheduler=None, *,
                    extra: Optional[dict] = None, keep: int = 2) -> Path:
    """Write a resumable checkpoint for ``step`` and prune all but the ``keep`` newest.

    The folder is assembled under a temporary name and renamed into place, so a
    crash mid-write leaves the previous checkpoint as the latest complete one.
    """
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):  # left by a writer that was killed mid-checkpoint
        shutil.rmtree(stale, ignore_errors=True)
    name = _step_name(step)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=str(root)))
    try:
        atomic_save_tensors(tmp / "model.safetensors", model.state_dict())
        atomic_write_json(tmp / "model.json", model.config())
        state = {
            "step": int(step),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "extra": extra or {},
        }
        save_state(tmp / "state.json", tmp / "state.safetensors", state)
        manifest = {"format": MANIFEST_FORMAT_NAME, "format_version": 1, "step": int(step),
                    "files": {f: file_record(tmp / f) for f in CHECKPOINT_FILES}}
        manifest["sha256"] = _manifest_seal(manifest)
        atomic_write_json(tmp / CHECKPOINT_MANIFEST, manifest)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_json(root / "latest.json", {"name": name, "step": int(step)})
    if keep and keep > 0:
        kept = list_checkpoints(run_dir)[-keep:]
        for old in _step_folders(run_dir):  # also half-pruned or incomplete folders older than those kept
            if old.name < kept[0].name:
                shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path, model=None, optimizer=None, scheduler=None, *, restore_rng: bool = True,
                    verify: bool = True) -> dict:
    """Read a checkpoint (a ``step_*`` folder, or a run folder: its newest checkpoint that
    verifies, warning about newer ones skipped) and load it into the objects given.
    ``verify``: check every file against ``checkpoint.json`` first (raises
    :class:`CheckpointError`). Returns ``{"step", "extra", "path", "model_config",
    "model_state", "optimizer", "scheduler", "rng"}``."""
    path = Path(path)
    if not (path / "state.json").exists() and not (path / CHECKPOINT_MANIFEST).exists():
        found, skipped = find_resumable(path)
        _warn_skipped(skipped)
        if found is None:
            if skipped:
                raise NoGoodCheckpointError(_none_good_message(path, skipped))
            raise FileNotFoundError(f"no complete checkpoint under {path}")
        path = found
    elif verify:
        verify_checkpoint(path)
    model_state = load_tensors(path / "model.safetensors")
    state = load_state(path / "state.json", path / "state.safetensors")
    if model is not None:
        model.load_state_dict(model_state)
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and state.get("rng") is not None:
        set_rng_state(state["rng"])
    return {
        "step": state["step"],
        "extra": state.get("extra", {}),
        "path": path,
        "model_config": read_json(path / "model.json"),
        "model_state": model_state,
        "optimizer": state.get("optimizer"),
        "scheduler": state.get("scheduler"),
        "rng": state.get("rng"),
    }


# --------------------------------------------------------------------------- SAELens


SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_CFG = "cfg.json"
NFM_SIDECAR = "dualenc_nfm.safetensors"


def export_saelens(model, folder, *, model_name: Optional[str] = None, hook_name: Optional[str] = None,
                   hook_layer: Optional[int] = None, context_size: int = 50, dataset_path: str = "",
                   feature_density: Optional[torch.Tensor] = None) -> Path:
    """Write a TopK SAE (or a joint model's primary SAE) in the SAELens layout:
    ``W_enc [d, F]``, ``b_enc [F]``, ``W_dec [F, d]``, ``b_dec [d]`` in
    ``sae_weights.safetensors`` plus ``cfg.json``. Input normalisation is folded in.

    A pre-encoder bias alone maps to ``b_dec`` with ``apply_b_dec_to_input``;
    an output-only decoder bias is folded into ``b_enc`` (exact). For a joint model
    the NFM, which SAELens cannot represent, goes to ``dualenc_nfm.safetensors``
    (reference names) and the SAELens files hold the SAE part only.
    ``feature_density`` (``[F]``, the fraction of tokens each latent fired on, e.g.
    from :func:`dualenc_fast.sae_metrics.standard_metrics`) also writes SAELens's
    ``sparsity.safetensors`` (``{"sparsity": log10(density + 1e-10)}``).
    """
    from ..nn.modules import JointSAENFM, TopKSparseAutoencoder

    model = model.folded()
    nfm = None
    if isinstance(model, JointSAENFM):
        nfm, sae = model.nfm, model.primary_sae
    elif isinstance(model, TopKSparseAutoencoder):
        sae = model
    else:
        raise ValueError(f"export_saelens takes a TopKSparseAutoencoder or JointSAENFM, not {type(model).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        W_enc = sae.W_enc.detach().float()  # [F, d]
        b_enc = sae.b_enc.detach().float().clone()
        W_dec = sae.W_dec_rows.detach().float()  # [F, d]
        pre = sae.b_dec.detach().float() if sae.b_dec is not None else None
        post = sae.decoder.bias.detach().float() if sae.decoder.bias is not None else None
        if pre is not None and post is None:
            b_dec, apply_to_input = pre, True
        else:
            if pre is not None:  # fold the pre-bias into the encoder bias
                b_enc = b_enc - W_enc @ pre
            b_dec = (pre if pre is not None else 0) + (post if post is not None else torch.zeros(sae.input_dim))
            apply_to_input = False
    tensors = {"W_enc": W_enc.T.contiguous(), "b_enc": b_enc, "W_dec": W_dec.contiguous(), "b_dec": b_dec.contiguous()}
    cfg = {
        "architecture": "topk",
        "d_in": sae.input_dim,
        "d_sae": sae.hidden_dim,
        "k": sae.k,
        "activation_fn": "topk",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": sae.k},
        "apply_b_dec_to_input": apply_to_input,
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "dtype": "float32",
        "device": "cpu",
        "model_name": model_name or "",
        "hook_name": hook_name or (f"blocks.{hook_layer}.hook_resid_post" if hook_layer is not None else ""),
        "hook_layer": hook_layer if hook_layer is not None else -1,
        "hook_head_index": None,
        "context_size": context_size,
        "prepend_bos": False,
        "dataset_path": dataset_path,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "metadata": {"exported_by": "dualenc_fast", "has_nfm_sidecar": nfm is not None},
    }
    atomic_save_tensors(folder / SAELENS_WEIGHTS, tensors)
    if feature_density is not None:
        from ..eval.sae_metrics import SPARSITY_FILENAME, log_feature_density

        if tuple(feature_density.shape) != (sae.hidden_dim,):
            raise ValueError(f"feature_density must have shape ({sae.hidden_dim},), got {tuple(feature_density.shape)}")
        atomic_save_tensors(folder / SPARSITY_FILENAME, {"sparsity": log_feature_density(feature_density)})
    if nfm is not None:
        atomic_save_tensors(folder / NFM_SIDECAR, nfm.state_dict())
        cfg["dualenc_nfm"] = nfm.config()
    atomic_write_json(folder / SAELENS_CFG, cfg)
    return folder


def import_saelens(folder, *, backend: str = "auto", device="cpu", with_nfm: bool = True):
    """Read a SAELens TopK SAE folder into a :class:`TopKSparseAutoencoder` (or a
    :class:`JointSAENFM` when a ``dualenc_nfm.safetensors`` sidecar is present)."""
    from ..nn.modules import JointSAENFM, TopKSparseAutoencoder

    folder = Path(folder)
    if not (folder / SAELENS_CFG).exists() or not (folder / SAELENS_WEIGHTS).exists():
        raise FileNotFoundError(f"{folder} needs {SAELENS_CFG} and {SAELENS_WEIGHTS} (SAELens layout)")
    cfg = read_json(folder / SAELENS_CFG)
    w = {key: t.float() for key, t in load_tensors(folder / SAELENS_WEIGHTS).items()}
    for key in ("W_enc", "b_enc", "W_dec"):
        if key not in w:
            raise ValueError(f"{folder / SAELENS_WEIGHTS} lacks {key}")
    arch = cfg.get("architecture", "topk")
    if arch != "topk":
        raise ValueError(f"{folder / SAELENS_CFG}: architecture {arch!r} is not supported (only 'topk')")
    d, F = w["W_enc"].shape
    if tuple(w["W_dec"].shape) != (F, d) or tuple(w["b_enc"].shape) != (F,):
        raise ValueError(f"{folder / SAELENS_WEIGHTS}: W_dec {tuple(w['W_dec'].shape)} / b_enc "
                         f"{tuple(w['b_enc'].shape)} do not match W_enc {(d, F)}")
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if k is None:
        raise ValueError(f"{folder / SAELENS_CFG} does not give k (cfg 'k' or activation_fn_kwargs.k): not a TopK SAE")
    norm = cfg.get("normalize_activations", "none")
    if norm in ("constant_norm_rescale", "layer_norm"):
        raise ValueError(f"{folder / SAELENS_CFG}: normalize_activations={norm!r} rescales each token at run time; "
                         "it has no dualenc_fast equivalent")
    if norm not in ("none", None, "expected_average_only_in"):  # that one is the identity at inference
        warnings.warn(f"SAELens normalize_activations={norm!r} is not applied on import")
    if cfg.get("rescale_acts_by_decoder_norm"):
        # TopK of (pre * n_i), decode (a / n_i) @ W_dec: fold n_i = ||W_dec[i]|| into the weights (exact)
        n = w["W_dec"].norm(dim=1)
        w["W_enc"], w["b_enc"], w["W_dec"] = w["W_enc"] * n, w["b_enc"] * n, w["W_dec"] / n.clamp_min(1e-30)[:, None]
    b_dec = w.get("b_dec", torch.zeros(d))
    apply_to_input = bool(cfg.get("apply_b_dec_to_input", True))
    nonzero_bias = bool(torch.any(b_dec != 0))
    opts = dict(pre_bias=apply_to_input and nonzero_bias, decoder_bias=(not apply_to_input) and nonzero_bias)
    sidecar = folder / NFM_SIDECAR
    if with_nfm and sidecar.exists() and "dualenc_nfm" in cfg:
        nfm_cfg = cfg["dualenc_nfm"]
        model = JointSAENFM(d, F, int(k), nfm_cfg["args"][1], backend=backend, **nfm_cfg["kwargs"], **opts)
        sae = model.primary_sae
        model.nfm.load_state_dict(load_tensors(sidecar))
    else:
        model = sae = TopKSparseAutoencoder(d, F, int(k), backend=backend, **opts)
    with torch.no_grad():
        sae.encoder[0].weight.copy_(w["W_enc"].T)
        sae.encoder[0].bias.copy_(w["b_enc"])
        sae.decoder.weight.copy_(w["W_dec"])
        if opts["pre_bias"]:
            sae.b_dec.copy_(b_dec)
        if opts["decoder_bias"]:
            sae.decoder.bias.copy_(b_dec)
    return model.to(device)
