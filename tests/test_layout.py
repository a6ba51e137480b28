"""The package layout: no import cycles inside dualenc_fast, and every public name
importable both the old (flat) way and the new (subpackage) way.

The import graph is built from the source with ``ast``: every ``import`` and
``from ... import`` anywhere in a module (module level, inside functions and
methods), relative or absolute, plus ``importlib.import_module("literal")``
calls (and f-strings with a literal package prefix, which count as edges to
every module under that prefix). Old module names go through the alias table
of :mod:`dualenc_fast._compat` to the modules that now hold them; a name taken
from a facade package (``dualenc_fast.train``, ``.eval``, ``.analysis``,
``.nn``) is an edge to the submodule that defines it, and a facade package
imported as a module is an edge to all of its sources (the conservative
choice). ``python tests/test_layout.py [PACKAGE_DIR]`` prints the graph.
"""
from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

PKG = "dualenc_fast"
ROOT = Path(__file__).resolve().parents[1] / PKG


# --------------------------------------------------------------------------- the graph


def _module_files(pkg_dir: Path) -> dict:
    """``{module name: file}`` for every .py file of the package."""
    out = {}
    for f in sorted(pkg_dir.rglob("*.py")):
        parts = list(f.relative_to(pkg_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _top_level_names(tree: ast.Module) -> set:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name):
                        names.add(n.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                names.add((a.asname or a.name).split(".")[0])
    return names


def _layout_tables():
    """(aliases, facades, root_names) from dualenc_fast._compat, or empty tables
    for a tree that has none (the flat layout)."""
    try:
        compat = importlib.import_module(f"{PKG}._compat")
    except ImportError:
        return {}, {}, {}
    aliases = {**compat.relative_aliases(), **compat.ALIASES}
    root_names = {**dict(compat.ROOT_NAMES), **{a: PKG for a in compat.ROOT_ATTRS}}
    return aliases, {k: tuple(v) for k, v in compat.FACADES.items()}, root_names


def import_graph(pkg_dir: Path = ROOT, tables=None) -> dict:
    """``{module: sorted list of modules of the package it imports}``."""
    files = _module_files(pkg_dir)
    aliases, facades, root_names = tables if tables is not None else _layout_tables()
    trees = {m: ast.parse(f.read_text(encoding="utf-8"), str(f)) for m, f in files.items()}
    defined = {m: _top_level_names(t) for m, t in trees.items()}

    def canon(name: str):
        """The module of the package that ``name`` (a dotted module name) is, or None."""
        name = aliases.get(name, name)
        return name if name in files else None

    def as_module(name: str) -> set:
        """Edges for importing the module ``name`` (and binding it)."""
        c = canon(name)
        if c is None:
            # ``import a.b.c`` where only a prefix is a module of ours
            parts = name.split(".")
            while parts and canon(".".join(parts)) is None:
                parts.pop()
            if not parts:
                return set()
            c = canon(".".join(parts))
        return {c, *facades.get(c, ())}

    def from_import(base: str, attr: str) -> set:
        """Edges for ``from base import attr``."""
        sub = canon(f"{base}.{attr}")
        if sub is not None:
            return {sub, *facades.get(sub, ())}
        b = canon(base)
        if b is None:
            return set()
        if b in facades and attr in root_names and root_names[attr] == PKG:
            return {PKG}  # ``from . import __version__`` in a moved module: the package root's
        if b in facades:
            for src in facades[b]:
                if attr in defined.get(src, ()):
                    return {src}
            return {b, *facades[b]}
        if b == PKG and attr in root_names:
            return {canon(root_names[attr]) or root_names[attr]}
        if files[b].name == "__init__.py" and attr not in defined.get(b, ()):
            return set()  # a compiled submodule (``from . import _C``): imports nothing of ours
        return {b}

    graph = {}
    for mod, tree in trees.items():
        is_pkg = files[mod].name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == PKG or a.name.startswith(PKG + "."):
                        edges |= as_module(a.name)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    up = parts[: len(parts) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                if not (base == PKG or base.startswith(PKG + ".")):
                    continue
                for a in node.names:
                    if a.name == "*":
                        edges |= as_module(base)
                    else:
                        edges |= from_import(base, a.name)
            elif isinstance(node, ast.Call) and node.args:
                f = node.func
                called = (f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else "")
                if called != "import_module":
                    continue
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    name = arg.value
                    if name.startswith(".") and len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                        name = importlib.util.resolve_name(name, node.args[1].value)
                    if name.startswith(PKG):
                        edges |= as_module(name)
                elif isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
                    prefix = str(arg.values[0].value)
                    if prefix.startswith(PKG + ".") and prefix.endswith("."):
                        edges |= {m for m in files if m.startswith(prefix) and "." not in m[len(prefix):]}
        edges.discard(mod)
        edges.discard(None)
        graph[mod] = sorted(edges)
    return graph


def find_cycles(graph: dict) -> list:
    """One concrete cycle (a list of modules, first == last) per strongly connected
    component with more than one module (Tarjan)."""
    index, low, stack, on, sccs = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for comp in sccs:
        members = set(comp)
        start = comp[0]
        # breadth-first search for the shortest way back to ``start`` inside the component
        prev, frontier, found = {start: None}, [start], None
        while frontier and found is None:
            nxt = []
            for v in frontier:
                for w in graph[v]:
                    if w == start:
                        found = v
                        break
                    if w in members and w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path = [start]
        v = found
        while v is not None and v != start:
            path.append(v)
            v = prev[v]
        cycles.append([start] + path[1:][::-1] + [start])
    return cycles


def package_graph(graph: dict) -> dict:
    """The graph between the parts of the package: subpackages and top-level modules."""
    def part(m):
        rest = m[len(PKG) + 1:] if m != PKG else "__init__"
        return rest.split(".")[0]

    out = {}
    for m, deps in graph.items():
        p = part(m)
        out.setdefault(p, set()).update(part(d) for d in deps if part(d) != p)
    return {p: sorted(d) for p, d in sorted(out.items())}


def format_graph(graph: dict) -> str:
    short = lambda m: m[len(PKG) + 1:] if m.startswith(PKG + ".") else m  # noqa: E731
    return "\n".join(f"{short(m):<24} -> {', '.join(short(d) for d in deps) or '-'}" for m, deps in sorted(graph.items()))


# --------------------------------------------------------------------------- tests


def test_no_import_cycles():
    graph = import_graph()
    assert f"{PKG}.nn.modules" in graph and f"{PKG}.train.trainer" in graph, sorted(graph)
    cycles = find_cycles(graph)
    assert not cycles, "import cycles inside the package:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_subpackages_are_layered():
    """Collapsed to subpackages and top-level modules the graph is acyclic too:
    nn below train/analysis, analysis below eval, commands on top."""
    pg = package_graph(import_graph())
    cycles = find_cycles(pg)
    assert not cycles, "cycles between subpackages:\n" + "\n".join(" -> ".join(c) for c in cycles)
    assert "train" not in pg["nn"] and "eval" not in pg["analysis"] and "commands" not in pg["eval"]


def test_cycle_finder_reports_a_cycle(tmp_path):
    """The checker itself: a module-level edge and a function-level one that close
    a cycle through an alias are found and printed in order."""
    pkg = tmp_path / PKG
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from dualenc_fast.old_c import g\n")
    (pkg / "sub" / "c.py").write_text("import importlib\nM = importlib.import_module('dualenc_fast.a')\n")
    graph = import_graph(pkg, ({f"{PKG}.old_c": f"{PKG}.sub.c"}, {}, {}))
    assert graph[f"{PKG}.sub.b"] == [f"{PKG}.sub.c"]
    cycles = find_cycles(graph)
    assert cycles == [[f"{PKG}.a", f"{PKG}.sub.b", f"{PKG}.sub.c", f"{PKG}.a"]]


def test_flat_layout_imports_in_moved_modules_resolve(tmp_path):
    """Code written for the flat layout and merged into a moved module (relative
    imports of old siblings, ``from . import __version__``) gets the edges of the
    modules it reaches now, and no false cycle through a package facade."""
    import shutil

    pkg = tmp_path / PKG
    shutil.copytree(ROOT, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    with open(pkg / "train" / "checkpoint.py", "a") as fh:
        fh.write("\n\ndef _flat():\n    from . import __version__, ops\n    from .modules import build_model\n")
    with open(pkg / "eval" / "metrics.py", "a") as fh:
        fh.write("\n\ndef _flat():\n    from .checkpoint import load_tensors\n    from .integration import DEFAULT_STIMULI\n")
    graph = import_graph(pkg)
    assert {f"{PKG}", f"{PKG}.ops", f"{PKG}.nn.modules"} <= set(graph[f"{PKG}.train.checkpoint"])
    assert f"{PKG}.train.trainer" not in graph[f"{PKG}.train.checkpoint"]
    assert {f"{PKG}.train.checkpoint", f"{PKG}.analysis.integration"} <= set(graph[f"{PKG}.eval.metrics"])
    assert not find_cycles(graph)


# Every public name the flat layout exported, with where it lives now.
OLD_TO_NEW = {
    "modules": "nn.modules",
    "checkpoint": "train.checkpoint",
    "data": "train.data",
    "train": "train.trainer",
    "eval": "eval.metrics",
    "report": "eval.report",
    "analysis": "analysis.weights",
    "integration": "analysis.integration",
}


def _public(module) -> list:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n, v in vars(module).items() if not n.startswith("_")
                 and getattr(v, "__module__", None) == module.__name__]
    return sorted(names)


def test_root_names_old_and_new():
    import dualenc_fast as df
    from dualenc_fast import (JointSAENFM, SparseCode, TopKSparseAutoencoder, analysis, checkpoint,  # noqa: F401
                              data, eval, integration, ops, reference, report, train)
    from dualenc_fast.nn import modules

    assert TopKSparseAutoencoder is modules.TopKSparseAutoencoder and SparseCode is modules.SparseCode
    assert df.JointSAENFM is df.nn.JointSAENFM is modules.JointSAENFM
    assert df.NeuralFactorizationMachine is modules.NeuralFactorizationMachine
    assert checkpoint is importlib.import_module("dualenc_fast.train.checkpoint")
    assert data is importlib.import_module("dualenc_fast.train.data")
    assert report is importlib.import_module("dualenc_fast.eval.report")
    assert integration is importlib.import_module("dualenc_fast.analysis.integration")
    assert df.train.TrainConfig is importlib.import_module("dualenc_fast.train.trainer").TrainConfig
    assert callable(df.train.train) and df.train.train.__module__ == "dualenc_fast.train.trainer"
    assert df.checkpoint.load_model is importlib.import_module("dualenc_fast.train.checkpoint").load_model
    assert df.eval.splice_test is importlib.import_module("dualenc_fast.eval.metrics").splice_test
    assert df.analysis.norm_bimodality is importlib.import_module("dualenc_fast.analysis.weights").norm_bimodality
    assert set(df.__all__) <= set(dir(df))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        df.nothing  # noqa: B018


@pytest.mark.parametrize("old", sorted(OLD_TO_NEW))
def test_old_module_paths_reach_the_new_modules(old):
    new = importlib.import_module(f"{PKG}.{OLD_TO_NEW[old]}")
    facade = importlib.import_module(f"{PKG}.{old}")          # import dualenc_fast.checkpoint
    assert facade is new or getattr(facade, "__path__", None) is not None
    assert new.__name__ == f"{PKG}.{OLD_TO_NEW[old]}" and new.__spec__.name == new.__name__
    names = _public(new)
    assert names, new
    for name in names:                                         # from dualenc_fast.checkpoint import X
        assert getattr(facade, name) is getattr(new, name), (old, name)
        ns: dict = {}
        exec(f"from {PKG}.{old} import {name} as got", ns)
        assert ns["got"] is getattr(new, name), (old, name)
        exec(f"from {PKG}.{OLD_TO_NEW[old]} import {name} as got", ns)
        assert ns["got"] is getattr(new, name), (old, name)
    star: dict = {}
    exec(f"from {PKG}.{old} import *", star)
    assert set(getattr(new, "__all__", names)) <= set(star), old
    # private helpers used by code written against the flat layout
    for private in {"eval": ["_LayerSplice", "demo_hook", "iter_batches", "eval_mode", "model_device_dtype"],
                    "train": ["ckpt", "import_saelens", "export_saelens"],
                    "checkpoint": ["atomic_write_json", "atomic_save_tensors", "load_tensors", "read_json",
                                   "save_model", "MODEL_FORMAT"]}.get(old, []):
        assert getattr(facade, private) is not None


def test_patching_an_old_path_reaches_the_code_that_uses_it(monkeypatch):
    """``monkeypatch.setattr(dualenc_fast.train, "evaluate", ...)`` changes what the
    trainer calls, as it did when ``train`` was one module."""
    import dualenc_fast.train as T
    trainer = importlib.import_module("dualenc_fast.train.trainer")
    sentinel = object()
    monkeypatch.setattr(T, "evaluate", sentinel)
    assert trainer.evaluate is sentinel and T.evaluate is sentinel
    monkeypatch.undo()
    assert trainer.evaluate is not sentinel and T.evaluate is trainer.evaluate


def test_patching_a_moved_helper_on_the_checkpoint_module(tmp_path, monkeypatch):
    """The atomic writes moved to storage; a torn write faked through the checkpoint
    module (as code written for the flat layout does) still reaches them."""
    import torch

    from dualenc_fast import checkpoint as C
    from dualenc_fast import storage

    def torn(tensors, path, metadata=None):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C, "save_file", torn)
    assert storage.save_file is torn
    with pytest.raises(OSError, match="(?i)no space"):
        C.atomic_save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(2)})
    monkeypatch.undo()
    assert storage.save_file is C.save_file and storage.save_file is not torn
    C.atomic_save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(2)})


def test_old_paths_work_in_a_fresh_interpreter():
    """The alias finder on its own, with nothing imported before."""
    import subprocess

    code = ("import dualenc_fast.checkpoint as c, dualenc_fast.modules as m, dualenc_fast.report as r\n"
            "from dualenc_fast.integration import integration_study\n"
            "from dualenc_fast.train import TrainConfig, train\n"
            "from dualenc_fast.eval import splice_test, demo_hook\n"
            "import sys\n"
            "assert c is sys.modules['dualenc_fast.train.checkpoint'], c\n"
            "assert m.__name__ == 'dualenc_fast.nn.modules'\n"
            "assert r.__spec__.name == 'dualenc_fast.eval.report'\n"
            "assert train.__module__ == 'dualenc_fast.train.trainer'\n"
            "ns = {'__package__': 'dualenc_fast.train', '__name__': 'dualenc_fast.train._probe'}\n"
            "exec('from . import __version__, ops\\nfrom .modules import build_model\\n"
            "from .checkpoint import load_model\\nfrom .eval import splice_test', ns)\n"
            "assert ns['ops'].__name__ == 'dualenc_fast.ops' and ns['__version__']\n"
            "assert ns['build_model'].__module__ == 'dualenc_fast.nn.modules'\n"
            "print('ok')\n")
    env = dict(__import__("os").environ, PYTHONPATH=str(ROOT.parent))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_model_folders_without_the_trainer(tmp_path):
    """nn.serialize reads what Module.load needs (model, checkpoint and finished run
    folders) without train/; train.checkpoint.load_model reads the rest too."""
    import torch

    from dualenc_fast.nn.modules import JointSAENFM, TopKSparseAutoencoder
    from dualenc_fast.train import checkpoint as C

    torch.manual_seed(0)
    sae = TopKSparseAutoencoder(6, 12, 3, backend="reference")
    x = torch.randn(5, 6)
    sae.save(tmp_path / "run" / "model")
    C.save_checkpoint(tmp_path / "run", 3, sae)
    step = C.latest_checkpoint(tmp_path / "run")
    for folder in (tmp_path / "run" / "model", tmp_path / "run", step):
        back = TopKSparseAutoencoder.load(folder, backend="reference")
        assert torch.equal(back(x)[1], sae(x)[1]), folder
    with pytest.raises(ValueError, match="not a JointSAENFM"):
        JointSAENFM.load(tmp_path / "run")
    C.save_checkpoint(tmp_path / "training", 1, sae)  # a run still in training: no model/ yet
    with pytest.raises(FileNotFoundError, match="train.checkpoint.load_model"):
        TopKSparseAutoencoder.load(tmp_path / "training")
    assert torch.equal(C.load_model(tmp_path / "training", backend="reference")(x)[1], sae(x)[1])


if __name__ == "__main__":  # pragma: no cover
    pkg_dir = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT
    sys.path.insert(0, str(pkg_dir.parent))
    g = import_graph(pkg_dir)
    print(format_graph(g))
    cyc = find_cycles(g)
    print(f"\n{len(cyc)} cycle(s)" + "".join("\n  " + " -> ".join(c) for c in cyc))
    pg = package_graph(g)
    print("\nparts:\n" + "\n".join(f"{p:<12} -> {', '.join(d) or '-'}" for p, d in pg.items()))
    pc = find_cycles(pg)
    print(f"{len(pc)} cycle(s) between parts" + "".join("\n  " + " -> ".join(c) for c in pc))
