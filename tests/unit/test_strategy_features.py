"""Twins of the "the curve is unchanged" tests: prove that a feature really ran (docs/STYLE.md §12).

The parity tests show that activation checkpointing and ZeRO-3 offload keep the loss curve; a
feature silently switched off would pass them too. Here each strategy is built in this process
on a real single-rank gloo group, from the YAML the user runs (composed by Hydra, validated by
`load_config`), and the engine itself is asked what it did.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers.inprocess import batch, build, one_rank_group
from train.config import load_config
from train.model import build_model, decoder_layers
from train.step import forward_backward as step_backward
from train.step import optimizer_step
from train.strategies import build_strategy


@pytest.fixture(scope="module")
def info():
    """One real gloo rank (FSDP2 and DeepSpeed need a group)."""
    with one_rank_group("cpu") as info:
        yield info


def mlp_calls(model, strategy, device) -> list[int]:
    """How often each decoder block's MLP started in one forward+backward: twice when the block is
    checkpointed (the backward recomputes it), once when it is not. A pre-hook, because torch's
    recomputation stops as soon as the last saved tensor is rebuilt, before the MLP returns."""
    calls = [0] * len(decoder_layers(model))
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(decoder_layers(model))]
    try:
        step_backward(strategy, [batch(device)], device)
    finally:
        for h in hooks:
            h.remove()
    return calls


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
@pytest.mark.parametrize("on", [True, False])
def test_activation_checkpointing_wraps_and_recomputes_every_block(info, tmp_path, strategy, on):
    model, engine = build(info, tmp_path, f"strategy={strategy}", f"trainer.activation_checkpointing={str(on).lower()}")
    layers = decoder_layers(model)
    assert len(layers) == 2
    checkpointed = sum(getattr(layer, "gradient_checkpointing", None) is True for layer in layers)
    assert checkpointed == (len(layers) if on else 0)
    assert mlp_calls(model, engine, info.device) == [2 if on else 1] * len(layers)


def offload_facts(engine) -> dict:
    """What DeepSpeed's ZeRO-3 optimizer built: its offload flags and where the fp32 master
    partitions, their gradients' home and the partitioned parameters live."""
    opt = engine.optimizer
    return {"config": (engine.zero_offload_optimizer() is not None, engine.zero_offload_param() is not None),
            "flags": (opt.offload_optimizer, opt.offload_param),
            "masters": {t.device.type for t in opt.fp32_partitioned_groups_flat},
            "subgroups": set(getattr(opt, "subgroup_to_device", {}).values()),
            "cpu_param_buffer": bool(getattr(opt, "param_groups_fp16_flat_cpu_memory", None)),
            "param_shards": {p.ds_tensor.device.type for p in engine.module.parameters()}}


def test_zero3_offload_keeps_optimizer_state_and_parameters_on_cpu(info, tmp_path):
    _, strategy = build(info, tmp_path, "strategy=zero3_offload")
    step_backward(strategy, [batch(info.device)], info.device)
    optimizer_step(strategy)
    facts = offload_facts(strategy.engine)
    assert facts == {"config": (True, True), "flags": (True, True), "masters": {"cpu"}, "subgroups": {"cpu"},
                     "cpu_param_buffer": True, "param_shards": {"cpu"}}
    opt = strategy.engine.optimizer
    states = [opt.optimizer.state[t] for t in opt.fp32_partitioned_groups_flat]
    assert states and all(s["exp_avg"].device.type == "cpu" and s["exp_avg"].abs().sum() > 0 for s in states)


def test_zero3_without_offload_builds_no_offload_path(info, tmp_path):
    _, strategy = build(info, tmp_path, "strategy=zero3")
    facts = offload_facts(strategy.engine)
    assert facts["config"] == (False, False) and facts["flags"] == (False, False)
    assert facts["subgroups"] == set() and not facts["cpu_param_buffer"]


def skip_then_apply(info, kind: str, extra: dict) -> list[tuple]:
    """A strategy of `kind` stepped with skip=True, then skip=False: per step (skip, weights
    unchanged, LR unchanged, DeepSpeed's skipped_steps)."""
    cfg = load_config({"strategy": {"kind": kind, "name": kind, **extra},
                       "trainer": {"seq_len": 16, "max_steps": 10}, "optim": {"weight_decay": 0.0}})
    strategy = build_strategy(build_model(cfg.model, 256, 0), cfg, info, accum=1)
    ids = torch.randint(0, 256, (2, 17))
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
             "position_ids": torch.arange(16).expand(2, -1).contiguous()}

    def weights():
        return torch.cat([t.detach().float().flatten().clone() for _, t in strategy.state_tensors()][:3])

    results = []
    for skip in (True, False):
        before, lr = weights(), strategy.lr()
        strategy.forward_backward(batch, sync_grads=True, num_tokens=32)
        strategy.clip_grads()  # the protocol's order: clip, then step (None under DeepSpeed)
        strategy.step(skip=skip)
        results.append((skip, bool(torch.equal(before, weights())), strategy.lr() == lr,
                        getattr(getattr(strategy, "engine", None), "skipped_steps", None)))
    return results


@pytest.mark.parametrize("kind, extra", [("ddp", {}), ("deepspeed", {"zero_stage": 2}),
                                         ("deepspeed", {"zero_stage": 3})])  # both ZeRO norm paths
def test_a_forced_skip_updates_nothing(info, kind, extra):
    """The NaN guard's skip (tests/integration/test_guard_nan.py) really skips: step(skip=True)
    leaves weights (master copies included), LR schedule and DeepSpeed's counters as DeepSpeed's
    own overflow skip leaves them; its twin step(skip=False) changes them."""
    results = skip_then_apply(info, kind, extra)
    ds = kind == "deepspeed"
    assert results[0] == (True, True, True, 1 if ds else None)  # skipped: unchanged
    assert results[1] == (False, False, False, 1 if ds else None)  # applied: changed


@pytest.mark.parametrize("extra,bucket", [({}, 200_000), ({"zero_optimization": {"reduce_bucket_size": 10**6}}, 10**6)])
def test_zero3_on_cpu_ranks_takes_small_buckets_and_no_reuse_window(info, extra, bucket):
    """DeepSpeed's defaults on a CPU rank keep every page the trainable gradients reach resident (a
    5e8-element bucket), step the optimizer on fp32 copies of the whole partition (sub-groups of
    1e9), and, from step 2 on, keep every module it reuses within 1e9 elements gathered (a whole
    small model). ZeRO-3 there gets CPU_ZERO3 unless the user's `strategy.deepspeed` names a key;
    the planner counts the same bucket and sub-group."""
    from launch.plan import CPU_REDUCE_BUCKET as PLANNED
    from launch.plan import CPU_SUB_GROUP as PLANNED_GROUP
    from train.strategies.deepspeed import CPU_REDUCE_BUCKET, CPU_SUB_GROUP, ds_config

    cfg = load_config({"strategy": {"kind": "deepspeed", "name": "zero3", "zero_stage": 3, "deepspeed": extra}})
    zero = ds_config(cfg, info, accum=1)["zero_optimization"]
    assert zero["reduce_bucket_size"] == bucket
    assert (zero["sub_group_size"], zero["stage3_max_reuse_distance"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (200_000, 0, 0, 0)
    assert PLANNED == CPU_REDUCE_BUCKET == 200_000 and PLANNED_GROUP == CPU_SUB_GROUP == 200_000
    cfg2 = load_config({"strategy": {"kind": "deepspeed", "name": "zero2", "zero_stage": 2}})
    assert ds_config(cfg2, info, accum=1)["zero_optimization"] == {"stage": 2}  # the twin: stage 2 keeps DeepSpeed's
