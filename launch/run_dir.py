"""`python -m launch.run_dir [training overrides]`: print the absolute run directory.

slurm/train.sbatch submitted by hand calls this to learn where the run writes (it needs the
directory for the STOP file and passes it to every node as an absolute run.dir).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def resolve_run_dir(overrides: list[str]) -> Path:
    """run.dir of conf/train.yaml with these overrides, made absolute against the current dir."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = compose("train", overrides=overrides)
    return Path(os.path.abspath(str(OmegaConf.select(cfg, "run.dir"))))


if __name__ == "__main__":
    print(resolve_run_dir([a for a in sys.argv[1:] if not a.startswith("--local_rank")]))
