"""Importers: TopK SAEs trained with other libraries, as dualenc_fast modules.

Each importer reads one library's on-disk layout and returns a
:class:`~dualenc_fast.modules.TopKSparseAutoencoder` (or a
:class:`~dualenc_fast.modules.JointSAENFM`) whose forward equals the source's:

================================  ==============================================  ==========================================
source                            files and tensors                               source forward
================================  ==============================================  ==========================================
``sparsify`` (EleutherAI)         ``cfg.json`` + ``sae.safetensors``:             ``TopK(ReLU(encoder(x - b_dec))) @ W_dec
                                  ``encoder.weight [F,d]``, ``encoder.bias [F]``,  + b_dec``
                                  ``W_dec [F,d]``, ``b_dec [d]``
``saelens`` (TopK)                ``cfg.json`` + ``sae_weights.safetensors``:     ``TopK(x' @ W_enc + b_enc) @ W_dec + b_dec``,
                                  ``W_enc [d,F]``, ``b_enc [F]``, ``W_dec [F,d]``,  ``x' = x - b_dec`` when
                                  ``b_dec [d]``                                    ``apply_b_dec_to_input``
``dictionary_learning``           ``ae.pt`` (torch state dict) [+ ``config.json``]: ``decoder(TopK(ReLU(encoder(x - b_dec))))
(``AutoEncoderTopK``)             ``encoder.weight [F,d]``, ``encoder.bias [F]``,  + b_dec``
                                  ``decoder.weight [d,F]``, ``b_dec [d]``,
                                  ``k``, ``threshold`` (scalars)
``research-pt``                   a ``.pt`` state dict with the research module   the research modules (SPEC.md)
                                  names (``encoder.0.weight``, ``decoder.weight``,
                                  ``primary_sae.*``, ``nfm.*``)
================================  ==============================================  ==========================================

A ``.pt`` file is read with ``torch.load(weights_only=True)`` only: tensors,
dicts, lists and plain numbers load; a pickle that names any other object
(code) is refused with a :class:`ValueError`. Nothing else is ever unpickled.

A pre-encoder bias subtracted from the input and added to the output maps to
``pre_bias=True`` (``b_dec``); ReLU-then-TopK and TopK-then-ReLU give the same
code, so every import reproduces the source's reconstruction up to float
rounding (tested against hand-written source forwards).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Dict, Optional

import torch

SOURCES = ("sparsify", "saelens", "dictionary_learning", "research-pt")

SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
DICTIONARY_LEARNING_WEIGHTS = "ae.pt"
DICTIONARY_LEARNING_CFG = "config.json"


# --------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict:
    try:
        with open(path, "r", encoding="utf-8") as fh:
            doc = json.load(fh)
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(doc).__name__}")
    return doc


def _load_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc


def load_torch_weights(path) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with clear errors.

    Only tensors, dicts, lists, tuples, strings and numbers load; a pickle that
    refers to any other object (a class, a function: code) raises ValueError
    and nothing in it runs."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file at {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text and "Unsupported global" not in text:
            raise ValueError(f"{path} is not a readable torch file ({_first_line(text)})") from exc
        reason = next((ln.strip() for ln in text.splitlines() if "Unsupported" in ln or "WeightsUnpickler error" in ln),
                      "it names objects other than tensors and plain containers")
        raise ValueError(
            f"{path}: refusing to unpickle it: it holds more than tensors and plain containers "
            f"({_first_line(reason).split('. ')[0]}). Re-save it as a plain state dict "
            f"(torch.save(model.state_dict(), path)) or as safetensors."
        ) from exc
    except Exception as exc:  # truncated / not a torch file: torch raises RuntimeError, EOFError, KeyError, ...
        raise ValueError(f"{path} is not a readable torch file ({type(exc).__name__}: {_first_line(str(exc))})") from exc


def _first_line(text: str, limit: int = 200) -> str:
    import re

    line = re.sub(r"\x1b\[[0-9;]*m", "", text.strip()).split("\n")[0].strip()
    return line if len(line) <= limit else line[:limit] + "..."


def _as_float(t: torch.Tensor, name: str, shape: tuple, where) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where}: {name} must be a tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    t = t.detach().to("cpu", torch.float32)
    if not torch.isfinite(t).all():
        raise ValueError(f"{where}: {name} holds NaN or Inf")
    return t


def _require(tensors: dict, keys, where) -> None:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(missing)} (has: {', '.join(sorted(tensors)[:12])})")


def _check_k(k, F: int, where) -> int:
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: k must be an int, got {k!r}") from None
    if not 0 < k <= F:
        raise ValueError(f"{where}: k={k} must satisfy 0 < k <= {F} (the number of latents)")
    return k


def build_topk_sae(W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec_rows: torch.Tensor, k: int, *,
                   pre_bias: Optional[torch.Tensor] = None, decoder_bias: Optional[torch.Tensor] = None,
                   backend: str = "auto", device="cpu"):
    """A :class:`TopKSparseAutoencoder` with ``ReLU((x - pre_bias) @ W_enc.T + b_enc)``, top k,
    ``@ W_dec_rows + pre_bias + decoder_bias``. ``W_enc [F, d]``, ``W_dec_rows [F, d]``."""
    from .nn.modules import TopKSparseAutoencoder

    F, d = W_enc.shape
    model = TopKSparseAutoencoder(d, F, int(k), backend=backend, pre_bias=pre_bias is not None,
                                  decoder_bias=decoder_bias is not None)
    with torch.no_grad():
        model.encoder[0].weight.copy_(W_enc)
        model.encoder[0].bias.copy_(b_enc)
        model.decoder.weight.copy_(W_dec_rows)
        if pre_bias is not None:
            model.b_dec.copy_(pre_bias)
        if decoder_bias is not None:
            model.decoder.bias.copy_(decoder_bias)
    return model.to(device)


def _unit_rows(w: torch.Tensor, tol: float = 1e-3) -> bool:
    return bool(((w.norm(dim=1) - 1).abs() < tol).all())


# --------------------------------------------------------------------------- sparsify


def _sparsify_folder(path: Path, hookpoint: Optional[str]) -> Path:
    if path.is_file():
        path = path.parent
    if not path.exists():
        raise FileNotFoundError(f"no sparsify SAE at {path}")
    if hookpoint is not None:
        path = path / hookpoint
    if (path / SPARSIFY_CFG).exists() and (path / SPARSIFY_WEIGHTS).exists():
        return path
    subs = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / SPARSIFY_WEIGHTS).exists()) \
        if path.is_dir() else []
    if len(subs) == 1:
        return path / subs[0]
    if subs:
        raise ValueError(f"{path} holds SAEs for several hookpoints ({', '.join(subs)}); pass one with --hookpoint")
    raise FileNotFoundError(f"{path} needs {SPARSIFY_CFG} and {SPARSIFY_WEIGHTS} (EleutherAI sparsify layout)")


def import_sparsify(path, *, hookpoint: Optional[str] = None, backend: str = "auto", device="cpu"):
    """Read an EleutherAI sparsify SAE folder (``cfg.json`` + ``sae.safetensors``, as
    ``SparseCoder.save_to_disk`` writes it; a folder of hookpoint subfolders needs
    ``hookpoint``). TopK activation only; transcoders and skip connections are refused."""
    folder = _sparsify_folder(Path(path), hookpoint)
    cfg = _read_json(folder / SPARSIFY_CFG)
    w = _load_safetensors(folder / SPARSIFY_WEIGHTS)
    where = folder / SPARSIFY_WEIGHTS
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise ValueError(f"{folder / SPARSIFY_CFG}: activation {activation!r} is not supported (only 'topk')")
    if cfg.get("transcode"):
        raise ValueError(f"{folder / SPARSIFY_CFG}: a transcoder (transcode=true) predicts another module's output; "
                         "only autoencoders can be imported")
    if cfg.get("skip_connection") or "W_skip" in w:
        raise ValueError(f"{folder}: a linear skip connection (W_skip) has no dualenc_fast equivalent")
    _require(w, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), where)
    F, d = w["encoder.weight"].shape
    if "d_in" in cfg and int(cfg["d_in"]) != d:
        raise ValueError(f"{folder / SPARSIFY_CFG}: d_in={cfg['d_in']} but encoder.weight is {tuple(w['encoder.weight'].shape)}")
    expected_F = int(cfg.get("num_latents") or 0) or (d * int(cfg["expansion_factor"]) if cfg.get("expansion_factor") else F)
    if expected_F != F:
        raise ValueError(f"{folder / SPARSIFY_CFG}: num_latents/expansion_factor give {expected_F} latents "
                         f"but encoder.weight has {F}")
    if "k" not in cfg:
        raise ValueError(f"{folder / SPARSIFY_CFG} does not give k")
    k = _check_k(cfg["k"], F, folder / SPARSIFY_CFG)
    W_enc = _as_float(w["encoder.weight"], "encoder.weight", (F, d), where)
    b_enc = _as_float(w["encoder.bias"], "encoder.bias", (F,), where)
    W_dec = _as_float(w["W_dec"], "W_dec", (F, d), where)
    b_dec = _as_float(w["b_dec"], "b_dec", (d,), where)
    model = build_topk_sae(W_enc, b_enc, W_dec, k, pre_bias=b_dec, backend=backend, device=device)
    model.unit_norm_decoder = bool(cfg.get("normalize_decoder", False)) and _unit_rows(W_dec)
    return model


# --------------------------------------------------------------------------- SAELens


def import_saelens(path, *, backend: str = "auto", device="cpu", with_nfm: bool = True):
    """Read a SAELens TopK folder (``cfg.json`` + ``sae_weights.safetensors``); see
    :func:`dualenc_fast.train.checkpoint.import_saelens`."""
    from .train.checkpoint import import_saelens as _import

    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.exists():
        raise FileNotFoundError(f"no SAELens SAE at {path}")
    return _import(path, backend=backend, device=device, with_nfm=with_nfm)


# --------------------------------------------------------------------------- dictionary_learning


def import_dictionary_learning(path, *, k: Optional[int] = None, backend: str = "auto", device="cpu"):
    """Read a dictionary_learning ``AutoEncoderTopK`` (``ae.pt``: the module's state dict,
    optionally with ``config.json`` beside it; ``path`` is the file or its folder).

    Also reads the training backup form (``{"ae": state_dict, "norm_factor": s, ...}``),
    whose biases are stored in normalised units: they are scaled by ``norm_factor``
    as the library does on its final save. The ``threshold`` buffer (used only by
    ``encode(use_threshold=True)``) is not part of the imported forward."""
    path = Path(path)
    if path.is_dir():
        path = path / DICTIONARY_LEARNING_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no dictionary_learning autoencoder at {path} (expected {DICTIONARY_LEARNING_WEIGHTS})")
    cfg_path = path.parent / DICTIONARY_LEARNING_CFG
    trainer_cfg = {}
    if cfg_path.exists():
        trainer_cfg = _read_json(cfg_path).get("trainer", {}) or {}
        dict_class = trainer_cfg.get("dict_class")
        if dict_class is not None and dict_class != "AutoEncoderTopK":
            raise ValueError(f"{cfg_path}: dict_class {dict_class!r} is not supported (only AutoEncoderTopK)")
    obj = load_torch_weights(path)
    norm_factor = None
    if isinstance(obj, dict) and "ae" in obj and isinstance(obj["ae"], dict):
        norm_factor = obj.get("norm_factor")
        obj = obj["ae"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a state dict, got {type(obj).__name__}")
    _require(obj, ("encoder.weight", "encoder.bias", "decoder.weight", "b_dec"), path)
    F, d = obj["encoder.weight"].shape
    ks = {}
    if "k" in obj:
        ks["the state dict's k"] = int(torch.as_tensor(obj["k"]).item())
    if trainer_cfg.get("k") is not None:
        ks[f"{cfg_path.name}'s trainer.k"] = int(trainer_cfg["k"])
    if k is not None:
        ks["the k passed"] = int(k)
    if not ks:
        raise ValueError(f"{path} does not give k (no 'k' buffer, no config.json); pass k")
    if len(set(ks.values())) > 1:
        raise ValueError(f"{path}: conflicting k: " + ", ".join(f"{n} = {v}" for n, v in ks.items()))
    k = _check_k(next(iter(ks.values())), F, path)
    W_enc = _as_float(obj["encoder.weight"], "encoder.weight", (F, d), path)
    b_enc = _as_float(obj["encoder.bias"], "encoder.bias", (F,), path)
    W_dec = _as_float(obj["decoder.weight"], "decoder.weight", (d, F), path)
    b_dec = _as_float(obj["b_dec"], "b_dec", (d,), path)
    if norm_factor is not None:
        s = float(norm_factor)
        if not s > 0:
            raise ValueError(f"{path}: norm_factor must be positive, got {norm_factor!r}")
        b_enc, b_dec = b_enc * s, b_dec * s
    return build_topk_sae(W_enc, b_enc, W_dec.T.contiguous(), k, pre_bias=b_dec, backend=backend, device=device)


# --------------------------------------------------------------------------- research .pt


_STATE_KEYS = ("model_state_dict", "state_dict", "model", "model_state")
_K_KEYS = ("k", "sae_k", "topk", "top_k")
_CFG_KEYS = ("config", "hyperparameters", "hparams", "args")


def _find_state_dict(obj, where) -> dict:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in _STATE_KEYS:
            if isinstance(obj.get(key), dict):
                return _find_state_dict(obj[key], where)
    raise ValueError(f"{where}: no state dict found (a dict of tensors, or one under "
                     f"{', '.join(repr(k) for k in _STATE_KEYS)})")


def _find_int(obj, keys) -> Optional[int]:
    if not isinstance(obj, dict):
        return None
    for key in keys:
        v = obj.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and float(v) == int(v):
            return int(v)
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return int(v.item())
    for key in _CFG_KEYS:
        found = _find_int(obj.get(key), keys)
        if found is not None:
            return found
    return None


def _strip_prefix(sd: dict, prefix: str) -> dict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def import_research_pt(path, *, k: Optional[int] = None, nfm: Optional[str] = None, top_n: Optional[int] = None,
                       dropout: float = 0.15, backend: str = "auto", device="cpu"):
    """Read a research-code ``.pt`` checkpoint (``torch.save`` of a state dict, or a
    dict holding one under ``model_state_dict`` / ``state_dict`` / ``model``).

    Key names are the research modules' (SPEC.md): a ``TopKSparseAutoencoder``
    (``encoder.0.weight [F,d]``, ``encoder.0.bias``, ``decoder.weight [d,F]``) or a
    ``JointSAENFM`` (``primary_sae.*`` + ``nfm.*``). ``nfm``: a second ``.pt``
    holding a ``NeuralFactorizationMachine`` trained on this SAE (the sequential
    model), combined into a ``JointSAENFM``. k is not a tensor in these modules:
    it comes from ``k`` or from a ``k`` / ``sae_k`` entry of the checkpoint (or
    its ``config`` / ``args``). ``top_n`` (the NFM re-selection N) and ``dropout``
    are not stored either; pass them as trained."""
    from .nn.modules import JointSAENFM, TopKSparseAutoencoder

    path = Path(path)
    raw = load_torch_weights(path)
    sd = _strip_prefix(_find_state_dict(raw, path), "module.")
    stored_k = _find_int(raw, _K_KEYS)
    if k is not None and stored_k is not None and int(k) != stored_k:
        raise ValueError(f"{path}: the checkpoint says k={stored_k} but k={k} was passed")
    k = k if k is not None else stored_k
    if "primary_sae.encoder.0.weight" in sd:
        F, d = sd["primary_sae.encoder.0.weight"].shape
        if "nfm.feature_embeddings.weight" not in sd:
            raise ValueError(f"{path}: primary_sae.* without nfm.*: not a JointSAENFM state dict")
        if nfm is not None:
            raise ValueError(f"{path} already holds an NFM; do not pass another")
        if k is None:
            raise ValueError(f"{path} does not record k (the SAE's active features); pass k")
        K = sd["nfm.feature_embeddings.weight"].shape[1]
        model = JointSAENFM(d, F, _check_k(k, F, path), K, top_n=top_n, dropout=dropout, backend=backend)
    elif "encoder.0.weight" in sd:
        F, d = sd["encoder.0.weight"].shape
        if k is None:
            raise ValueError(f"{path} does not record k (the SAE's active features); pass k")
        k = _check_k(k, F, path)
        if nfm is None:
            model = TopKSparseAutoencoder(d, F, k, backend=backend)
        else:
            nfm_sd = _strip_prefix(_find_state_dict(load_torch_weights(nfm), nfm), "module.")
            if "feature_embeddings.weight" not in nfm_sd:
                raise ValueError(f"{nfm}: not a NeuralFactorizationMachine state dict (no feature_embeddings.weight)")
            nF, K = nfm_sd["feature_embeddings.weight"].shape
            if nF != F:
                raise ValueError(f"{nfm}: the NFM has {nF} features but the SAE in {path} has {F}")
            model = JointSAENFM(d, F, k, K, top_n=top_n, dropout=dropout, backend=backend)
            sd = {**{f"primary_sae.{n}": t for n, t in sd.items()}, **{f"nfm.{n}": t for n, t in nfm_sd.items()}}
    elif "feature_embeddings.weight" in sd:
        raise ValueError(f"{path} holds an NFM alone; import its SAE and pass this file as the NFM")
    else:
        raise ValueError(f"{path}: no research SAE keys (encoder.0.weight or primary_sae.encoder.0.weight); "
                         f"has {', '.join(sorted(sd)[:12])}")
    sd = {n: t.detach().to("cpu", torch.float32) for n, t in sd.items()}
    for n, t in sd.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{path}: {n} holds NaN or Inf")
    expected = model.state_dict()
    for n, t in sd.items():
        if n in expected and tuple(expected[n].shape) != tuple(t.shape):
            raise ValueError(f"{path}: {n} has shape {tuple(t.shape)}, expected {tuple(expected[n].shape)}")
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path}: state dict does not match {type(model).__name__}: "
                         f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    return model.to(device)


# --------------------------------------------------------------------------- dispatch


def import_sae(source: str, path, **kwargs):
    """Import ``path`` written by ``source`` (one of :data:`SOURCES`); keyword arguments
    go to that source's importer."""
    fns = {"sparsify": import_sparsify, "saelens": import_saelens,
           "dictionary_learning": import_dictionary_learning, "research-pt": import_research_pt}
    if source not in fns:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    return fns[source](path, **kwargs)


__all__ = [
    "SOURCES",
    "build_topk_sae",
    "import_dictionary_learning",
    "import_research_pt",
    "import_sae",
    "import_saelens",
    "import_sparsify",
    "load_torch_weights",
]
