"""Open a saved training checkpoint of any strategy and read its fp32 weights one tensor at a time.

The checkpoint layout is the trainer's contract (docs/DESIGN.md "Checkpoints"): trainer_state.json,
config.yaml, and either model/ (torch.distributed.checkpoint, DDP and FSDP) or deepspeed/
(DeepSpeed ZeRO-1/2/3, with or without offload). Readers never materialise the whole model:
`WeightSource.load(name)` returns one full tensor and the caller writes it out before asking
for the next.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from train.checkpoint_layout import (
    CHECKPOINTS_DIR,
    DEEPSPEED_DIR,
    LATEST,
    MODEL_DIR,
    STATE_FILE,
    STEP_PATH,
    TMP_PREFIX,
    LayoutError,
    check_checkpoint,
    read_latest,
    read_state,
    read_text,
)
from train.export.dcp_reader import DCPWeights
from train.export.weights import (
    CheckpointError,
    WeightSource,
    canonical_name,
    release_pages,
)
from train.export.zero_reader import ZeroWeights

__all__ = ["Checkpoint", "CheckpointError", "WeightSource", "canonical_name", "open_checkpoint",
           "release_pages", "resolve_checkpoint_dir"]


@dataclass
class Checkpoint:
    """A complete checkpoint directory and what trainer_state.json says about it."""

    path: Path
    state: dict[str, Any]
    weights: WeightSource

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def strategy(self) -> dict[str, Any]:
        return dict(self.state.get("strategy") or {})

    @property
    def model_config(self) -> dict[str, Any]:
        return dict(self.state["model_config"])

    @property
    def tokenizer_dir(self) -> str | None:
        return self.state.get("tokenizer_dir")


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept step_N, a checkpoints/ dir or a run dir (the last two follow their `latest` file)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint={str(path)!r} does not exist: pass {STEP_PATH}")
    for base in (p, p / CHECKPOINTS_DIR):
        name = None if (p / STATE_FILE).exists() else read_latest(base)
        if name is not None and (base / name).is_dir():
            return base / name
        if not (p / STATE_FILE).exists() and (base / LATEST).exists():
            raise CheckpointError(f"{base / LATEST} {_latest_problem(base, name)}: pass "
                                  f"{STEP_PATH} explicitly")
    if p.name.startswith(TMP_PREFIX):
        raise CheckpointError(f"{p} is an incomplete checkpoint (still being written, or its writer "
                              f"was killed): pass a complete {STEP_PATH}")
    return p


def _latest_problem(base: Path, name: str | None) -> str:
    if name is not None:
        return f"names {name}, which does not exist"
    try:
        return f"holds {read_text(base / LATEST, limit=4096).strip()[:80]!r}, not a step_N name"
    except LayoutError as exc:
        return f"is unusable ({exc})"


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Read trainer_state.json and pick the weight reader for the strategy that wrote `path`."""
    p = resolve_checkpoint_dir(path)
    if not (p / STATE_FILE).exists():  # present but a directory or garbage: check_checkpoint names it
        raise CheckpointError(f"{p} has no {STATE_FILE}: it is not a complete checkpoint; "
                              f"pass {STEP_PATH} (written by `python -m train`)")
    problem = check_checkpoint(p, verify=True)  # checksums, when checkpoint.verify recorded them
    if problem:
        raise CheckpointError(f"{p} cannot be exported: {problem}; pass another {STEP_PATH}")
    state = read_state(p)
    if not isinstance(state.get("model_config"), dict):
        raise CheckpointError(f"{p / STATE_FILE} lacks model_config: it was not written by this trainer")
    if (p / DEEPSPEED_DIR).is_dir():
        weights: WeightSource = ZeroWeights(p / DEEPSPEED_DIR)
    elif (p / MODEL_DIR).is_dir():
        weights = DCPWeights(p / MODEL_DIR)
    else:
        raise CheckpointError(f"{p} has neither {MODEL_DIR}/ (DDP/FSDP) nor {DEEPSPEED_DIR}/ (ZeRO): "
                              "no weights to export")
    return Checkpoint(path=p.resolve(), state=state, weights=weights)
