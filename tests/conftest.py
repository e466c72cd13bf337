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
def llama3_tokenizer(tmp_path_factory):
    """Directory of a tiny Llama-3-style tokenizer (split pattern + byte-level BPE, special
    tokens, chat template with {% generation %} markers), built locally once per session."""
    from data_pipeline.testing import build_llama3_tokenizer

    out = tmp_path_factory.mktemp("llama3_tokenizer")
    build_llama3_tokenizer(out)
    return out
