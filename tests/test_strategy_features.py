"""Twins of the "the curve is unchanged" tests: prove that a feature really ran (STYLE 12).

The parity tests show that activation checkpointing and ZeRO-3 offload keep the loss curve; a
feature silently switched off would pass them too. Here each strategy is built in this process
on a real single-rank gloo group, from the YAML the user runs (composed by Hydra, validated by
`load_config`), and the engine itself is asked what it did.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.helpers import compose_train, free_port
from train.config import load_config
from train.dist import DistInfo
from train.model import build_model, decoder_layers
from train.strategies import build_strategy

VOCAB = 256  # the synthetic data's vocabulary
CPU = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def group():
    """One real gloo rank (FSDP2 and DeepSpeed need a group); the env is what torchrun would set."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(free_port())).items():
            mp.setenv(k, v)
        dist.init_process_group("gloo", rank=0, world_size=1)
        yield
        dist.destroy_process_group()


def build(tmp_path, *overrides: str):
    """(plain model, strategy) from the composed config, as the loop builds them."""
    cfg = load_config(compose_train(["model=tiny", f"run.dir={tmp_path}/run", *overrides]), world_size=1)
    model = build_model(cfg.model, VOCAB, cfg.trainer.seed)
    return model, build_strategy(model, cfg, CPU, 1)


def batch(seq_len: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (2, seq_len + 1), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(),
            "position_ids": torch.arange(seq_len).repeat(2, 1)}


def mlp_calls(model, strategy) -> list[int]:
    """How often each decoder block's MLP started in one forward+backward: twice when the block is
    checkpointed (the backward recomputes it), once when it is not. A pre-hook, because torch's
    recomputation stops as soon as the last saved tensor is rebuilt, before the MLP returns."""
    calls = [0] * len(decoder_layers(model))
    hooks = [layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(decoder_layers(model))]
    try:
        strategy.forward_backward(batch(), sync_grads=True)
    finally:
        for h in hooks:
            h.remove()
    return calls


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
@pytest.mark.parametrize("on", [True, False])
def test_activation_checkpointing_wraps_and_recomputes_every_block(group, tmp_path, strategy, on):
    model, engine = build(tmp_path, f"strategy={strategy}", f"trainer.activation_checkpointing={str(on).lower()}")
    layers = decoder_layers(model)
    assert len(layers) == 2
    checkpointed = sum(getattr(layer, "gradient_checkpointing", None) is True for layer in layers)
    assert checkpointed == (len(layers) if on else 0)
    assert mlp_calls(model, engine) == [2 if on else 1] * len(layers)


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


def test_zero3_offload_keeps_optimizer_state_and_parameters_on_cpu(group, tmp_path):
    _, strategy = build(tmp_path, "strategy=zero3_offload")
    strategy.forward_backward(batch(), sync_grads=True)
    strategy.step()
    facts = offload_facts(strategy.engine)
    assert facts == {"config": (True, True), "flags": (True, True), "masters": {"cpu"}, "subgroups": {"cpu"},
                     "cpu_param_buffer": True, "param_shards": {"cpu"}}
    opt = strategy.engine.optimizer
    states = [opt.optimizer.state[t] for t in opt.fp32_partitioned_groups_flat]
    assert states and all(s["exp_avg"].device.type == "cpu" and s["exp_avg"].abs().sum() > 0 for s in states)


def test_zero3_without_offload_builds_no_offload_path(group, tmp_path):
    _, strategy = build(tmp_path, "strategy=zero3")
    facts = offload_facts(strategy.engine)
    assert facts["config"] == (False, False) and facts["flags"] == (False, False)
    assert facts["subgroups"] == set() and not facts["cpu_param_buffer"]
