"""DeepSpeed ZeRO stages 1-3, with optional CPU offload of optimizer state and parameters.

DeepSpeed owns gradient accumulation, clipping, the optimizer and the LR scheduler step;
we only generate its config from ours. `engine.step()` must be called after every
micro-batch so that its accumulation counters stay right; it updates weights only at the
accumulation boundary.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, ContextManager, Iterator

import deepspeed
import torch
from torch import nn

from train import dist as d
from train.checkpoint_layout import DEEPSPEED_DIR
from train.config import Config
from train.dist import DistInfo
from train.guard import optimizer_tensors
from train.loss import token_loss_sum
from train.model_weights import (
    Weights,
    buffer_owners,
    init_buffers,
    is_meta,
    materialize_full,
    require_weights,
)
from train.schedule import apply_optim_settings, build_scheduler
from train.startup import NULL, Phases
from train.strategies.base import LossFn, Update, compute_dtype, forward_only, param_groups, token_scale
from train.strategies.parallelize import (
    InPlaceAllGather,
    apply_block_transforms,
    apply_frozen_upcast,
    in_backward,
    saves_low,
)

log = logging.getLogger("scaletrain")
TAG = "state"
NATIVE = DEEPSPEED_DIR  # the engine's own checkpoint folder inside a step directory
# DeepSpeed's world-size-independent copy of a checkpoint, made next to deepspeed/ (once) when
# resuming on another number of ranks.
UNIVERSAL = "deepspeed_universal"
# ZeRO-3 on CPU ranks: elements of DeepSpeed's gradient bucket (its default 5e8 is 1.9 GiB of fp32 host
# memory reserved, the pages the trainable grads reach staying resident); issue 17.
CPU_REDUCE_BUCKET = 200_000
# ... and of each optimizer sub-group: the optimizer steps one sub-group at a time on an fp32 flat copy
# of its gradients, with Adam's temporaries of its size (default 1e9: three copies of the partition).
CPU_SUB_GROUP = 200_000
CPU_ZERO3 = {
    "reduce_bucket_size": CPU_REDUCE_BUCKET,
    "sub_group_size": CPU_SUB_GROUP,
    # Every module released after its use and none fetched ahead: from step 2 on, DeepSpeed's
    # defaults (reuse distance 1e9 elements, prefetch 5e7) keep each module it will use again within
    # 1e9 elements gathered, i.e. a whole model of under 1e9 parameters (a 395M LoRA run held 1.72x
    # its bf16 files per rank at step 2, 0.62x at step 1). Prefetch alone would overlap gathers with
    # compute (that run's step: 5.5 s against 7.5-8.2 s), but DeepSpeed then keeps every parameter
    # whose next use its prefetch skipped: step 2 peaked as high again.
    "stage3_max_reuse_distance": 0,
    "stage3_prefetch_bucket_size": 0,
    # No small parameter held whole beside its partition (the default 1e5 elements keeps every
    # LoRA matrix whole on every rank).
    "stage3_param_persistence_threshold": 0,
}
"""ZeRO-3's settings on CPU ranks (issue 17); a user's `strategy.deepspeed` overrides each one."""


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def ds_config(cfg: Config, info: DistInfo, accum: int) -> dict[str, Any]:
    t, s, o = cfg.trainer, cfg.strategy, cfg.optim
    zero: dict[str, Any] = {"stage": s.zero_stage}
    if s.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": info.device.type == "cuda"}
    if s.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": info.device.type == "cuda"}
    if s.zero_stage == 3 and info.device.type == "cpu":
        zero.update(CPU_ZERO3)
    config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": t.micro_batch_size * accum * info.world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # torch's AdamW on every stage, so results match DDP/FSDP; DeepSpeedCPUAdam would need
        # compiled ops and would differ numerically.
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": True, "adam_w_mode": True}},
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": compute_dtype(cfg, info.device) == torch.bfloat16},
        "steps_per_print": 2**31,
        "wall_clock_breakdown": False,
    }
    return _merge(config, s.deepspeed)


class DeepSpeedStrategy:
    needs_process_group = True  # deepspeed.initialize needs one, even on a single process

    def __init__(self, model: nn.Module, cfg: Config, info: DistInfo, accum: int,
                 weights: Weights | None = None, phases: Phases | None = None) -> None:
        self.cfg, self.info, self.full_cfg = cfg.strategy, info, cfg
        self.compute_dtype = compute_dtype(cfg, info.device)
        self.loss_kind = cfg.trainer.loss
        config = ds_config(cfg, info, accum)
        if is_meta(model):
            with (phases or NULL).phase("load"):
                _materialize(model, require_weights(weights), config, info, self.compute_dtype)
        apply_block_transforms(model, cfg.trainer)
        _gather_in_place(info, config)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim), config=config,
            lr_scheduler=lambda opt: build_scheduler(opt, cfg.schedule, cfg.trainer.max_steps))
        self.model = self.engine
        if shared := _share_fp32_masters(self.engine.optimizer):
            log.info("ZeRO-3 in fp32: the optimizer's master is the module's partition in %d sub-groups", shared)
        apply_frozen_upcast(self.engine.module, self.compute_dtype,  # after DeepSpeed's own hooks
                            saved_low=saves_low(cfg.trainer))
        if cfg.trainer.activation_checkpointing and info.device.type == "cpu":
            if hooked := _release_after_recompute(self.engine):
                log.info("ZeRO-3 on CPU ranks: %d frozen modules released right after their recomputation", hooked)

    def forward_backward(self, batch: dict[str, torch.Tensor], sync_grads: bool, num_tokens: int,
                         loss_fn: LossFn | None = None) -> torch.Tensor:
        loss = loss_fn(self.engine, batch) if loss_fn else token_loss_sum(self.engine, batch, self.loss_kind).sum
        # scale_wrt_gas=False: token_scale already weighs the whole step, accumulation included
        self.engine.backward(loss * token_scale(num_tokens, self.info.world_size), scale_wrt_gas=False)
        if not sync_grads:
            self.engine.step()  # not a boundary: only advances DeepSpeed's micro-step counter
        return loss.detach()

    def clip_grads(self) -> None:
        """DeepSpeed clips inside `engine.step()` (config `gradient_clipping`)."""
        return None

    def step(self, skip: bool = False) -> Update:
        """A non-finite grad norm takes DeepSpeed's own overflow path (ZeRO 1-3, any precision:
        `bf16.check_grad_overflow` defaults to true): grads dropped, no optimizer or scheduler step,
        `engine.skipped_steps` counted. `skip` forces that path by reporting an infinite norm to it.
        The engine reads its norm to the host itself for that check; we add no read: the norm is
        returned as the device tensor DeepSpeed keeps, read only on a logging step."""
        assert self.engine.is_gradient_accumulation_boundary()
        with _forced_overflow(self.engine.optimizer) if skip else contextlib.nullcontext():
            self.engine.step()
        norm = self.engine.get_global_grad_norm()  # a tensor, or float("inf") after an overflow
        return Update(applied=self.engine.was_step_applied(), grad_norm=float("nan") if norm is None else norm)

    def state_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, p in self.engine.module.named_parameters():
            yield name, getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition
        yield from optimizer_tensors(self.engine.optimizer.optimizer)  # fp32 master partitions + Adam state

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def forward_context(self) -> ContextManager[None]:
        return forward_only(self.engine)  # the engine holds bf16 parameters when training in bf16

    def describe(self) -> dict[str, Any]:
        c = self.cfg
        return {"name": c.name, "kind": "deepspeed", "zero_stage": c.zero_stage,
                "offload_optimizer": c.offload_optimizer, "offload_params": c.offload_params}

    def _frozen(self) -> bool:
        return any(not p.requires_grad for p in self.engine.module.parameters())

    def save(self, path: Path) -> None:
        """Trainable state only: a frozen base (adapter runs) is read from its own files again."""
        self.engine.save_checkpoint(str(path / NATIVE), tag=TAG, exclude_frozen_parameters=self._frozen())

    def load(self, path: Path, saved_world_size: int) -> None:
        """ZeRO partitions depend on the world size: on another one, load DeepSpeed's universal
        checkpoint, converted once from the native one."""
        source = path / NATIVE
        if saved_world_size != self.info.world_size:
            source = _to_universal(path, self.info)
            self.engine._config.load_universal_checkpoint = True  # read by load_checkpoint only
        load_path, _ = self.engine.load_checkpoint(str(source), tag=TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True,
                                                   load_module_strict=not self._frozen())
        self.engine._config.load_universal_checkpoint = False
        if load_path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint under {source}")
        if split := _own_step_counters(self.engine.optimizer):
            log.info("universal checkpoint: %d optimizer sub-groups given their own Adam step counter", split)
        apply_optim_settings(self.engine.optimizer, self.scheduler, self.full_cfg)


def frozen_zero3(model: nn.Module, weights: Weights, cfg: Config, info: DistInfo) -> nn.Module:
    """A frozen meta-built module (DPO's reference) partitioned as it is created, exactly as the
    policy is (`_materialize`), then held by an engine without optimizer (TRL's `prepare_deepspeed`:
    the run's ZeRO settings less the optimizer, the scheduler and optimizer offload), whose hooks
    gather each module's parameters for its forward. Frozen parameters keep their meta dtype
    (model.base_dtype) and compute in the training dtype. Returns the module (call it directly)."""
    config = ds_config(cfg, info, accum=1)
    for key in ("optimizer", "scheduler", "gradient_clipping", "zero_allow_untested_optimizer"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    dtype = compute_dtype(cfg, info.device)
    _materialize(model, weights, config, info, dtype)
    _gather_in_place(info, config)
    engine, *_ = deepspeed.initialize(model=model, config=config)
    engine.eval()
    apply_frozen_upcast(engine.module, dtype)  # after DeepSpeed's own hooks, as for the policy
    return engine.module


def _materialize(model: nn.Module, weights: Weights, config: dict[str, Any], info: DistInfo,
                 dtype: torch.dtype) -> None:
    """Trainable parameters in the engine's module dtype (bf16 when DeepSpeed trains in bf16: its
    optimizer keeps the fp32 masters), frozen ones as the meta model says (model.base_dtype).
    ZeRO-1/2 keep the whole module on every rank: read once, one tensor at a time. ZeRO-3 partitions
    one module at a time as `deepspeed.zero.Init` would have at construction: rank 0 reads the
    module's tensors, the others receive their partition, so no rank ever holds the whole model."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)
    if config["zero_optimization"]["stage"] != 3:
        materialize_full(model, weights, torch.device("cpu"))  # the engine moves it to the device
        return
    owners = buffer_owners(model)
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # wraps the torch group
    # Only what partitioning reads (a full config would check batch sizes against DeepSpeed's world).
    init_config = {k: config[k] for k in ("zero_optimization", "bf16", "train_micro_batch_size_per_gpu")}
    names = {id(p): n for n, p in model.named_parameters()}
    done: dict[int, nn.Parameter] = {}  # tied parameters stay one parameter
    modules = [m for m in model.modules() if any(p.is_meta for p in m.parameters(recurse=False))]
    for module in reversed(modules):  # children before parents: Init(module=) converts recursively
        for k, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                data = (weights.read(names[id(p)]).to(p.dtype) if info.is_main
                        else torch.empty(p.shape, dtype=p.dtype))  # Init broadcasts rank 0's tensor
                done[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
            module._parameters[k] = done[id(p)]
        deepspeed.zero.Init(module=module, config_dict_or_path=init_config, mem_efficient_linear=False)
    init_buffers(model, owners, info.device)


def _share_fp32_masters(optimizer) -> int:
    """ZeRO-3 training in fp32: each optimizer sub-group's fp32 master (`fp32_partitioned_groups_flat`)
    is a clone of the flat partition that the module's parameters view, in the same dtype, and is
    copied back into it after every step (`_reassign_or_swap_out_partitioned_parameters`). The master
    now is that partition: one fp32 copy of the trainable partition less per rank, the same numbers
    (issue 17). bf16 training (distinct dtypes) and optimizer offload (the master on another device)
    keep theirs. Returns the number of sub-groups shared."""
    low = getattr(optimizer, "fp16_partitioned_groups_flat", None)
    masters = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    if not low or not masters or getattr(optimizer, "offload_optimizer", False):
        return 0
    shared = 0
    for flat, master in zip(low, masters):
        if flat is not None and flat.dtype == master.dtype and flat.device == master.device \
                and flat.shape == master.shape:
            master.data = flat.data
            shared += 1
    return shared


def _own_step_counters(zero_optimizer) -> int:
    """Give each parameter's Adam state its own `step` tensor. DeepSpeed's ZeRO-3 universal loader
    (`load_hp_checkpoint_state_from_checkpoint_dir_stage3`) puts one and the same tensor into the state
    of every optimizer sub-group, and torch's Adam increments it in place: with N sub-groups the count
    advanced N times a step, and every bias correction after a resume on another world size was wrong
    (the tiny model in sub-groups of 5000 elements: losses off by 3.7e-4 relative from the second step
    after the resume; in its two parameter groups alone, 4e-5). Returns the number of counters split off."""
    inner = getattr(zero_optimizer, "optimizer", None)
    seen: set[int] = set()
    split = 0
    for state in (inner.state.values() if isinstance(inner, torch.optim.Optimizer) else ()):
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            if id(step) in seen:
                state["step"] = step.clone()
                split += 1
            seen.add(id(step))
    return split


def _release_after_recompute(engine) -> int:
    """ZeRO-3 under activation checkpointing: release each frozen weight right after its module's
    recomputation, as after its forward (FSDP2 does the same, parallelize.py
    `_reshard_after_recompute`). DeepSpeed attributes every frozen parameter gathered during a
    recomputation (a forward inside backward) to the submodule whose backward is running
    (`update_recompute_parameters`), so that torch's checkpoint still finds it whole when it
    compares the recomputed tensors with the saved ones; it is released only in that submodule's
    post-backward. The recomputation is started by the first backward that needs a saved tensor of
    the block (a LoRA `lora_B`), so a whole decoder block's frozen weights were gathered at once
    at its end (88 MiB on a rank for a 2048-wide block): a 2-rank CPU LoRA step peaked 29 MiB
    higher with checkpointing than without, 20 MiB lower with this (issue 17). Our frozen
    projections hand autograd no weight (train/upcast.py `_FrozenLinear`), and each one's own
    pre-backward hook gathers it again for its backward.
    Only attributions to another submodule are dropped: a module's own backward keeps its weight.
    Registered after DeepSpeed's hooks, so it runs after its post-forward release; returns the
    number of modules hooked."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None:
        return 0
    coordinator = offload.get_param_coordinator()
    modules = {m.ds_id: m for m in engine.module.modules() if hasattr(m, "ds_id")}

    def release(module: nn.Module, args, output) -> None:
        if not in_backward():  # a forward outside backward: DeepSpeed released it
            return
        for p in module.parameters(recurse=False):
            for owner in [modules.get(i) for i in p.ds_active_sub_modules if i != module.ds_id]:
                if owner is not None and p in owner.ds_recompute_parameters:
                    owner.ds_recompute_parameters.discard(p)
                    p.ds_active_sub_modules.discard(owner.ds_id)
        coordinator.release_sub_module(module, forward=True)

    hooked = 0
    for module in engine.module.modules():
        if any(not p.requires_grad and not p.ds_persist for p in module.parameters(recurse=False)):
            module.register_forward_hook(release)
            hooked += 1
    return hooked


def _gather_in_place(info: DistInfo, config: dict[str, Any]) -> None:
    """ZeRO-3 on CPU ranks gathers each module's parameters with gloo's `all_gather_into_tensor`,
    which stages the gathered tensor in a buffer of its own and then copies it out: a second
    gathered copy held for every gather (16 MiB for a 150M model's output head). DeepSpeed's
    process-wide backend sends its all-gathers through one broadcast per rank into the output
    instead (train/strategies/parallelize.py `InPlaceAllGather`, the same bytes on the wire);
    issue 17: -10 MiB per rank at the peak of the 150M LoRA run."""
    if config["zero_optimization"]["stage"] != 3 or info.device.type != "cpu" or info.world_size == 1:
        return
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # DeepSpeed's backend (cdb)
    cdb = deepspeed.comm.comm.cdb
    if getattr(cdb, "scaletrain_in_place", False):
        return
    gather = InPlaceAllGather()
    cdb.all_gather_into_tensor = lambda output_tensor, input_tensor, group=None, async_op=False: gather(
        output_tensor, input_tensor, group or torch.distributed.group.WORLD, async_op)
    cdb.scaletrain_in_place = True


@contextlib.contextmanager
def _forced_overflow(zero_optimizer) -> Iterator[None]:
    """Make this step's grad-norm computation report inf, so that DeepSpeed's ZeRO optimizer
    takes its overflow branch (stage 1/2: `scaled_global_norm`, stage 3: `_get_norm_groups`).
    Its counters, loss scaler and Adam state stay consistent because DeepSpeed itself skips."""
    name = "_get_norm_groups" if hasattr(zero_optimizer, "_get_norm_groups") else "scaled_global_norm"
    if not hasattr(zero_optimizer, name):
        raise RuntimeError(f"cannot skip a step on {type(zero_optimizer).__name__}: no {name}")
    inf = torch.tensor(float("inf"))
    setattr(zero_optimizer, name, (lambda *a, **k: [inf]) if name == "_get_norm_groups" else (lambda *a, **k: inf))
    try:
        yield
    finally:
        delattr(zero_optimizer, name)  # the class's own method again


def _to_universal(path: Path, info: DistInfo) -> Path:
    """Rank 0 converts once (`deepspeed.checkpoint.ds_to_universal`) into a temporary folder that
    is renamed when complete, so a crash mid-conversion leaves nothing half-written."""
    out = path / UNIVERSAL
    if info.is_main and not out.is_dir():
        tmp = path / f".tmp-{UNIVERSAL}"
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("converting %s to DeepSpeed's universal checkpoint for a new world size", path)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(path / NATIVE / TAG), "--output_folder", str(tmp / TAG),
               "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"could not convert {path} to a universal checkpoint ({proc.stderr[-2000:]}); "
                               "resume on the original world size instead")
        (tmp / "latest_universal").write_text(TAG)
        os.rename(tmp, out)
    d.barrier()
    return out
