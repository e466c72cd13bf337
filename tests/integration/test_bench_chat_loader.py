"""Smoke test of bench/chat_loader.py: a tiny run ends with its JSON line, prepare figures included
(the bench itself asserts that render masks and marker masks give the same shards)."""
from __future__ import annotations

import json
import subprocess

from tests.helpers import PY, REPO, child_env


def test_chat_loader_bench_smoke():
    res = subprocess.run([PY, "bench/chat_loader.py", "--docs", "200", "--seconds", "0.2", "--seq-len", "1024",
                          "--prepare-convs", "32"], cwd=REPO, env=child_env(), capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert line["prepare_render_convs_per_s"] > 0 and line["prepare_markers_convs_per_s"] > 0
    assert line["chat_pack_batches_per_s"] > 0
