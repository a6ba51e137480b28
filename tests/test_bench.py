"""The benchmark harness runs end to end on a tiny configuration and reports
what the README promises: side-by-side ratios, transient memory, op figures,
and a JSON file that names the machine. (No speed is asserted here: speed
goals live in bench/.)"""
import json
import subprocess
import sys

import pytest

bench = pytest.importorskip("dualenc_fast.bench")


def test_bench_tiny_reports_ratios_memory_and_machine(tmp_path):
    out = tmp_path / "r.json"
    lines = []
    res = bench.run("tiny", repeats=1, warmup=0, paths=("reference", "fused", "module"), out=str(out), log=lines.append)
    saved = json.loads(out.read_text())
    assert saved["config"] == "tiny" and saved["machine"]["cpu_count"] >= 1
    assert set(saved["speedup"]) == {"fused_vs_reference", "module_vs_reference"}
    assert all(r > 0 for r in res["speedup"].values())
    assert set(saved["transient_memory_bytes"]) == {"reference", "fused", "module"}
    assert 0 < saved["ops"]["topk_encode_over_bare_gemm"]
    assert any("fused_vs_reference" in line for line in lines)


def test_bench_reports_floor_and_dropin_ratios(tmp_path):
    out = tmp_path / "r.json"
    lines = []
    bench.run("tiny", repeats=2, warmup=0, paths=("fused", "module", "dropin", "floor"), memory=False,
              out=str(out), log=lines.append)
    saved = json.loads(out.read_text())
    assert set(saved["over_floor"]) == {"fused", "module", "dropin"}
    assert all(r > 0 for r in saved["over_floor"].values())
    assert set(saved["over_floor_paired"]) == set(saved["over_floor"])
    assert saved["dropin_over_module"] > 0
    assert any("the floor" in line for line in lines) and any("dropin / module" in line for line in lines)


def test_new_configs_are_the_issue_shapes():
    assert bench.CONFIGS["S"] == dict(d=2304, F=65536, k=64, K=128, N=32, B=8192)
    assert bench.CONFIGS["CPU-S"] == dict(d=512, F=65536, k=32, K=64, N=16, B=1024)


def test_paths_compute_the_same_step():
    import torch

    s = bench.Shape(**bench.CONFIGS["tiny"])
    p = bench.make_params(s, "cpu", torch.float64)
    x = torch.randn(s.B, s.d, dtype=torch.float64)
    a = bench.forward_fused(p, x, s, training=False)
    b = bench.forward_peer(p, x, s, training=False)
    torch.testing.assert_close(a, b)


def test_bench_cli_rejects_unknown_path():
    r = subprocess.run([sys.executable, "-m", "dualenc_fast.cli", "bench", "--paths", "fused,turbo"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown path(s) ['turbo']" in r.stderr


def test_density_sweep_times_both_forms_and_restores_strategy(tmp_path):
    from dualenc_fast import ops

    before = ops.sparse_strategy()
    out = tmp_path / "sweep.json"
    lines = []
    bench.run("tiny", repeats=1, warmup=0, paths=(), memory=False, out=str(out), log=lines.append, sweep_ks=[8, 512])
    rows = json.loads(out.read_text())["density_sweep"]["rows"]
    assert [row["k"] for row in rows] == [8, 512]
    assert all(row["gather_s"] > 0 and row["dense_s"] > 0 for row in rows)
    # default CPU threshold 10%: 8/1024 gathers, 512/1024 goes dense
    assert [row["picks"] for row in rows] == ["gather", "dense"]
    assert any("dense/gather" in line for line in lines)
    assert ops.sparse_strategy() == before


def test_bench_cli_rejects_bad_sweep():
    r = subprocess.run([sys.executable, "-m", "dualenc_fast.cli", "bench", "--config", "tiny", "--paths", "",
                        "--sweep-k", "8,x"], capture_output=True, text=True)
    assert r.returncode == 2 and "--sweep-k must be comma-separated integers, got '8,x'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "dualenc_fast.cli", "bench", "--config", "tiny", "--paths", "",
                        "--no-memory", "--sweep-k", "2000"], capture_output=True, text=True)
    assert r.returncode == 2 and "need 0 < k <= F = 1024, got k = 2000" in r.stderr


def test_design_ab_times_each_design_off_and_on_and_restores_it(tmp_path):
    from dualenc_fast import ops

    out = tmp_path / "ab.json"
    lines = []
    bench.run("tiny", repeats=1, warmup=0, paths=(), memory=False, out=str(out), log=lines.append,
              designs=tuple(bench.DESIGNS))
    ab = json.loads(out.read_text())["design_ab"]
    assert set(ab) == set(bench.DESIGNS) and "shared_transposes" in ab
    for row in ab.values():
        assert row["on_s"] > 0 and row["off_s"] > 0 and row["off_over_on_paired"] > 0
        assert len(row["on_all"]) == len(row["off_all"]) == 3
    assert any("off/on" in line for line in lines)
    assert ops.share_transposes() is True
    # a non-default alternative is measured switched on, and left off after
    assert ab["staged_weight_grads"]["switch"] == "on" and ab["shared_transposes"]["switch"] == "off"
    assert any("staged_weight_grads" in line and "measured switched on" in line for line in lines)
    assert ops.dense_weight_grads() == "gemm"


def test_design_ab_switches_each_entry_the_way_it_says(monkeypatch):
    """A two-field entry's factory runs on the "off" side (a shipped design
    switched off), a three-field "on" entry's on the "on" side (an alternative
    switched on); anything else in the third field is refused."""
    from contextlib import contextmanager

    seen = []

    def factory():
        @contextmanager
        def scope():
            seen.append("factory")
            yield
        return scope()

    def step(x_):
        seen.append("step")
        return x_

    calls = {}

    def fake_time_paths(paths, x, device, repeats, warmup):
        out = {}
        for side, fn in paths.items():
            seen.clear()
            fn(x)
            calls[side] = "factory" in seen
            out[side] = [1.0, 1.0, 1.0]
        return out

    monkeypatch.setattr(bench, "time_paths", fake_time_paths)
    monkeypatch.setattr(bench, "DESIGNS", {"a": ("shipped", factory), "b": ("alternative", factory, "on"),
                                           "c": ("broken", factory, "sideways")})
    ab = bench.design_ab(step, 0, "cpu", ["a"], repeats=3, log=lambda *_: None)
    assert ab["a"]["switch"] == "off" and calls == {"on": False, "off": True}
    ab = bench.design_ab(step, 0, "cpu", ["b"], repeats=3, log=lambda *_: None)
    assert ab["b"]["switch"] == "on" and calls == {"on": True, "off": False}
    with pytest.raises(ValueError, match="third field must be 'off' or 'on'"):
        bench.design_ab(step, 0, "cpu", ["c"], repeats=3, log=lambda *_: None)
    assert {bench.design_switch(n) for n in ("a", "b")} == {"off", "on"}


def test_bench_cli_rejects_unknown_design():
    r = subprocess.run([sys.executable, "-m", "dualenc_fast.cli", "bench", "--config", "tiny", "--paths", "",
                        "--no-memory", "--ab", "shared_transposes,turbo"], capture_output=True, text=True)
    assert r.returncode == 2 and "--ab: unknown design(s) ['turbo']" in r.stderr
