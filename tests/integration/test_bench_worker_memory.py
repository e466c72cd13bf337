"""Smoke test of bench/worker_memory.py: a tiny corpus, one round, its JSON line of medians last."""
from __future__ import annotations

import json
import subprocess

from tests.helpers import PY, REPO, child_env


def test_worker_memory_bench_smoke(tmp_path):
    res = subprocess.run([PY, "bench/worker_memory.py", "--docs", "800", "--rounds", "1"], cwd=REPO,
                         env=child_env(TMPDIR=str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert line["docs"] == 800 and list(line) == ["docs", "this"]
    this = line["this"]
    assert this["first_s"] > 0 and this["second_s"] > 0 and 0 < this["uss_mib"] < this["rss_mib"]
