"""What the planner plans: the model's shape, one way to run it, and the bytes of model state
(parameters, gradients, optimizer) each rank holds on its device, adapters included.

Model state follows the ZeRO paper (Rajbhandari et al. 2020) for bf16 on GPU: parameters 2Ψ,
gradients 2Ψ, Adam state KΨ with K = 12 (fp32 master, momentum, variance), each divided by
the world size N once its stage shards it. DDP and FSDP2 keep fp32 parameters (autocast /
MixedPrecisionPolicy), so 4Ψ + 4Ψ + 8Ψ (FSDP2: all over N). On CPU (fp32) DeepSpeed keeps
4-byte weights and gradients, and ZeRO-3 uses its fp32 partition as the master copy (K = 8).

With an adapter only the trainable parameters (LoRA's A and B, `modules_to_save`) have
gradients and optimizer state; the frozen base is held in `model.base_dtype` (bf16 by
default), sharded like every parameter under fsdp and zero3, except that ZeRO-3 on GPUs keeps
tensors below its persistence threshold (1e5 elements) whole on every rank: LoRA's A and B of a
small model (CPU ranks set the threshold to 0: train/strategies/deepspeed.py `CPU_ZERO3`). No
torch import: this runs on a login node.
"""
from __future__ import annotations

from dataclasses import dataclass

SHARDED = ("zero3", "fsdp", "zero3_offload", "fsdp_offload")
"""Strategies that keep 1/N of every parameter per rank."""
PERSISTENCE_THRESHOLD = 100_000
"""DeepSpeed's `stage3_param_persistence_threshold` default: ZeRO-3 keeps a parameter of fewer
elements whole on every rank instead of partitioning it (LoRA's A and B of a small model)."""
NF4_BYTES = 33 / 64
"""Bytes per 4-bit NF4 weight with bitsandbytes' double quantization (an 8-bit absmax per 64
weights, an fp32 one per 256 blocks)."""


@dataclass(frozen=True)
class Shape:
    """What memory depends on in a Llama-style decoder."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_params(self) -> int:
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_dim + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        embed = self.vocab * self.hidden
        return self.layers * self.layer_params + self.hidden + embed * (1 if self.tied else 2)

    def linear_dims(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of every adaptable linear layer, by the name peft matches."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h), "lm_head": (h, self.vocab)}

    def tensors(self) -> list[tuple[int, int]]:
        """(elements, how many) of every parameter tensor of the base model."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = [(h * h, 2), (h * kv, 2), (h * i, 3), (h, 2)]
        out = [(n, c * self.layers) for n, c in per_layer]
        return [*out, (h, 1), (self.vocab * h, 1 if self.tied else 2)]

    @property
    def largest_param(self) -> int:
        """Elements of the largest single parameter (the embedding in every Llama we know)."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)


@dataclass(frozen=True)
class Adapter:
    """`adapter.*` as far as memory goes: kind none | lora | qlora, rank, targets."""

    kind: str = "none"
    r: int = 16
    target_modules: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()

    def trainable(self, shape: Shape) -> int:
        """Trainable parameters: r x (in + out) per targeted linear layer (peft's A and B, no
        bias), plus a full trainable copy of each of `modules_to_save`; all of them without one."""
        if self.kind == "none":
            return shape.params
        dims = shape.linear_dims()
        count = 0
        for name in self.target_modules:
            if name in dims:
                fan_in, fan_out = dims[name]
                count += self.r * (fan_in + fan_out) * (1 if name == "lm_head" else shape.layers)
        saved = {"lm_head": shape.vocab * shape.hidden, "embed_tokens": shape.vocab * shape.hidden}
        return count + sum(saved.get(name, 0) for name in self.modules_to_save)

    def tensors(self, shape: Shape) -> list[tuple[int, int]]:
        """(elements, how many) of every adapter tensor: A is r x in, B out x r (modules_to_save:
        the copy of the head or the embedding)."""
        if self.kind == "none":
            return []
        dims = shape.linear_dims()
        out = [(self.r * d, 1 if name == "lm_head" else shape.layers)
               for name in self.target_modules if name in dims for d in dims[name]]
        return out + [(shape.vocab * shape.hidden, 1) for name in self.modules_to_save
                      if name in ("lm_head", "embed_tokens")]


NO_ADAPTER = Adapter()


@dataclass(frozen=True)
class Setup:
    """One way to run it: what the planner varies when it looks for alternatives."""

    strategy: str
    world: int
    nnodes: int
    micro_batch: int
    accum: int
    seq_len: int
    checkpointing: bool
    bf16: bool
    loss: str = "chunked"
    attention: str = "sdpa"
    adapter: Adapter = NO_ADAPTER
    base_dtype: str = "bf16"
    """Storage dtype of the frozen base under an adapter (`model.base_dtype`)."""
    device: str = "cuda"
    """Where the ranks compute: `cpu` puts the device state in host memory too."""

    @property
    def procs(self) -> int:
        """Ranks per node."""
        return max(1, self.world // max(1, self.nnodes))


def model_state(psi: int, strategy: str, world: int, bf16: bool) -> dict[str, int]:
    """Bytes per rank on its device of parameters, gradients and optimizer state when all `psi`
    parameters train (see the module docstring)."""
    n = world
    if strategy.startswith("fsdp"):
        if strategy == "fsdp_offload":
            return {"params": 0, "grads": 0, "optimizer": 0}  # CPUOffloadPolicy: all in host memory
        return {"params": 4 * psi // n, "grads": 4 * psi // n, "optimizer": 8 * psi // n}
    if strategy == "ddp":
        return {"params": 4 * psi, "grads": 4 * psi, "optimizer": 8 * psi}
    stage = int(strategy[4])
    width = 2 if bf16 else 4
    k = 12 if bf16 or stage < 3 else 8
    offload = strategy.endswith("offload")  # zero3_offload: partitions and Adam in host memory
    return {"params": 0 if offload else width * psi // (n if stage == 3 else 1),
            "grads": width * psi // (n if stage >= 2 else 1),
            "optimizer": 0 if offload else k * psi // n}


def frozen_width(s: Setup) -> float:
    """Bytes per frozen base parameter: `model.base_dtype` (`auto` resolved by the caller to the
    dtype of the weight files), except that DeepSpeed casts the whole module to bf16 when it
    trains in bf16."""
    if s.base_dtype == "bf16" or (s.bf16 and not s.strategy.startswith(("ddp", "fsdp"))):
        return 2
    return 4


def frozen_bytes(shape: Shape, s: Setup) -> int:
    """Bytes of the whole frozen base (all ranks together, before sharding)."""
    if s.adapter.kind == "none":
        return 0
    if s.adapter.kind == "qlora":  # NF4 linear weights in the blocks, bf16 for the rest
        linear = shape.layers * (shape.layer_params - 2 * shape.hidden)
        return int(linear * NF4_BYTES) + 2 * (shape.params - linear)
    return int(frozen_width(s) * shape.params)


def state_bytes(shape: Shape, s: Setup) -> dict[str, int]:
    """Device bytes per rank of parameters (frozen base included), gradients and optimizer state."""
    if s.adapter.kind == "none":
        return _persistent(model_state(shape.params, s.strategy, s.world, s.bf16), shape, s)
    out = model_state(s.adapter.trainable(shape), s.strategy, s.world, s.bf16)
    on_host = s.strategy.endswith("offload")
    out["params"] += 0 if on_host else frozen_bytes(shape, s) // (s.world if s.strategy in SHARDED else 1)
    return _persistent(out, shape, s)


def _persistent(out: dict[str, int], shape: Shape, s: Setup) -> dict[str, int]:
    """ZeRO-3 keeps every tensor below its persistence threshold whole on each rank (the norms;
    LoRA's A and B of a small model; every tensor of a tiny one), beside the partition its
    optimizer updates (measured: tests/support/dist_state_bytes.py). Not on CPU ranks, where the
    threshold is 0."""
    if s.strategy != "zero3" or s.world == 1 or s.device == "cpu":
        return out
    width = 2 if s.bf16 else 4
    trainable = s.adapter.tensors(shape) if s.adapter.kind != "none" else shape.tensors()
    frozen = shape.tensors() if s.adapter.kind == "lora" else []
    small = lambda ts: sum(n * c for n, c in ts if n < PERSISTENCE_THRESHOLD)  # noqa: E731
    whole = width * small(trainable) + int(frozen_width(s) * small(frozen))
    return {**out, "params": out["params"] + whole}


def resident_param_bytes(shape: Shape, s: Setup) -> int:
    """Bytes of every parameter (all ranks together) in the dtype it is kept in once loaded:
    fp32 masters for DDP/FSDP2, DeepSpeed's compute width, the frozen base in its own dtype."""
    width = 4 if s.strategy.startswith(("ddp", "fsdp")) or not s.bf16 else 2
    return frozen_bytes(shape, s) + width * (s.adapter.trainable(shape))
