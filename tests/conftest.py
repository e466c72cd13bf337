"""Fixtures shared by the test files; plain helpers live in tests/helpers."""
from __future__ import annotations

import pytest

from tests.helpers import TINY, losses, run_train


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
def hf_base(tmp_path_factory):
    """A tiny Llama saved with save_pretrained: the base that the adapter tests fine-tune."""
    from tests.helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("hf_base"), seed=7)
