"""Parallelism as functions applied to a plain model (torchtitan's `parallelize.py`).

Order matters and is the same for every engine: activation checkpointing first, then
compilation of each block, then the sharding or replication wrapper.
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.nn.parallel import DistributedDataParallel

from train.config import TrainerConfig
from train.dist import DistInfo
from train.model import decoder_layers, decoder_stack
from train.model_weights import Weights, buffer_owners, fill_shards, init_buffers, is_meta
from train.strategies.config import FSDPConfig
from train.upcast import frozen_linear

log = logging.getLogger("scaletrain")


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block in backward (non-reentrant, works under every engine)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # transformers also makes the embedding's output require a gradient, which only the reentrant
    # recomputation needs: with a frozen embedding (LoRA) backward would then reach the embedding
    # for nothing, and gather its FSDP2 unit to compute no gradient.
    if hasattr(model, "disable_input_require_grads"):
        model.disable_input_require_grads()


def apply_block_transforms(model: nn.Module, cfg: TrainerConfig) -> None:
    """What every engine applies to the plain model before wrapping it, in this order."""
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.compile:
        apply_compile(model)


def apply_compile(model: nn.Module) -> None:
    """`torch.compile` each decoder block (torchtitan's way): the blocks repeat, so one graph
    serves all, and the embedding and loss stay eager. After activation checkpointing (which
    the compiled block then contains) and before sharding (whose hooks stay outside the graph).
    DCP state dicts drop the `_orig_mod.` that the wrapper adds to parameter names."""
    blocks = decoder_stack(model)
    for name, block in blocks.named_children():
        blocks.register_module(name, torch.compile(block))


def apply_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Replicate across ranks; one process trains the plain model."""
    model.to(info.device)
    if info.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)


def apply_frozen_upcast(model: nn.Module, dtype: torch.dtype, saved_low: bool = True) -> int:
    """Frozen parameters kept in a lower precision than a fp32 compute (a bf16 base under LoRA on
    CPU, where autocast does not help). A frozen `nn.Linear` (every projection of the base)
    computes with its weight as stored, upcast a block of rows at a time (train/upcast.py
    `frozen_linear`: no fp32 copy of a whole weight, and autograd saves the stored weight). Any
    other module (norms) computes with an fp32 copy made for its forward and dropped after it, as
    FSDP2's MixedPrecisionPolicy does for its all-gathers. Registered after the engine's own hooks
    (ZeRO-3 gathers first, releases after).

    Autograd would keep each copy until backward (a linear layer saves its weight to compute the
    input's gradient): a whole fp32 copy of the base held through the step. With `saved_low`,
    the forward saves the low-precision parameter instead and backward upcasts it again (the
    FrozenUpcast saved-tensor hooks). Without activation checkpointing only: a recomputed block
    keeps its copies for its own backward alone, and its own hooks must see every saved tensor
    (`saves_low`). Returns the number of modules hooked."""
    if dtype != torch.float32:
        return 0  # autocast (DDP) or the engine (DeepSpeed bf16) computes in the base's precision
    hooked = 0
    for module in model.modules():
        low = [k for k, p in module._parameters.items()
               if p is not None and not p.requires_grad and p.is_floating_point() and p.dtype != dtype]
        if low and isinstance(module, nn.Embedding):  # a lookup is exact in any dtype: upcast the rows only
            module.register_forward_hook(_cast_output(dtype))
            hooked += 1
        elif low and isinstance(module, nn.Linear) and not any(p.requires_grad for p in module.parameters(False)):
            # a frozen projection of the base (or its output head) upcasts a block of rows at a time
            module.forward = functools.partial(frozen_linear, module)
            hooked += 1
        elif low:
            module.register_forward_pre_hook(_upcast(low, dtype, saved_low))
            module.register_forward_hook(_restore, prepend=True)
            hooked += 1
    return hooked


class FrozenUpcast(torch.autograd.graph.saved_tensors_hooks):
    """While a module runs on fp32 copies of its frozen low-precision parameters: a tensor that
    autograd saves and that lives in one of those copies (the weight, or a view of it such as
    its transpose) is stored as the low-precision parameter and upcast again when backward
    unpacks it. Every other tensor is saved as usual."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        storages = {copy.untyped_storage().data_ptr(): low for low, copy in pairs}
        dtype = pairs[0][1].dtype

        def pack(t: torch.Tensor):
            low = storages.get(t.untyped_storage().data_ptr()) if t.dtype == dtype else None
            if low is None:
                return t
            return low, t.size(), t.stride(), t.storage_offset()

        def unpack(saved):
            if isinstance(saved, torch.Tensor):
                return saved
            low, size, stride, offset = saved
            return low.detach().to(dtype).as_strided(size, stride, offset)

        super().__init__(pack, unpack)


def saves_low(cfg: TrainerConfig) -> bool:
    """Whether `apply_frozen_upcast` saves the low-precision parameters for backward: not under
    activation checkpointing (a recomputed block keeps its copies for its own backward only, and
    its hooks must see every saved tensor) nor torch.compile (the hooks inside a compiled block
    recompile it at every call)."""
    return not (cfg.activation_checkpointing or cfg.compile)


def _cast_output(dtype: torch.dtype):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return output.to(dtype)
    return hook


def _upcast(names: list[str], dtype: torch.dtype, saved_low: bool):
    def hook(module: nn.Module, args):
        frozen = {k: module._parameters[k] for k in names}
        copies = {k: frozen[k].detach().to(dtype) for k in names}
        module._parameters.update(copies)
        hooks = FrozenUpcast([(frozen[k], copies[k]) for k in names]) if saved_low else None
        if hooks is not None:
            hooks.__enter__()
        module._scaletrain_frozen = (frozen, hooks)
    return hook


def _restore(module: nn.Module, args, output) -> None:
    frozen, hooks = module.__dict__.pop("_scaletrain_frozen", ({}, None))
    if hooks is not None:
        hooks.__exit__(None, None, None)
    module._parameters.update(frozen)


def _has_low_frozen(model: nn.Module, dtype: torch.dtype) -> bool:
    return any(not p.requires_grad and p.is_floating_point() and p.dtype != dtype for p in model.parameters())


def _vocab_modules(model: nn.Module) -> list[nn.Module]:
    """The input embedding and the output head, each its own FSDP unit so that neither stays
    gathered beside the decoder blocks (the root would keep them unsharded for the whole step).
    Tied ones stay in the root: one parameter cannot belong to two units."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is None or head is None or embed.weight is head.weight:
        return []
    return [embed, head]


class InPlaceAllGather:
    """FSDP2's all-gather on gloo without gloo's staging copy: gloo's `all_gather_into_tensor`
    gathers into a flat buffer of its own and then copies it into the output, a second gathered
    block held for the length of every all-gather. FSDP2's copy-in has already put this rank's
    shard in its slice of the output, so one broadcast from each rank's slice fills the output
    in place, the same bytes on the wire. The last broadcast is returned as the pending work
    when FSDP2 asks for an asynchronous one (`_set_unshard_async_op`, below). Units below
    IN_PLACE_FROM bytes use gloo's own all-gather: their staging copy is small, and one collective
    costs less time than one per rank (a tiny model's CPU step was ~6% slower with broadcasts).

    A unit of one parameter (a frozen projection, the embedding, the head: `_single_param`)
    is gathered straight into that parameter: FSDP2 gathers into a flat buffer and then copies
    each parameter out of it, two copies of the unit at once, but for a single parameter sharded
    on dim 0 the flat buffer already is the parameter's layout (rank 0's rows, then rank 1's), so
    `allocate` hands FSDP2 the parameter's own unsharded storage and the copy-out copies it onto
    itself."""

    IN_PLACE_FROM = 1 << 20

    def __init__(self, module: FSDPModule | None = None) -> None:
        self.param = _single_param(module) if module is not None else None

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        fp = self.param
        if fp is not None and size[0] % fp.mesh_info.shard_mesh_size == 0:
            world = fp.mesh_info.shard_mesh_size
            fp.init_all_gather_outputs([size[0] // world], [dtype], world, device)
            fp.alloc_all_gather_outputs()
            out = fp.all_gather_outputs[0]
            if out.shape == torch.Size(size) and out.dtype == dtype:
                # the same storage under a version counter of its own: the copy-in and the
                # broadcasts write it, and autograd may hold the parameter from the last forward
                return torch.empty(0, dtype=dtype, device=device).set_(out.untyped_storage(), 0, out.shape)
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group,
                 async_op: bool = False) -> dist.Work | None:
        if output_tensor.numel() * output_tensor.element_size() < self.IN_PLACE_FROM:
            return dist.all_gather_into_tensor(output_tensor, input_tensor, group=group, async_op=async_op)
        slices = output_tensor.chunk(group.size())
        if slices[group.rank()].data_ptr() != input_tensor.data_ptr():
            slices[group.rank()].copy_(input_tensor)
        work = None
        for src, piece in enumerate(slices):
            last = src == len(slices) - 1
            work = dist.broadcast(piece, group=group, group_src=src, async_op=async_op and last)
        return work


def _single_param(module: FSDPModule):
    """The FSDPParam of a unit that holds exactly one plain parameter sharded on dim 0 (whose
    all-gather output is laid out as the unsharded parameter), else None."""
    groups = module._get_fsdp_state()._fsdp_param_groups
    if len(groups) != 1 or len(groups[0].fsdp_params) != 1:
        return None
    fp = groups[0].fsdp_params[0]
    plain = not hasattr(fp._sharded_local_tensor, "fsdp_pre_all_gather")
    return fp if plain and fp.fsdp_placement.dim == 0 else None


def _frozen_projections(layer: nn.Module) -> list[nn.Module]:
    """The linear projections of a decoder block with no trainable parameter (the base under
    LoRA): each can be its own FSDP2 unit."""
    return [m for m in layer.modules() if isinstance(m, nn.Linear) and not any(p.requires_grad for p in m.parameters())]


def in_backward() -> bool:
    """Whether autograd's engine is running: a module's forward then is a recomputation
    (activation checkpointing)."""
    return torch._C._current_graph_task_id() != -1


def _reshard_after_recompute(module: nn.Module, args, output) -> None:
    """A unit recomputed inside backward (activation checkpointing) stays gathered until its own
    backward in FSDP2 (its post-forward does not reshard while autograd runs), so a whole
    recomputed block of one-projection units would be gathered at once: reshard it now, and its
    pre-backward gathers it again when its gradient is computed."""
    if in_backward():
        module.reshard()


ONE_BLOCK_FROM = 4 << 20
"""Bytes of a decoder block's parameters from which CPU ranks hold one gathered unit at a time."""


def gather_one_unit_at_a_time(model: nn.Module) -> None:
    """On CPU ranks (gloo) a gathered unit is host memory, and there is no accelerator for a
    collective to overlap with: hold one unit at a time, as small as it can be. FSDP2's defaults,
    made to overlap all-gathers with GPU compute, hold more: backward prefetches the next unit
    while one computes (a unit that names itself as the one to prefetch turns that off: it is
    already gathered), and a synchronous forward all-gather keeps its output buffer until the
    next unit's is copied out (an asynchronous one frees it after its own copy-out). With gloo's
    staging copy gone (`InPlaceAllGather`), and each frozen projection of a LoRA base its own
    unit gathered straight into its weight (`apply_fsdp`), a rank holds one weight of the base
    at a time instead of a block and its all-gather buffer (issue 17, docs/BENCHMARKS.md). gloo's
    worker threads do overlap a little (a tiny model's CPU step was ~8% slower without the
    prefetch), so `apply_fsdp` does this only where a block is large enough for its bytes to
    matter (ONE_BLOCK_FROM)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(InPlaceAllGather(module))
            module.set_modules_to_backward_prefetch([module])
            module._set_unshard_async_op(True)


def _block_bytes(model: nn.Module) -> int:
    """Bytes of the largest decoder block's parameters (meta or real)."""
    return max((sum(p.numel() * p.element_size() for p in layer.parameters()) for layer in decoder_layers(model)),
               default=0)


def apply_fsdp(model: nn.Module, cfg: FSDPConfig, info: DistInfo, dtype: torch.dtype,
               weights: Weights | None = None, phases=None, saved_low: bool = True) -> nn.Module:
    """`fully_shard` every decoder block, then the root; fp32 gradient reduction. A meta model is
    sharded on meta, then each rank allocates its shards and fills them from `weights` (torchtitan:
    meta init -> parallelize -> to_empty -> load)."""
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    offload: OffloadPolicy = OffloadPolicy()
    if cfg.offload_params and info.device.type == "cuda":
        offload = CPUOffloadPolicy(pin_memory=True)
    elif cfg.offload_params:
        # FSDP2's CPU offload moves shards to host memory between uses of the accelerator;
        # training on the CPU they are in host memory already, so the policy would be a no-op.
        log.warning("strategy.offload_params on CPU: parameters already live in host memory; "
                    "running FSDP2 without an offload policy")
    meta = is_meta(model)
    owners = buffer_owners(model)
    if not isinstance(offload, CPUOffloadPolicy) and not meta:
        model.to(info.device)
    # A frozen base stored below an fp32 compute (bf16 under LoRA on CPU) is gathered as stored,
    # half the bytes of an fp32 all-gather, and each module upcasts it while it runs
    # (apply_frozen_upcast, registered below). FSDP2 all-gathers mixed dtypes; only the trainable
    # parameters of a group must share one dtype.
    upcast = dtype == torch.float32 and _has_low_frozen(model, dtype)
    param_dtype = None if upcast else dtype
    kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
                  offload_policy=offload, reshard_after_forward=cfg.reshard_after_forward)
    one_at_a_time = info.device.type == "cpu" and info.world_size > 1 and _block_bytes(model) >= ONE_BLOCK_FROM
    own_units = 0
    for layer in decoder_layers(model):
        for proj in _frozen_projections(layer) if one_at_a_time else []:
            fully_shard(proj, **kwargs)  # a frozen weight: its own unit on CPU ranks (gather_one_unit_at_a_time)
            proj.register_forward_hook(_reshard_after_recompute)
            own_units += 1
        fully_shard(layer, **kwargs)
    if one_at_a_time:
        log.info("FSDP2 on CPU ranks: one unit gathered at a time, %d frozen projections in units of their own",
                 own_units)
    for module in _vocab_modules(model):  # torchtitan: the embedding and the output head on their own
        fully_shard(module, **kwargs)
    fully_shard(model, **kwargs)
    if one_at_a_time:
        gather_one_unit_at_a_time(model)
    if upcast:
        apply_frozen_upcast(model, dtype, saved_low)
    if meta:
        assert weights is not None, "a meta-built model needs a Weights source"
        with phases.phase("load") if phases is not None else contextlib.nullcontext():
            device = torch.device("cpu") if isinstance(offload, CPUOffloadPolicy) else info.device
            model.to_empty(device=device)  # only this rank's shards are allocated
            fill_shards(model, weights, info.rank, info.world_size)
            init_buffers(model, owners, info.device)
    return model
