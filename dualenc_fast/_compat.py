"""The flat layout's module names, kept working on top of the subpackages.

Four small pieces:

* :data:`ALIASES` - a module that moved whole (``dualenc_fast.checkpoint`` ->
  ``dualenc_fast.train.checkpoint``) is reachable under its old name through
  :class:`AliasFinder` on ``sys.meta_path``: ``import dualenc_fast.checkpoint``
  returns the very same module object (``sys.modules`` holds it under both
  names; its ``__name__`` and ``__spec__`` stay the new ones), so attribute
  access and ``monkeypatch.setattr`` reach the code that uses them.
* :data:`FACADES` - an old module whose name is now a subpackage
  (``dualenc_fast.train``, ``dualenc_fast.eval``, ``dualenc_fast.analysis``)
  forwards every attribute it does not hold itself to its source modules,
  importing them on first use (never at import time, so a package ``__init__``
  adds no import edges and no cycles); setting such an attribute on the
  package sets it in the source module that defines it (deleting it again
  restores the replaced value), so ``monkeypatch.setattr(dualenc_fast.train,
  "evaluate", ...)`` still reaches the trainer.
* :data:`SHARED` - the atomic-file helpers moved from ``train/checkpoint.py`` to
  ``storage.py``; assigning one on the checkpoint module (a test that patches
  ``checkpoint.save_file`` to fake a torn write) assigns it in ``storage`` too.
* relative imports written for the flat layout inside a moved module
  (``from .modules import X`` in ``train/trainer.py``, ``from . import ops``,
  ``from . import __version__``) resolve to where those modules and names are
  now (:func:`relative_aliases`, :data:`ROOT_ATTRS`).

:data:`ROOT_NAMES` are the names ``dualenc_fast`` itself resolves lazily.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
from pathlib import Path

ALIASES = {
    "dualenc_fast.modules": "dualenc_fast.nn.modules",
    "dualenc_fast.checkpoint": "dualenc_fast.train.checkpoint",
    "dualenc_fast.data": "dualenc_fast.train.data",
    "dualenc_fast.report": "dualenc_fast.eval.report",
    "dualenc_fast.integration": "dualenc_fast.analysis.integration",
}

# The flat layout's top-level modules, and the subpackages modules moved into: a
# relative import written for the flat layout inside a moved module
# (``from .modules import X`` in train/trainer.py, ``from . import ops``) asks for
# ``dualenc_fast.train.modules``, which resolves to where ``modules`` now is.
FLAT_MODULES = ("_ext", "analysis", "bench", "checkpoint", "cli", "commands", "data", "eval",
                "integration", "lm", "modules", "ops", "reference", "report", "train")
SUBPACKAGES = ("nn", "train", "eval", "analysis")
_RELATIVE: dict = {}


def relative_aliases() -> dict:
    """``dualenc_fast.<subpackage>.<flat name>`` -> the module now holding it, for every
    pair that is not a real module of the subpackage."""
    if not _RELATIVE:
        root = Path(__file__).resolve().parent
        for sub in SUBPACKAGES:
            for name in FLAT_MODULES:
                if (root / sub / f"{name}.py").exists() or (root / sub / name / "__init__.py").exists():
                    continue
                flat = f"dualenc_fast.{name}"
                _RELATIVE[f"dualenc_fast.{sub}.{name}"] = ALIASES.get(flat, flat)
    return _RELATIVE


def resolve(fullname: str):
    """The module an old module name stands for (None when it is no old name)."""
    return ALIASES.get(fullname) or relative_aliases().get(fullname)


# names of the flat package's root that ``from . import NAME`` in a moved module asks its new package for
ROOT_ATTRS = ("__version__", "build_info", "extension_available")

FACADES = {
    "dualenc_fast.nn": ("dualenc_fast.nn.modules", "dualenc_fast.nn.serialize"),
    "dualenc_fast.train": ("dualenc_fast.train.trainer",),
    "dualenc_fast.eval": ("dualenc_fast.eval.metrics", "dualenc_fast.eval.report"),
    "dualenc_fast.analysis": ("dualenc_fast.analysis.weights",),
}

ROOT_NAMES = {
    "TopKSparseAutoencoder": "dualenc_fast.nn.modules",
    "NeuralFactorizationMachine": "dualenc_fast.nn.modules",
    "JointSAENFM": "dualenc_fast.nn.modules",
    "SparseCode": "dualenc_fast.nn.modules",
    "ops": "dualenc_fast.ops",
    "reference": "dualenc_fast.reference",
    "storage": "dualenc_fast.storage",
    "nn": "dualenc_fast.nn",
    "analysis": "dualenc_fast.analysis",
    "eval": "dualenc_fast.eval",
    "train": "dualenc_fast.train",
    "integration": "dualenc_fast.analysis.integration",
    "report": "dualenc_fast.eval.report",
    "data": "dualenc_fast.train.data",
    "checkpoint": "dualenc_fast.train.checkpoint",
    "modules": "dualenc_fast.nn.modules",
}


class _AliasLoader(importlib.abc.Loader):
    """Hands out the already imported new module under its old name."""

    def __init__(self, target: str):
        self.target = target
        self._spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module):
        module.__spec__ = self._spec  # the import system stamped the alias spec on it: give its own back


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds the old module names (:data:`ALIASES`, :func:`relative_aliases`)."""

    def find_spec(self, fullname, path=None, target=None):
        new = resolve(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, AliasFinder())


def resolve_root(name: str):
    """``dualenc_fast.<name>`` for the names of :data:`ROOT_NAMES` (a module, or a name in one)."""
    target = ROOT_NAMES[name]
    module = importlib.import_module(target)
    if target == f"dualenc_fast.{name}" or f"dualenc_fast.{name}" in ALIASES:
        return module
    return getattr(module, name)


class FacadeModule(types.ModuleType):
    """A package that forwards attributes to the source modules of :data:`FACADES`."""

    def _facade_sources(self):
        return FACADES.get(self.__name__, ())

    def _facade_owner(self, name: str):
        """The loaded source module that defines ``name`` (no import here)."""
        for src in self._facade_sources():
            mod = sys.modules.get(src)
            if mod is not None and name in mod.__dict__:
                return mod
        return None

    def __getattr__(self, name: str):
        if name in ROOT_ATTRS:
            return getattr(sys.modules["dualenc_fast"], name)  # always loaded before a subpackage
        old = relative_aliases().get(f"{self.__name__}.{name}")
        if old is not None and name != self.__name__.rpartition(".")[2]:  # ``from . import ops`` in a moved module
            return importlib.import_module(old)
        if name == "__all__":  # ``from dualenc_fast.train import *`` as from the flat module
            names = []
            for src in self._facade_sources():
                mod = importlib.import_module(src)
                names += getattr(mod, "__all__", [n for n in mod.__dict__ if not n.startswith("_")])
            return names
        if name.startswith("__"):
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        for src in self._facade_sources():
            mod = importlib.import_module(src)
            if name in mod.__dict__:
                return mod.__dict__[name]
        if name in self.__dict__:  # a submodule that importing the sources brought in
            return self.__dict__[name]
        raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")

    def __dir__(self):
        names = set(super().__dir__())
        for src in self._facade_sources():
            names.update(n for n in dir(importlib.import_module(src)) if not n.startswith("__"))
        return sorted(names)

    def __setattr__(self, name: str, value):
        owner = None if name.startswith("__") or _is_submodule(self, name, value) else self._facade_owner(name)
        if owner is None:
            super().__setattr__(name, value)
            return
        # remember what was replaced, so that deleting the attribute again (as
        # ``monkeypatch.undo`` does for a name the package did not hold) restores it
        self.__dict__.setdefault("_facade_replaced", {}).setdefault(name, owner.__dict__[name])
        setattr(owner, name, value)

    def __delattr__(self, name: str):
        if name in self.__dict__:
            super().__delattr__(name)
            return
        owner = self._facade_owner(name)
        if owner is None:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        replaced = self.__dict__.get("_facade_replaced", {})
        if name in replaced:
            setattr(owner, name, replaced.pop(name))
        else:
            delattr(owner, name)


# Names a module took over from another with the code that uses them: assigning one
# on the old module (``monkeypatch.setattr(checkpoint, "save_file", ...)``) assigns it
# in the new one too, as when both were one module.
SHARED = {
    "dualenc_fast.train.checkpoint": ("dualenc_fast.storage", (
        "save_file", "load_file", "_atomic_write", "_fsync_dir", "_prepare", "atomic_write_bytes",
        "atomic_write_text", "atomic_write_json", "atomic_save_tensors", "load_tensors", "read_json")),
}


class SharingModule(types.ModuleType):
    """A module whose :data:`SHARED` names are assigned in their new module as well."""

    def __setattr__(self, name: str, value):
        super().__setattr__(name, value)
        other, names = SHARED.get(self.__name__, (None, ()))
        if name in names:
            setattr(sys.modules[other], name, value)


def share_names(module_name: str) -> None:
    """Make the (importing) module ``module_name`` a :class:`SharingModule`."""
    sys.modules[module_name].__class__ = SharingModule


def _is_submodule(package, name: str, value) -> bool:
    return isinstance(value, types.ModuleType) and value.__name__ == f"{package.__name__}.{name}"


def make_facade(package_name: str) -> None:
    """Turn the (importing) package ``package_name`` into a :class:`FacadeModule`."""
    sys.modules[package_name].__class__ = FacadeModule
