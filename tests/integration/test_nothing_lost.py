"""Issue 21 as a user meets it on a real hf_local base with LoRA: resuming with another adapter is
refused before any engine starts, and a run none of whose checkpoints loads stops instead of
starting over. Each ends with exit 2, one error, and every checkpoint and record intact.
(The HTTP source that dies mid-run: tests/integration/test_trainer_remote.py.)"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.helpers import TINY, run_train
from tests.helpers.inprocess import train_here

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
LORA = ("adapter=lora", "model=hf_local", "trainer.max_steps=4", "checkpoint.every_steps=2", "checkpoint.keep_last=1",
        "trainer.micro_batch_size=2", "optim.lr=1e-2")


def snapshot(run_dir: Path) -> dict[str, str]:
    """sha256 of every file of the run directory but the lock: what must survive untouched."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != "run.lock"}


def error_lines(stderr: str) -> list[str]:
    """The final error: its first line ('error: invalid resume:') and the problems under it."""
    lines = stderr.rstrip().splitlines()
    start = max(i for i, x in enumerate(lines) if x.startswith("error: "))
    return lines[start:]


def test_an_adapter_run_dir_belongs_to_its_adapter(hf_base, tmp_path):
    run_dir = tmp_path / "run"
    common = [*TINY, *LORA, f"model.path={hf_base}", f"run.dir={run_dir}"]
    train_here(common)  # the run whose checkpoints the CLI runs below must leave alone
    first = snapshot(run_dir)
    assert any("step_00000004" in k for k in first) and "metrics.jsonl" in first

    # adapter.r 16 -> 8 and other target modules: refused before any engine starts, naming both
    proc = run_train([*common, "trainer.max_steps=6", "adapter.r=8", "adapter.target_modules=[q_proj,v_proj]"],
                     check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = "\n".join(error_lines(proc.stderr))
    assert "adapter.r: the checkpoint has 16, this run 8" in err
    assert "adapter.target_modules: the checkpoint has ['q_proj', 'k_proj'" in err and "this run ['q_proj', 'v_proj']" in err
    assert "keep the old settings, or start a new run with a new run.dir" in err
    assert "Traceback" not in proc.stderr and "skipping checkpoint" not in proc.stderr
    assert snapshot(run_dir) == first

    # none of its checkpoints loads (the adapter weights garbled): the run stops, nothing starts over
    for f in (run_dir / "checkpoints").glob("step_*/model/*.distcp"):
        f.write_bytes(os.urandom(f.stat().st_size))
    garbled = snapshot(run_dir)
    proc = run_train([*common, "trainer.max_steps=6"], check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = "\n".join(error_lines(proc.stderr))
    assert "the engine cannot load it" in err and "step_00000004" in err
    assert f"none of the 1 checkpoints in {run_dir / 'checkpoints'} loads" in err and "nothing was changed" in err
    assert "Traceback" not in proc.stderr and "resumed from" not in proc.stderr
    assert snapshot(run_dir) == garbled
