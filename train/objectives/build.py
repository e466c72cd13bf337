"""Build the objective named by `objective.kind`, and its DPO reference, at the right moments of
the loop's set-up: `build_objective` on the plain model (before the adapter and the strategy, so a
frozen copy is of the starting weights), `setup` once the strategy exists (the precompute pass)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from train.objectives.dpo import DPOObjective
from train.objectives.lm import TokenMeanLoss
from train.objectives.reference import AdapterOff, FrozenCopy, describe, frozen_copy
from train.startup import NULL, Phases


def build_objective(cfg, model: nn.Module, info, loader, phases: Phases | None = None):
    """The objective of `cfg.objective`; `model` is the plain (meta) model, `loader` the train
    loader. A frozen reference's loading is timed into `phases` (`load`) and described in its
    `startup` record (`reference`: dtype, whole bytes, the bytes each rank holds)."""
    o = cfg.objective
    pairs = bool(getattr(loader, "pairs", False))
    if o.kind == "lm":
        if pairs:
            raise ValueError("data.urls holds preference pairs (prepare mode=preference) but "
                             "objective=lm: set objective=dpo, or train on text or chat shards")
        return TokenMeanLoss(padded=getattr(loader, "unit", "tokens") == "rows")
    if not pairs:
        raise ValueError("objective=dpo needs preference shards: prepare them with "
                         "`python -m data_pipeline.prepare mode=preference ...` and set data.urls to them")
    if o.reference == "precompute":
        reference = None  # filled by setup(), after the strategy exists
    elif cfg.adapter.kind != "none":
        # `auto` and `model` alike: with the adapter disabled the base *is* the starting model
        # (LoRA's B starts at 0), so a second copy would only cost memory.
        reference = AdapterOff()
    else:
        with (phases or NULL).phase("load"):
            module = frozen_copy(model, cfg, info)
        held = describe(module, cfg.strategy.name)  # collective
        if phases is not None:
            phases.notes["reference"] = held
        reference = FrozenCopy(module)
    return DPOObjective(o, reference)


def setup(objective, strategy, cfg, info, run_dir: Path, trained: bool) -> None:
    """objective.reference=precompute: the pass over the data (or its stored result)."""
    if getattr(objective, "reference", "") is not None:
        return
    from train.objectives.precompute import Precomputed, load_or_compute

    splits = ["train"] + (["val"] if cfg.trainer.eval_every > 0 else [])
    objective.reference = Precomputed({s: load_or_compute(strategy, cfg, info, Path(run_dir), s, trained)
                                       for s in splits})


def evaluate_pairs(objective: DPOObjective, strategy, cfg, info) -> dict[str, float]:
    """eval_loss and eval_rewards/... over `trainer.eval_batches` validation micro-batches per rank."""
    from data_pipeline import build_loader

    t = cfg.trainer
    loader = build_loader(cfg.data, rank=info.rank, world_size=info.world_size,
                          micro_batch_size=t.micro_batch_size, seq_len=t.seq_len, split="val")
    ref = objective.reference
    if hasattr(ref, "split"):
        ref.split = "val"
    try:
        batches = (b for _, b in zip(range(t.eval_batches), loader))
        return objective.evaluate(strategy.forward_context, strategy.model, batches, info.device)
    finally:
        if hasattr(ref, "split"):
            ref.split = "train"


__all__ = ["build_objective", "setup", "evaluate_pairs"]
