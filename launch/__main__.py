"""`python -m launch target=local|deepspeed|slurm [dry_run=true] [training overrides]`."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from launch.commands import Plan, deepspeed_plan, local_plan, training_overrides
from launch.config import LaunchRequest, load_launch
from launch.slurm import slurm_plan, submit, write_files
from train.config import ConfigError


def make_plan(req: LaunchRequest, overrides: list[str]) -> Plan:
    """The command (and files) for the request's target."""
    lc, run_dir = req.launch, Path(req.train.run.dir)
    if req.target == "slurm":
        return slurm_plan(lc, req.train, overrides)
    if req.target == "deepspeed":
        return deepspeed_plan(lc, overrides, run_dir)
    return local_plan(lc, overrides)


def run(raw: dict[str, Any], overrides: list[str]) -> int:
    """Validate, then print (dry run), submit (slurm) or exec (local, deepspeed) the launch."""
    req = load_launch(raw)
    plan = make_plan(req, training_overrides(overrides))
    if req.dry_run:
        for path, text in plan.files.items():
            print(f"# --- would write {path} ---\n{text.rstrip()}\n# --- end of {path.name} ---")
        print(plan.shell(), flush=True)
        return 0
    if req.target == "slurm":
        print(f"+ {plan.shell()}", file=sys.stderr, flush=True)
        return submit(plan, Path(req.train.run.dir))
    write_files(plan.files)
    print(f"+ {plan.shell()}", file=sys.stderr, flush=True)
    os.execv(plan.argv[0], plan.argv)
    return 1  # not reached


@hydra.main(config_path="../conf", config_name="launch", version_base=None)
def main(cfg: DictConfig) -> None:
    raw = OmegaConf.to_container(cfg, resolve=True)
    try:
        code = run(raw, list(HydraConfig.get().overrides.task))
    except (ConfigError, FileNotFoundError) as err:
        print(f"launch: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
