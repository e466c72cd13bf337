"""DataLoader workers share their rank's per-document arrays (data_pipeline/read/shared.py).

A worker receives its RankStream pickled by multiprocessing's ForkingPickler (the forkserver start,
with torch's reductions registered): those bytes must not grow with the corpus's documents, while
a plain pickle of the same stream does (the twin: the measurement sees a copy when there is one).
"""
from __future__ import annotations

import copy
import multiprocessing.resource_sharer
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions, as DataLoader does)

from data_pipeline.read.shared import for_pickle
from data_pipeline.read.table import PER_DOC
from tests.support.streams import index_stream as _stream


@pytest.fixture(autouse=True)
def _stop_sharer():
    """ForkingPickler outside a process start hands descriptors to multiprocessing's resource
    sharer (a thread); stop it after each test."""
    yield
    multiprocessing.resource_sharer.stop()


@pytest.mark.parametrize("chat", [False, True], ids=["text", "chat"])
def test_worker_bytes_do_not_grow_with_documents(chat):
    small, large = _stream(1_000, chat), _stream(100_000, chat)
    grows = len(ForkingPickler.dumps(large)) - len(ForkingPickler.dumps(small))
    assert grows < 1_000   # O(shards): the same 4 shards, 99k more documents
    # twin: a plain pickle copies the per-document arrays (24-32 bytes a document, more for chat's rows)
    assert len(pickle.dumps(large)) - len(pickle.dumps(small)) > 24 * 99_000


def test_rank_keeps_one_shared_copy_and_workers_see_the_same_documents():
    stream = _stream(1_000, chat=True)
    table = stream.spans.reader.table
    before = {name: getattr(table, name).copy() for name in PER_DOC}
    ForkingPickler.dumps(stream)
    ptrs = {name: for_pickle(getattr(table, name)).data_ptr() for name in PER_DOC}
    assert all(for_pickle(getattr(table, name)).is_shared() for name in PER_DOC)
    worker = ForkingPickler.loads(ForkingPickler.dumps(stream))   # a second start: no second copy
    assert {name: for_pickle(getattr(table, name)).data_ptr() for name in PER_DOC} == ptrs
    for name in PER_DOC:
        np.testing.assert_array_equal(getattr(worker.spans.reader.table, name), before[name])
    rows = worker.spans.order._rows(0)
    assert all(isinstance(a, np.ndarray) and isinstance(a.base, torch.Tensor) for a in rows)
    assert worker.spans.order.rows(5, 3) == stream.spans.order.rows(5, 3)


@pytest.mark.parametrize("clone", [copy.deepcopy, lambda s: pickle.loads(pickle.dumps(s))],
                         ids=["deepcopy", "pickle"])
def test_in_process_copies_still_work(clone):
    stream = _stream(1_000, chat=True)
    ForkingPickler.dumps(stream)   # the arrays are in shared memory now; copies are by value
    twin = clone(stream)
    for name in PER_DOC:
        mine, theirs = getattr(stream.spans.reader.table, name), getattr(twin.spans.reader.table, name)
        np.testing.assert_array_equal(theirs, mine)
        assert not np.shares_memory(theirs, mine)
    assert twin.spans.order.rows(0, 4) == stream.spans.order.rows(0, 4)


def test_arrays_past_the_budget_go_as_copies_with_a_warning(monkeypatch):
    """A mixture of many sources would send a worker more file descriptors than Python's forkserver
    passes (251): past SHARED_BUDGET live shared arrays the rest are copied, as before sharing."""
    import gc

    import data_pipeline.read.shared as S

    gc.collect()
    monkeypatch.setattr(S, "SHARED_BUDGET", len(S._live) + 2)
    monkeypatch.setattr(S, "_warned", set())
    stream = _stream(1_000, chat=True)
    table = stream.spans.reader.table
    with pytest.warns(RuntimeWarning, match="DataLoader workers get a copy of the others"):
        worker = ForkingPickler.loads(ForkingPickler.dumps(stream))
    assert len(S._live) == S.SHARED_BUDGET   # two shared, not the chat stream's 10
    assert not all(isinstance(for_pickle(getattr(table, name)), torch.Tensor) for name in PER_DOC)
    for name in PER_DOC:
        np.testing.assert_array_equal(getattr(worker.spans.reader.table, name), getattr(table, name))
    assert worker.spans.order.rows(5, 3) == stream.spans.order.rows(5, 3)


def test_shared_arrays_leave_the_budget_when_freed():
    import gc

    import data_pipeline.read.shared as S

    gc.collect()
    before = len(S._live)
    stream = _stream(1_000, chat=True)
    ForkingPickler.dumps(stream)
    assert len(S._live) > before
    del stream
    gc.collect()
    assert len(S._live) == before
