"""The typed schema under the YAML in conf/.

Hydra composes plain YAML; `load_config` turns it into these dataclasses and collects every
problem (unknown keys, wrong types, bad values, impossible combinations) into one
`ConfigError` that names each key and its fix, before any process group starts.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_pipeline.config import SyntheticDataConfig, WebDatasetConfig, missing_local, missing_val_split
from data_pipeline.schema import ConfigError, build
from train.export.config import ExportConfig
from train.tracking.config import TrackingConfig


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory shared by all ranks (and all nodes): checkpoints, metrics, exports."""
    name: str = "scaletrain"
    lock_stale_s: float = 300.0
    """A run lock (RUN_DIR/run.lock) whose heartbeat is older than this is taken over with a warning
    (a dead pid on the same host, or a requeue of the same SLURM job, at once)."""


@dataclass
class ModelConfig:
    """A Llama-style decoder built from config, or a local Hugging Face checkpoint."""

    name: str = "tiny"
    kind: str = "llama"
    """`llama` (built from the fields below) or `hf_local` (loaded from `path`)."""
    path: str | None = None
    """Local Hugging Face checkpoint directory for kind=hf_local (never downloaded)."""
    trust_remote_code: bool = False
    """Run model code shipped inside a checkpoint; off unless you trust it."""
    vocab_size: int | None = None
    """null = the data's vocabulary size."""
    hidden_size: int = 64
    intermediate_size: int = 172
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    init_std: float = 0.02


@dataclass
class StrategyConfig:
    """How the model is distributed; one file per engine under train/strategies/."""

    name: str = "ddp"
    kind: str = "ddp"
    """`ddp`, `fsdp` or `deepspeed`."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 1, 2 or 3."""
    offload_optimizer: bool = False
    """ZeRO: optimizer state on CPU."""
    offload_params: bool = False
    """ZeRO-3: parameters on CPU. FSDP: CPUOffloadPolicy (params, grads, optimizer on CPU)."""
    reshard_after_forward: bool = True
    """FSDP2: free gathered parameters after forward (ZeRO-3 like); false = ZeRO-2 like."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config merged over the generated one (e.g. bucket sizes)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """`cosine` (linear warmup then cosine decay) or `constant` (linear warmup then flat)."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    """Final LR as a fraction of optim.lr (cosine)."""


@dataclass
class TrainerConfig:
    max_steps: int = 100
    """Optimizer steps to run."""
    max_tokens: int | None = None
    """Stop once this many tokens (global) have been trained on, if reached before max_steps."""
    micro_batch_size: int = 2
    """Sequences per rank per forward/backward."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (ignored when global_batch_size is set)."""
    global_batch_size: int | None = None
    """Sequences per optimizer step over all ranks; sets grad_accum_steps from the world size."""
    seq_len: int = 64
    seed: int = 0
    grad_clip: float = 1.0
    """Max global grad norm (0 = no clipping)."""
    log_every: int = 1
    eval_every: int = 0
    """Evaluate every N steps (0 = never)."""
    eval_batches: int = 4
    activation_checkpointing: bool = False
    dtype: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32 or bf16."""
    device: str = "auto"
    """auto, cpu or cuda."""


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Checkpoint every N steps (0 = only at the end and on SIGTERM/SIGUSR1)."""
    keep_last: int = 3
    """Complete checkpoints kept; the newest complete one is never deleted."""
    resume: bool = True
    """Resume automatically from checkpoints/latest when present."""
    at_end: bool = True


@dataclass
class DistConfig:
    timeout_s: float = 1800.0
    """Seconds a collective waits for every rank (the process group's timeout); a rank that stops
    responding then ends the job with a message naming the step and, where known, the rank."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    data: SyntheticDataConfig | WebDatasetConfig = field(default_factory=SyntheticDataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    dist: DistConfig = field(default_factory=DistConfig)


def env_world_size() -> int:
    """World size as the launcher announces it, before any process group exists."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            if var == "SLURM_NTASKS" and "LOCAL_RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
                continue
            return int(os.environ[var])
    return 1


def validate(cfg: Config, world_size: int) -> list[str]:
    """Cross-field checks; returns problems (empty when the config can run)."""
    p: list[str] = []
    t, m, s = cfg.trainer, cfg.model, cfg.strategy
    if t.max_steps < 1:
        p.append(f"trainer.max_steps={t.max_steps}: must be >= 1")
    if t.micro_batch_size < 1:
        p.append(f"trainer.micro_batch_size={t.micro_batch_size}: must be >= 1")
    if t.grad_accum_steps < 1:
        p.append(f"trainer.grad_accum_steps={t.grad_accum_steps}: must be >= 1")
    if t.global_batch_size is not None:
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step:
            p.append(f"trainer.global_batch_size={t.global_batch_size} is not a multiple of "
                     f"trainer.micro_batch_size x world size = {t.micro_batch_size} x {world_size}: "
                     f"set trainer.global_batch_size to a multiple of {per_step} or change "
                     "trainer.micro_batch_size")
    if t.seq_len < 2:
        p.append(f"trainer.seq_len={t.seq_len}: must be >= 2")
    if t.dtype not in ("auto", "fp32", "bf16"):
        p.append(f"trainer.dtype={t.dtype!r}: use auto, fp32 or bf16")
    if t.device not in ("auto", "cpu", "cuda"):
        p.append(f"trainer.device={t.device!r}: use auto, cpu or cuda")
    if t.seq_len > m.max_position_embeddings and m.kind == "llama":
        p.append(f"trainer.seq_len={t.seq_len} exceeds model.max_position_embeddings="
                 f"{m.max_position_embeddings}: lower trainer.seq_len")
    if m.kind not in ("llama", "hf_local"):
        p.append(f"model.kind={m.kind!r}: use llama or hf_local")
    if m.kind == "hf_local":
        if not m.path:
            p.append("model.path is not set: model=hf_local needs model.path=/local/hf/checkpoint")
        elif not (Path(m.path) / "config.json").is_file():
            p.append(f"model.path={m.path!r} has no config.json: point it at a local Hugging Face "
                     "checkpoint directory (nothing is downloaded)")
    if m.kind == "llama" and m.hidden_size % m.num_attention_heads:
        p.append(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
                 f"{m.num_attention_heads}")
    if m.kind == "llama" and m.num_attention_heads % m.num_key_value_heads:
        p.append(f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
                 f"model.num_key_value_heads={m.num_key_value_heads}")
    if s.kind not in ("ddp", "fsdp", "deepspeed"):
        p.append(f"strategy.kind={s.kind!r}: use strategy=ddp|zero1|zero2|zero3|zero3_offload|fsdp|fsdp_offload")
    if s.kind == "deepspeed" and s.zero_stage not in (1, 2, 3):
        p.append(f"strategy.zero_stage={s.zero_stage}: DeepSpeed needs 1, 2 or 3")
    if s.kind == "deepspeed" and s.offload_params and s.zero_stage != 3:
        p.append("strategy.offload_params=true needs strategy.zero_stage=3")
    if cfg.schedule.name not in ("cosine", "constant"):
        p.append(f"schedule.name={cfg.schedule.name!r}: use schedule=cosine or schedule=constant")
    if cfg.optim.name != "adamw":
        p.append(f"optim.name={cfg.optim.name!r}: only adamw is available")
    if cfg.checkpoint.keep_last < 1:
        p.append(f"checkpoint.keep_last={cfg.checkpoint.keep_last}: must be >= 1")
    for key, value in (("run.lock_stale_s", cfg.run.lock_stale_s), ("dist.timeout_s", cfg.dist.timeout_s)):
        if not value > 0:
            p.append(f"{key}={value}: must be > 0 (seconds)")
    if t.eval_every > 0:
        p.extend(missing_val_split(cfg.data))
    for section in (cfg.data, cfg.tracking, cfg.export):
        p.extend(section.validate())
    if isinstance(cfg.data, WebDatasetConfig):
        p.extend(missing_local(cfg.data.urls, "data.urls"))
    p.extend(_check_run_dir(cfg.run.dir))
    return p


def _check_run_dir(run_dir: str) -> list[str]:
    path = Path(run_dir).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return [f"run.dir={run_dir!r}: {probe} is a file, not a directory; choose another run.dir"]
    if not os.access(probe, os.W_OK | os.X_OK):
        return [f"run.dir={run_dir!r}: {probe} is not writable; choose a writable run.dir"]
    return []


def load_config(raw: dict[str, Any], world_size: int | None = None) -> Config:
    """Turn a resolved config mapping into `Config`, raising one ConfigError with every problem."""
    problems: list[str] = []
    raw = {k: v for k, v in raw.items() if k not in ("hydra", "launch", "target", "dry_run")}
    cfg = build(Config, raw, "", problems)
    try:
        problems.extend(validate(cfg, world_size if world_size is not None else env_world_size()))
    except (TypeError, ValueError, AttributeError):
        pass  # a value of the wrong type, already reported above, broke a cross-field check

    if problems:
        raise ConfigError(problems)
    return cfg


def grad_accum_steps(cfg: TrainerConfig, world_size: int) -> int:
    if cfg.global_batch_size is None:
        return cfg.grad_accum_steps
    return cfg.global_batch_size // (cfg.micro_batch_size * world_size)
