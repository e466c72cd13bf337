"""Bytes of model state (parameters, gradients, optimizer) each rank really holds, per strategy.

Run under torchrun with 2 gloo ranks: `torchrun --nproc_per_node 2 tests/support/dist_state_bytes.py
[strategy[/adapter] ...] [-- training overrides]` (`fsdp/lora`: LoRA on the tiny model, applied as
the trainer applies it). For each strategy it builds the tiny model and the
strategy exactly as the trainer does (train.strategies.build_strategy), runs one full step
(so optimizer state exists) and the backward of a second (so gradients exist), then sums the
engine's real tensors, one storage counted once. Rank 0 prints one JSON line per strategy
with the largest figure over the ranks. tests/integration/test_plan.py compares them with the planner.
"""
from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from data_pipeline import build_loader  # noqa: E402
from train import dist as d  # noqa: E402
from train.adapters.lora import apply_adapter  # noqa: E402
from train.config import load_config  # noqa: E402
from train.model import build_model  # noqa: E402
from train.step import forward_backward as step_backward
from train.step import optimizer_step
from train.strategies import build_strategy  # noqa: E402


def compose_config(overrides: list[str]):
    with initialize_config_dir(str(REPO / "conf"), version_base=None):
        raw = OmegaConf.to_container(compose("train", overrides), resolve=True)
    return load_config(raw)


class Tally:
    """Sum tensor bytes, counting memory once: views into a flat buffer (ZeRO keeps its partitions
    as views of one) and aliases add only the bytes not already counted."""

    def __init__(self) -> None:
        self.spans: list[tuple[int, int]] = []

    def add(self, tensors) -> int:
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            t = t.to_local() if hasattr(t, "to_local") else t
            if t.numel() == 0:
                continue
            start = t.data_ptr()
            total += self._claim(start, start + t.numel() * t.element_size())
        return total

    def _claim(self, start: int, end: int) -> int:
        """Bytes of [start, end) not claimed before; claims them."""
        free, cursor = 0, start
        for a, b in sorted(self.spans):
            if b <= cursor or a >= end:
                continue
            free += max(0, a - cursor)
            cursor = max(cursor, b)
        free += max(0, end - cursor)
        self.spans.append((start, end))
        return free


def _flat(obj):
    """Every tensor inside nested dicts/lists/tuples."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _flat(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _flat(v)


GRAD_BUFFERS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer",
                "fp32_groups_gradient_flat_partition")
"""Where DeepSpeed's ZeRO optimizers keep reduced gradient partitions."""


def _parts(strategy):
    engine = getattr(strategy, "engine", None)
    model = engine.module if engine is not None else strategy.model
    zero = engine.optimizer if engine is not None else None
    return list(model.parameters()), zero, torch_optimizer(strategy)


def torch_optimizer(strategy) -> torch.optim.Optimizer:
    """The torch optimizer that holds Adam's state, wherever this strategy keeps it
    (DeepSpeed: inside its ZeRO optimizer; DDP/FSDP2: directly or in a helper object)."""
    engine = getattr(strategy, "engine", None)
    for path in ("engine.optimizer.optimizer", "optim.optimizer", "optimizer", "engine.optimizer"):
        obj = strategy
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.optim.Optimizer):
            return obj
    raise AssertionError(f"no torch optimizer found on {type(strategy).__name__} (engine {type(engine).__name__})")


def grad_bytes(strategy) -> int:
    params, zero, _ = _parts(strategy)
    grads = [p.grad for p in params]
    for name in GRAD_BUFFERS:
        grads.extend(_flat(getattr(zero, name, None)))
    return Tally().add(grads)


def peak_grad_bytes(strategy, batch) -> int:
    """Largest gradient footprint seen after any parameter's gradient landed during one backward
    (ZeRO-1 holds full gradients until the end of backward, then keeps only its partition)."""
    params, _, _ = _parts(strategy)
    peak = [0]
    hooks = [p.register_post_accumulate_grad_hook(lambda _p: peak.append(max(peak.pop(), grad_bytes(strategy))))
             for p in params if p.requires_grad]
    try:
        step_backward(strategy, [batch], batch["input_ids"].device)
    finally:
        for h in hooks:
            h.remove()
    return max(peak[0], grad_bytes(strategy))


def state_bytes(strategy, batch) -> dict[str, int]:
    """params / grads / optimizer bytes this rank holds, read from the engine's own objects."""
    params, zero, inner = _parts(strategy)
    tally = Tally()
    # ZeRO-3 keeps tensors below its persistence threshold whole beside their partition
    whole = [p.data for p in params if getattr(p, "ds_persist", False)]
    out = {"params": tally.add([*(getattr(p, "ds_tensor", p) for p in params), *whole])}
    masters = [p for g in inner.param_groups for p in g["params"]]  # ZeRO-1/2's fp32 partitions
    # ZeRO-3's, handed to the torch optimizer one sub-group at a time; in fp32 they are the module's
    # flat partition (train/strategies/deepspeed.py `_share_fp32_masters`), counted once
    masters += list(getattr(zero, "fp32_partitioned_groups_flat", None) or [])
    out["optimizer"] = tally.add([*masters, *_flat(list(inner.state.values()))])
    out["grads"] = peak_grad_bytes(strategy, batch)
    out["grads_held"] = grad_bytes(strategy)  # after backward, before the optimizer step
    return out


def main() -> None:
    args = sys.argv[1:]
    names = args[:args.index("--")] if "--" in args else args
    extra = args[args.index("--") + 1:] if "--" in args else []
    info = d.init_distributed("cpu", need_group=True)
    for name in names:
        strategy_name, _, adapter = name.partition("/")
        cfg = compose_config([f"strategy={strategy_name}", f"adapter={adapter or 'none'}", "model=tiny",
                              "trainer.seq_len=32", "trainer.micro_batch_size=2", "run.dir=/tmp/unused", *extra])
        model = apply_adapter(build_model(cfg.model, cfg.data.vocab_size, cfg.trainer.seed), cfg.adapter)
        n_params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        shape = {k: getattr(model.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                       "num_hidden_layers", "num_attention_heads",
                                                       "num_key_value_heads", "tie_word_embeddings")}
        strategy = build_strategy(model, cfg, info, accum=1)
        batches = iter(build_loader(cfg.data, rank=info.rank, world_size=info.world_size,
                                    micro_batch_size=2, seq_len=32))
        step_backward(strategy, [next(batches)], info.device)
        optimizer_step(strategy)
        mine = state_bytes(strategy, next(batches))
        every = [None] * info.world_size
        dist.all_gather_object(every, mine)
        if info.is_main:
            worst = {k: max(r[k] for r in every) for k in mine}
            print(json.dumps({"strategy": name, "params_count": n_params, "trainable_count": trainable,
                              "base_dtype": getattr(cfg.model, "base_dtype", "fp32"), "shape": shape,
                              "world_size": info.world_size, **worst}), flush=True)
        del strategy, model
        gc.collect()
    d.shutdown()


if __name__ == "__main__":
    main()
