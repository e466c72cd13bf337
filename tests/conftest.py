"""Fixtures shared by the test files; plain helpers live in tests/helpers."""
from __future__ import annotations

import pytest

from tests.helpers import TINY, losses, run_train
from tests.slurm_cluster import session_cluster


@pytest.fixture(scope="session")
def reference_runs(tmp_path_factory):
    """Uninterrupted runs shared by parity and resume tests, computed once per strategy on demand."""
    cache: dict[tuple, dict[int, float]] = {}
    root = tmp_path_factory.mktemp("reference")

    def get(strategy: str, nproc: int, extra: tuple[str, ...] = ()) -> dict[int, float]:
        key = (strategy, nproc, extra)
        if key not in cache:
            run_dir = root / f"{strategy}-{nproc}-{abs(hash(extra))}"
            run_train([*TINY, f"strategy={strategy}", f"run.dir={run_dir}", *extra], nproc=nproc)
            cache[key] = losses(run_dir)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node SLURM cluster on localhost for the session (tests/slurm_cluster.py)."""
    from tests.slurm_cluster import missing_reason, start_cluster

    yield from session_cluster(tmp_path_factory, missing_reason, start_cluster, "slurm")


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory):
    """Two SLURM nodes in network namespaces of their own, for the session (tests/slurm_netns.py)."""
    from tests.slurm_netns import netns_missing_reason, start_two_node_cluster

    yield from session_cluster(tmp_path_factory, netns_missing_reason, start_two_node_cluster, "slurm2")


@pytest.fixture(scope="session")
def launch_reference(tmp_path_factory) -> dict[int, float]:
    """The launcher tests' uninterrupted reference curve, run once per session (tests/slurm_runs.py)."""
    from tests.slurm_runs import reference_curve

    return reference_curve(tmp_path_factory.mktemp("launch-reference"))
