"""Smoke test of bench/export_quality.py: the real exporter on a 1-layer model, two formats, one JSON line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_export_quality_smoke():
    proc = subprocess.run([sys.executable, "bench/export_quality.py", "--smoke"], cwd=REPO, capture_output=True,
                          text=True, timeout=280, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["format"]: r for r in result["demo"]["formats"]}
    assert set(rows) == {"q8_0", "q4_k_m"} and rows["q4_k_m"]["size_mib"] < rows["q8_0"]["size_mib"]
    assert abs(result["demo_q8_0_delta_pct"]) < 1 and rows["q4_k_m"]["fallback_tensors"] == 0
