"""trainer.compile=true (per-block torch.compile) and checkpoint.async=true (background writes).

Each "same curve" test has a twin that proves the feature ran: the blocks are compiled modules,
and an async checkpoint is not published until its write has finished.
"""
from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from torch._dynamo.eval_frame import OptimizedModule

from tests.helpers import CONSTANT_B4, TINY, child_env, losses, run_train
from train.checkpoint import Checkpointer, TrainState
from train.config import load_config
from train.dist import DistInfo
from train.model import build_model, decoder_layers
from train.strategies import build_strategy

BASE = (*TINY, *CONSTANT_B4)
REF = ("trainer.max_steps=12", *CONSTANT_B4)  # the same reference runs as test_trainer_resume.py's


def ckpt_names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_compiled_blocks_match_eager_on_two_ranks(strategy, tmp_path, reference_runs):
    run_train([*BASE, f"strategy={strategy}", "trainer.max_steps=12", "trainer.compile=true",
               f"run.dir={tmp_path}"], nproc=2, timeout=900)
    eager = reference_runs(strategy, 2, REF)
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, 13))
    for step, loss in eager.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step


def test_compile_wraps_every_decoder_block():
    """The twin: after the strategy is applied, every decoder block is a compiled module, and the
    embedding and head are not (compile is per block, before sharding)."""
    cfg = load_config({"trainer": {"compile": True, "device": "cpu"}}, world_size=1)
    model = build_model(cfg.model, 64, seed=0)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    strategy = build_strategy(model, cfg, info, accum=1)
    blocks = decoder_layers(strategy.model)
    assert blocks and all(isinstance(b, OptimizedModule) for b in blocks)
    assert not isinstance(strategy.model.get_input_embeddings(), OptimizedModule)
    eager = build_strategy(build_model(cfg.model, 64, seed=0),
                           load_config({"trainer": {"device": "cpu"}}, world_size=1), info, accum=1)
    assert not any(isinstance(b, OptimizedModule) for b in decoder_layers(eager.model))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkill_while_async_write_in_flight_keeps_previous_latest_and_resumes_exactly(tmp_path, reference_runs):
    args = [*BASE, "strategy=fsdp", "trainer.max_steps=12", "checkpoint.every_steps=4", "checkpoint.async=true",
            f"run.dir={tmp_path}"]
    proc = run_train(args, nproc=2, check=False, env=child_env(SCALETRAIN_FAULT="checkpoint.async_inflight@8"))
    assert proc.returncode != 0
    # step 4 was written in the background and published before step 8's save began; step 8 never was
    assert ckpt_names(tmp_path) == ["step_00000004"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    out = run_train(args, nproc=2)
    assert f"resumed from {tmp_path}/checkpoints/step_00000004" in out.stderr + out.stdout
    assert losses(tmp_path) == pytest.approx(reference_runs("fsdp", 2, REF), rel=0, abs=0)
    assert ckpt_names(tmp_path)[-1] == "step_00000012"


class _BackgroundWrite:
    """A strategy whose engine write is a real Future the test completes (or fails) by hand."""

    def __init__(self) -> None:
        self.future: Future = Future()

    def save_async(self, path: Path) -> list[Future]:
        (path / "model").mkdir()
        (path / "model" / "shard").write_bytes(b"x" * 10)
        return [self.future]


def _checkpointer(tmp_path: Path) -> Checkpointer:
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return Checkpointer(tmp_path / "checkpoints", info, config_yaml="a: 1\n", keep_last=3)


def test_async_checkpoint_is_published_only_after_its_write_completes(tmp_path):
    ckpt, engine = _checkpointer(tmp_path), _BackgroundWrite()
    final = ckpt.save(TrainState(step=4), engine, {"pos": 1}, blocking=False)
    ckpt.poll()
    assert not final.exists() and not (tmp_path / "checkpoints" / "latest").exists()  # still writing
    engine.future.set_result(None)
    ckpt.poll()
    assert final.is_dir() and (tmp_path / "checkpoints" / "latest").read_text().strip() == final.name
    assert "model/shard" in (final / "trainer_state.json").read_text()


def test_failed_async_write_is_reported_and_never_named_by_latest(tmp_path, caplog):
    ckpt = _checkpointer(tmp_path)
    good = _BackgroundWrite()
    good.future.set_result(None)
    ckpt.save(TrainState(step=2), good, {}, blocking=False)
    bad = _BackgroundWrite()
    ckpt.save(TrainState(step=4), bad, {}, blocking=False)
    bad.future.set_exception(OSError(28, "No space left on device"))
    ckpt.wait()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert ckpt_names(tmp_path) == ["step_00000002"]
    assert not (tmp_path / "checkpoints" / ".tmp-step_00000004").exists()
    assert "could not write checkpoint" in caplog.text and ".tmp-step_00000004" in caplog.text
    assert "No space left" in caplog.text and "still names step_00000002" in caplog.text


def test_compile_with_zero3_is_refused_naming_the_combination_and_the_fix():
    from train.config import ConfigError

    raw = {"trainer": {"compile": True}, "strategy": {"kind": "deepspeed", "name": "zero3", "zero_stage": 3}}
    with pytest.raises(ConfigError, match=r"trainer.compile=true with strategy=zero3.*use strategy=fsdp"):
        load_config(raw, world_size=1)
    raw["strategy"]["zero_stage"] = 2
    assert load_config(raw, world_size=1).trainer.compile
