"""StragglerMonitor across two real gloo ranks: the rank that waits for data is named on every rank."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from train.tracking.straggler import StragglerMonitor


def _worker(rank: int, tmp: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    try:
        mon = StragglerMonitor(every=3, margin=0.2)
        out = []
        for step in range(1, 7):
            # Step 1 (start-up, left out): rank 0 is slow. Steps 2-3: balanced.
            # Steps 4-6: rank 1 waits 0.5 s of its 1 s step for data.
            wait = 0.5 if (rank == 1 and step > 3) else 0.01
            out.append(mon.update(step, 9.0 if (step == 1 and rank == 0) else 1.0, wait))
            if step in (3, 4):
                assert bool(mon.metrics()) == (step == 3)  # fresh figures once per exchange
        Path(tmp, f"rank{rank}.json").write_text(json.dumps([out, mon.last]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_straggler_named_on_every_rank(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in (0, 1):
        out, last = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out[:5] == [None] * 5  # only exchange steps (3, 6) can report; step 3 is balanced
        assert "rank 1" in out[5] and "data" in out[5] and "step 6" in out[5]
        assert last["straggler/data_wait_max_s"] == pytest.approx(0.5)
        assert last["straggler/most_waiting_rank"] == 1.0
