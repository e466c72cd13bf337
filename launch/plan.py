"""Memory planner: per-GPU and per-node host bytes of a training config, whether it fits, and
what else would.

`python -m launch plan [overrides] [format=json] [launch.gpu=h100_80gb]`. No torch import:
it runs on a login node before anything is launched. Model state (parameters, gradients,
optimizer; adapter-aware) is in launch/state.py, host memory at start-up and while training in
launch/host.py. Activations follow Korthikanti et al. 2022 for a Llama block with SwiGLU and a
fused attention kernel; step time is a roofline estimate (compute at an assumed efficiency vs.
ring-collective bytes over the GPU's links), used only to rank the alternatives.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from launch.gpus import GPU, GiB, lookup
from launch.host import host_bytes
from launch.state import Adapter, Setup, Shape, frozen_width, model_state, state_bytes

UPCAST_BYTES = 4 * 2**18
"""train/upcast.py UPCAST_BLOCK in fp32: what a frozen low-precision weight is upcast by at a time."""

__all__ = ["Adapter", "Setup", "Shape", "model_state", "plan", "plan_request", "render"]

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp", "zero3_offload", "fsdp_offload")
FRAMEWORK_RESERVE = 1 * GiB
"""CUDA context, cuBLAS workspaces and allocator slack, counted in `buffers`."""
CHUNK_LOGITS = 2**25
"""Logits per chunk of the chunked loss (train/loss.py)."""
CPU_REDUCE_BUCKET = 200_000
"""train/strategies/deepspeed.py CPU_REDUCE_BUCKET: ZeRO-3's gradient bucket on CPU ranks (elements)."""
CPU_SUB_GROUP = 200_000
"""train/strategies/deepspeed.py CPU_SUB_GROUP: ZeRO-3's optimizer sub-group on CPU ranks (elements)."""


def activation_bytes(shape: Shape, s: Setup, checkpointing: bool) -> int:
    """Saved activations of one micro-batch (bytes), per rank.

    Per token and layer a block saves its two norm inputs and outputs, q, k, v and the
    attention output, gate, up, SiLU(gate) and their product in the compute dtype, plus the
    fp32 copies RMSNorm makes. With checkpointing each layer keeps only its input, and one
    layer's full set exists again while it is recomputed."""
    a = 2 if s.bf16 else 4
    h, i = shape.hidden, shape.intermediate
    per_layer = a * (6 * h + 2 * shape.kv_dim + 4 * i) + 8 * h
    tokens = s.micro_batch * s.seq_len
    layers = a * h * shape.layers + per_layer if checkpointing else per_layer * shape.layers
    mask = s.micro_batch * s.seq_len ** 2 if s.attention == "sdpa" else 0  # packed-document bool mask
    return tokens * (layers + 2 * a * h) + mask


def logits_bytes(shape: Shape, s: Setup) -> int:
    """Output projection + loss: plain holds [tokens, vocab] in the compute dtype, an fp32 copy,
    fp32 log-probabilities and their fp32 gradient; chunked holds one chunk of fp32 logits and
    probabilities plus fp32 gradients of the head (unless an adapter freezes it) and the hidden
    states."""
    a = 2 if s.bf16 else 4
    tokens, v, h = s.micro_batch * s.seq_len, shape.vocab, shape.hidden
    if s.loss == "plain":
        return tokens * v * (a + 12)
    chunk = min(tokens, max(1, CHUNK_LOGITS // v)) * v  # a micro-batch smaller than a chunk is one chunk
    head_trains = s.adapter.kind == "none" or "lm_head" in (*s.adapter.modules_to_save, *s.adapter.target_modules)
    return chunk * (8 + a) + (4 * v * h if head_trains else 0) + a * tokens * h


def gather_width(s: Setup) -> float:
    """Bytes per parameter of a gathered (all-gathered, unsharded) layer: the compute dtype, or
    the frozen base as stored when it is narrower (a bf16 base under LoRA on the CPU is gathered
    in bf16 and upcast one module at a time, train/strategies/parallelize.py)."""
    a = 2 if s.bf16 else 4
    return min(a, frozen_width(s)) if s.adapter.kind == "lora" else a


def upcast_bytes(shape: Shape, s: Setup) -> int:
    """A frozen base stored below an fp32 compute (CPU, LoRA, bf16 base): each frozen projection
    upcasts its weight a block of rows at a time for its forward and its backward
    (train/upcast.py), so one block of at most UPCAST_BYTES lives at a time, never a whole fp32
    weight; the output head likewise in the chunked loss."""
    if s.bf16 or s.adapter.kind != "lora" or frozen_width(s) >= 4:
        return 0
    return min(UPCAST_BYTES, 4 * max(shape.hidden * shape.hidden, shape.hidden * shape.intermediate))


def buffer_bytes(shape: Shape, psi: int, s: Setup) -> int:
    """What a step holds beside the model state: gathered layers, gradient buckets, upcast
    copies, plus the framework reserve; `psi` counts the parameters that have gradients (all,
    or an adapter's).

    FSDP2 (every decoder block its own unit, the embedding and the head each their own):
    two blocks gathered at a time (the one computing and the one prefetched) plus the all-gather
    output of one while it is copied out into the unsharded parameters, the largest vocabulary
    unit, and, when every parameter trains, one block's unsharded fp32 gradients before they are
    reduce-scattered. ZeRO-3 gathers straight into the parameters (no copy-out), reduces through
    its bucket (`reduce_bucket_size`, 5e8 elements) and a flat copy of it, then steps its
    optimizer one sub-group (`sub_group_size`, 1e9 elements) at a time on an fp32 flat copy of
    that part of the rank's gradient partition. Gathered layers in `gather_width`, buckets in the
    compute dtype. CPU ranks hold less (`cpu_sharded_buffers`)."""
    a, gw = (2 if s.bf16 else 4), gather_width(s)
    layer, vocab_unit = shape.layer_params, shape.vocab * shape.hidden
    if s.device == "cpu" and s.strategy.startswith(("fsdp", "zero3")):
        return cpu_sharded_buffers(shape, psi, s) + FRAMEWORK_RESERVE
    if s.strategy == "ddp":
        comm = 4 * psi  # the reducer's flat gradient buckets
    elif s.strategy.startswith("fsdp"):
        comm = int(gw * (3 * layer + vocab_unit)) + (4 * layer if s.adapter.kind == "none" else 0)
    elif s.strategy.startswith("zero3"):
        # the reduce bucket, and the interleaved flat copy of it that DeepSpeed's
        # reduce_scatter_coalesced builds (torch.cat) to reduce-scatter several gradients at once
        comm = int(gw * (2 * layer + vocab_unit)) + 2 * a * min(psi, 500_000_000)
        if s.strategy == "zero3":  # the optimizer steps on an fp32 flat copy of a sub-group's
            comm += 4 * min(psi // s.world, 1_000_000_000)  # gradients (_prepare_fp32_grad_for_sub_group)
    else:
        comm = 2 * a * min(psi, 500_000_000)  # reduce and all-gather buckets (5e8 elements)
    return comm + upcast_bytes(shape, s) + FRAMEWORK_RESERVE


def cpu_sharded_buffers(shape: Shape, psi: int, s: Setup) -> int:
    """The step's transients of FSDP2 and ZeRO-3 on CPU ranks, which do not add up. FSDP2 holds one
    unit at a time there (blocks of 4 MiB and more; smaller ones keep FSDP2's defaults, a few MiB
    more than this; no backward prefetch, each all-gather's buffer freed after its own copy-out:
    train/strategies/parallelize.py `gather_one_unit_at_a_time`). Under LoRA each frozen projection
    is its own unit, gathered straight into its weight like the embedding and the head (units of
    one parameter need no copy-out), so the largest transient is one such weight and the fp32 rows
    it is upcast by (`upcast_bytes`). Under full fine-tuning it is either a decoder block (gathered
    and copied out, with its fp32 gradients) or the output head with its fp32 gradient. Under
    ZeRO-3 it is one module's parameters (DeepSpeed gathers each module as it runs, into one flat
    buffer that they view; in place on CPU ranks, train/strategies/deepspeed.py `_gather_in_place`)
    with the reduce bucket (2e5 elements there), its flat copy and the fp32 gradient sub-group of
    backward and the optimizer step with Adam's temporaries (sub-groups of 2e5 elements there), or
    the head. Every module is released after its use there (no reuse window: deepspeed.py
    `CPU_ZERO3`), so step 2 holds no more than step 1 but Adam's moments."""
    a, gw = (2 if s.bf16 else 4), gather_width(s)
    layer, vocab_unit = shape.layer_params, shape.vocab * shape.hidden
    upcast = upcast_bytes(shape, s)
    projection = max(shape.hidden * shape.intermediate, shape.hidden * shape.hidden)
    if s.strategy.startswith("fsdp") and s.adapter.kind == "lora":
        return int(gw * max(projection, vocab_unit)) + upcast
    if s.strategy.startswith("fsdp"):
        return max(int(2 * gw * layer) + 4 * layer + upcast, int(gw * vocab_unit) + 4 * vocab_unit)
    block = int(gw * projection) + 2 * a * min(psi, CPU_REDUCE_BUCKET)  # one module's parameters at a time
    if s.strategy == "zero3":
        # the fp32 flat copy of a sub-group's gradients, and the two temporaries of its size that
        # torch's Adam makes stepping it as one tensor (the denominator, the decayed gradient); a
        # sub-group closes once it reaches CPU_SUB_GROUP elements, so it may hold one more partition
        largest = shape.largest_param if s.adapter.kind == "none" else max(
            (n for n, _ in s.adapter.tensors(shape)), default=0)
        block += 12 * min(psi // s.world, CPU_SUB_GROUP + largest // s.world)
    return max(block + upcast, int(gw * vocab_unit))


def step_seconds(shape: Shape, psi: int, s: Setup, gpu: GPU) -> float:
    """Roofline estimate of one optimizer step: compute vs. collective traffic, overlapped."""
    tokens = s.micro_batch * s.seq_len
    flops = 6 * (psi - shape.vocab * shape.hidden * (0 if shape.tied else 1)) \
        + 12 * shape.layers * shape.hidden * s.seq_len
    efficiency = 0.5 * tokens / (tokens + 2048)  # small micro-batches keep the GPU less busy
    compute = s.accum * tokens * flops * (4 / 3 if s.checkpointing else 1) / (gpu.peak_bf16_flops * efficiency)
    ring = (s.world - 1) / s.world if s.world > 1 else 0.0
    bw = gpu.inter_node_bw if s.nnodes > 1 else gpu.intra_node_bw
    p, g = (2, 2) if s.bf16 else (4, 4)
    per_step = {"ddp": 2 * 4 * psi, "zero1": (p + g) * psi, "zero2": p * psi + s.accum * g * psi}
    traffic = per_step.get(s.strategy, s.accum * 2 * p * psi + (4 if s.strategy.startswith("fsdp") else g) * psi)
    seconds = max(compute, traffic * ring / bw)
    if s.strategy.endswith("offload"):
        seconds += 16 * psi / s.world / 25e9 + 12 * psi / s.world / 5e9  # PCIe round trip + CPU Adam
    return seconds


def breakdown(shape: Shape, s: Setup) -> dict[str, Any]:
    out = state_bytes(shape, s)
    out["activations"] = activation_bytes(shape, s, s.checkpointing)
    out["logits"] = logits_bytes(shape, s)
    out["buffers"] = buffer_bytes(shape, s.adapter.trainable(shape), s)
    out["total"] = sum(out.values())
    return out


def alternatives(shape: Shape, base: Setup, gpu: GPU, global_batch: int) -> list[dict[str, Any]]:
    """Every strategy x micro-batch x checkpointing that fits, fastest first."""
    per_rank = global_batch // base.world
    found = []
    for strategy in STRATEGIES:
        for mb in (m for m in (1, 2, 4, 8, 16, 32) if m <= per_rank and per_rank % m == 0):
            for ckpt in (False, True):
                s = replace(base, strategy=strategy, micro_batch=mb, accum=per_rank // mb, checkpointing=ckpt)
                total = breakdown(shape, s)["total"]
                if total <= gpu.memory_bytes:
                    sec = step_seconds(shape, shape.params, s, gpu)
                    host = host_bytes(shape, s, total - FRAMEWORK_RESERVE)["peak"]
                    found.append({"strategy": strategy, "micro_batch_size": mb, "activation_checkpointing": ckpt,
                                  "total_bytes": total, "host_bytes_per_node": host, "est_step_s": round(sec, 4),
                                  "tokens_per_s_per_gpu": round(per_rank * s.seq_len / sec)})
    return sorted(found, key=lambda r: (r["est_step_s"], r["total_bytes"]))


def plan(shape: Shape, s: Setup, gpu: GPU, global_batch: int) -> dict[str, Any]:
    """The JSON object of `python -m launch plan format=json`."""
    per_gpu = breakdown(shape, s)
    device_state = per_gpu["total"] - FRAMEWORK_RESERVE  # on the CPU: no CUDA context
    return {
        "params": shape.params, "trainable_params": s.adapter.trainable(shape),
        "adapter": {"kind": s.adapter.kind, "r": s.adapter.r} if s.adapter.kind != "none" else None,
        "base_dtype": s.base_dtype, "device": s.device, "nnodes": s.nnodes,
        "world_size": s.world, "gpu": gpu.name, "gpu_bytes": gpu.memory_bytes,
        "strategy": s.strategy, "dtype": "bf16" if s.bf16 else "fp32", "micro_batch_size": s.micro_batch,
        "grad_accum_steps": s.accum, "seq_len": s.seq_len, "activation_checkpointing": s.checkpointing,
        "loss": s.loss, "attention": s.attention, "per_gpu_bytes": per_gpu,
        "activations_bytes": {"without_checkpointing": activation_bytes(shape, s, False),
                              "with_checkpointing": activation_bytes(shape, s, True)},
        "fits": per_gpu["total"] <= gpu.memory_bytes,
        "est_step_s": round(step_seconds(shape, shape.params, s, gpu), 4),
        "host_bytes_per_node": host_bytes(shape, s, device_state),
        "alternatives": alternatives(shape, s, gpu, global_batch),
    }


def render(result: dict[str, Any], top: int = 8) -> str:
    """The human-readable table."""
    g = lambda b: f"{b / GiB:8.2f} GiB"  # noqa: E731
    pg, act = result["per_gpu_bytes"], result["activations_bytes"]
    lines = [f"{result['params'] / 1e9:.2f}B parameters | {result['strategy']} on {result['world_size']} x "
             f"{result['gpu']} | {result['dtype']} | micro batch {result['micro_batch_size']} x "
             f"{result['seq_len']} tokens | activation checkpointing "
             f"{'on' if result['activation_checkpointing'] else 'off'} | loss {result['loss']}"]
    if result["adapter"]:
        lines.append(f"adapter {result['adapter']['kind']} r={result['adapter']['r']}: "
                     f"{result['trainable_params'] / 1e6:.1f}M trainable of {result['params'] / 1e9:.2f}B | "
                     f"frozen base in {result['base_dtype']} (model.base_dtype)")
    lines.append("per GPU:" if result["device"] != "cpu" else "per rank on the CPU (trainer.device=cpu):")
    for key in ("params", "grads", "optimizer", "activations", "logits", "buffers", "total"):
        lines.append(f"  {key:<12}{g(pg[key])}")
    lines.append(f"  activations without / with checkpointing: {g(act['without_checkpointing']).strip()} / "
                 f"{g(act['with_checkpointing']).strip()}")
    lines.extend(render_host(result["host_bytes_per_node"], g))
    verdict = "fits" if result["fits"] else "DOES NOT FIT"
    lines.append(f"GPU memory {g(result['gpu_bytes']).strip()}: {verdict} "
                 f"({pg['total'] / result['gpu_bytes']:.0%} used)")
    lines.append("alternatives that fit, fastest first (estimated):" if result["alternatives"]
                 else "nothing fits on this GPU count: add GPUs or lower trainer.seq_len")
    for alt in result["alternatives"][:top]:
        lines.append(f"  strategy={alt['strategy']:<14} trainer.micro_batch_size={alt['micro_batch_size']:<3} "
                     f"trainer.activation_checkpointing={str(alt['activation_checkpointing']).lower():<6}"
                     f"{g(alt['total_bytes'])}  ~{alt['tokens_per_s_per_gpu']} tokens/s/GPU  "
                     f"host {alt['host_bytes_per_node'] / GiB:.0f} GiB/node")
    return "\n".join(lines)


def render_host(host: dict[str, Any], g: Any) -> list[str]:
    """The host-memory rows: per node, start-up next to training."""
    start, train = host["startup"], host["training"]
    rows = [("baseline", start["baseline"], train["baseline"]), ("weights", start["weights"], None),
            ("offloaded", None, train["offloaded"]), ("device state", None, train["device_state"]),
            ("total", start["total"], train["total"])]
    cell = lambda b: "           -" if b is None else g(b)  # noqa: E731
    ranks = f"{host['ranks_per_node']} rank{'s' if host['ranks_per_node'] > 1 else ''}"
    lines = [f"host memory per node ({ranks}):  start-up      training"]
    lines += [f"  {name:<14}{cell(a)}  {cell(b)}" for name, a, b in rows if name != "device state" or b]
    per = host["per_rank"]
    lines.append(f"  peak {g(host['peak']).strip()} per node, {g(per['peak']).strip()} per rank "
                 f"(start-up {g(per['startup']).strip()}, training {g(per['training']).strip()})")
    return lines


def shape_from_config(model: Any, data_vocab: int | None) -> Shape:
    """The planner's shape of `model` (a train.config.ModelConfig): its own fields, or the
    config.json of a local checkpoint (read as JSON; nothing is imported or downloaded)."""
    if model.kind == "hf_local":
        c = json.loads((Path(model.path) / "config.json").read_text())
        return Shape(c["vocab_size"], c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"],
                     c["num_attention_heads"], c.get("num_key_value_heads") or c["num_attention_heads"],
                     bool(c.get("tie_word_embeddings", False)))
    vocab = model.vocab_size or data_vocab
    if vocab is None:
        raise ValueError("model.vocab_size is null and the data config names no vocabulary size: "
                         "set model.vocab_size for the plan")
    return Shape(vocab, model.hidden_size, model.intermediate_size, model.num_hidden_layers,
                 model.num_attention_heads, model.num_key_value_heads, model.tie_word_embeddings)


def base_dtype_of(model: Any) -> str:
    """`model.base_dtype` as the trainer resolves it (train/model_weights.py): `auto` is the most
    common floating dtype in the safetensors headers of a local checkpoint (read as JSON, no
    torch), bf16 for a model built from config. f16 counts as 2 bytes, like bf16."""
    chosen = getattr(model, "base_dtype", "auto")
    if chosen != "auto":
        return chosen
    if model.kind != "hf_local":
        return "bf16"
    counts: dict[str, int] = {}
    for f in sorted(Path(model.path).glob("*.safetensors")):
        with f.open("rb") as fh:
            header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
        for key, meta in header.items():
            if key != "__metadata__" and meta["dtype"] in ("BF16", "F16", "F32"):
                counts[meta["dtype"]] = counts.get(meta["dtype"], 0) + 1
    return "fp32" if counts and max(counts, key=counts.get) == "F32" else "bf16"


def strategy_name(strategy: Any) -> str:
    """conf/strategy name of a train.config.StrategyConfig (offload variants included)."""
    if strategy.kind == "ddp":
        return "ddp"
    if strategy.kind == "fsdp":
        return "fsdp_offload" if strategy.offload_params else "fsdp"
    name = f"zero{strategy.zero_stage}"
    return f"{name}_offload" if strategy.offload_optimizer and strategy.zero_stage == 3 else name


def plan_request(cfg: Any, lc: Any) -> dict[str, Any]:
    """Plan a validated launch: `cfg` the training Config, `lc` the LaunchConfig."""
    t = cfg.trainer
    world = lc.world_size
    global_batch = t.global_batch_size or t.micro_batch_size * t.grad_accum_steps * world
    device = "cpu" if t.device == "cpu" else "cuda"
    a = cfg.adapter
    adapter = Adapter(a.kind, a.r, tuple(a.target_modules), tuple(a.modules_to_save or ()))
    setup = Setup(strategy=strategy_name(cfg.strategy), world=world, nnodes=lc.nnodes,
                  micro_batch=t.micro_batch_size, accum=max(1, global_batch // (t.micro_batch_size * world)),
                  seq_len=t.seq_len, checkpointing=t.activation_checkpointing,
                  bf16=t.dtype == "bf16" if device == "cpu" else t.dtype != "fp32",
                  loss=t.loss, attention=cfg.model.attention, adapter=adapter,
                  base_dtype=base_dtype_of(cfg.model), device=device)
    shape = shape_from_config(cfg.model, getattr(cfg.data, "vocab_size", None))
    return plan(shape, setup, lookup(lc.gpu), global_batch)
