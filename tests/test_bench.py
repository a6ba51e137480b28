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
