"""FSDP2 on CPU ranks, one unit at a time (issue 17): tests/support/fsdp_cpu_units.py on 2 gloo ranks."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.helpers import PY, REPO, child_env, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def cases() -> dict:
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{free_port()}", str(REPO / "tests" / "support" / "fsdp_cpu_units.py")]
    proc = subprocess.run(cmd, cwd=REPO, env=child_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    found = [line.split(" ", 2)[1:] for line in proc.stdout.splitlines() if line.startswith("CASE ")]
    return {name: json.loads(result) for name, result in found}


def test_one_weight_unit_is_gathered_into_its_parameter(cases):
    """Forward and backward gather the frozen weight twice each; every forward computes with the
    weight in the storage FSDP2 all-gathered into, with the plain products and input gradients
    (the second gather rewrites the storage autograd saved: its version counter is not bumped)."""
    assert cases["one_weight"] == {"equal": True, "gathers": 4, "in_place": True}


def test_two_parameter_unit_keeps_its_own_buffer(cases):
    """The twin: a weight and a bias interleave in the all-gather output, which is then FSDP2's own."""
    assert cases["two_params"] == {"equal": True, "gathers": 1, "in_place": False}


def test_recomputed_projections_are_resharded(cases):
    """Under activation checkpointing a block's projections are gathered two at a time in
    backward, not all three (the twin, without the hook); same gradient either way."""
    assert cases["recompute"]["most_gathered_in_backward"] == 2
    assert cases["recompute_hookless"]["most_gathered_in_backward"] == 3
    assert cases["recompute"]["grad"] == cases["recompute_hookless"]["grad"] > 0
