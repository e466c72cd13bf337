"""`python -m launch.finished RUN_DIR`: exit 0 when the run has reached its end, 1 when not.

slurm/train.sbatch asks this after a signalled attempt, to requeue only a run that still has
steps to go. It reads the newest checkpoint (checkpoints/latest -> trainer_state.json and the
config.yaml saved beside it), so it does not depend on timing between the signal and the ranks.
"""
from __future__ import annotations

import sys
from pathlib import Path

from omegaconf import OmegaConf

from train.checkpoint_layout import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    LATEST,
    LayoutError,
    read_latest,
    read_state,
)


def progress(run_dir: Path) -> tuple[bool, str]:
    """(finished, why): finished when the latest checkpoint reached trainer.max_steps or max_tokens."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    name = read_latest(root)
    if name is None:
        latest = root / LATEST
        return False, f"no {latest}" if not latest.exists() else f"{latest} is unusable (see the warning)"
    ckpt = root / name
    try:
        state = read_state(ckpt)
        trainer = OmegaConf.load(ckpt / CONFIG_FILE).get("trainer", {})
    except (LayoutError, OSError, ValueError) as err:
        return False, f"cannot read {ckpt}: {err}"
    step, tokens = int(state["step"]), int(state.get("tokens", 0))
    max_steps, max_tokens = int(trainer.get("max_steps", 0)), trainer.get("max_tokens")
    if step >= max_steps:
        return True, f"{ckpt.name}: step {step} of {max_steps}"
    if max_tokens is not None and tokens >= int(max_tokens):
        return True, f"{ckpt.name}: {tokens} tokens of {max_tokens}"
    return False, f"{ckpt.name}: step {step} of {max_steps}"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m launch.finished RUN_DIR")
    done, why = progress(Path(sys.argv[1]))
    print(("finished: " if done else "not finished: ") + why)
    sys.exit(0 if done else 1)
