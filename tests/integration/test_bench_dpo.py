"""bench/dpo_memory.py --smoke runs every case and prints its JSON line."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import PY, REPO, child_env

pytestmark = pytest.mark.integration


def test_dpo_memory_bench_smoke():
    out = subprocess.run([PY, "bench/dpo_memory.py", "--smoke"], cwd=REPO, env=child_env(), capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["mem_dpo_lora_vs_sft_lora"] > 0 and figures["dpo_pre_step_s"] > 0
