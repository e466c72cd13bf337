"""`python -m launch target=local|deepspeed|slurm [dry_run=true] [training overrides]`."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from data_pipeline.overrides import exit_on_bad_override
from launch.commands import Plan, deepspeed_plan, local_plan, training_overrides
from launch.config import LaunchRequest, load_launch
from launch.plan import plan_request, render
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


PLAN_COMMAND = "plan"
"""`python -m launch plan ...`: print the memory plan instead of launching."""


def show_plan(req: LaunchRequest, fmt: str) -> int:
    result = plan_request(req.train, req.launch)
    print(json.dumps(result) if fmt == "json" else render(result), flush=True)
    return 0


def warn_if_too_big(req: LaunchRequest) -> None:
    """Before submitting a GPU job: say so when the planner expects it to run out of memory."""
    if req.launch.gpus_per_node <= 0:
        return
    try:
        result = plan_request(req.train, req.launch)
    except (ValueError, OSError, KeyError) as err:
        print(f"launch: warning: no memory plan ({err})", file=sys.stderr)
        return
    if not result["fits"]:
        best = result["alternatives"][0] if result["alternatives"] else None
        hint = (f"; e.g. strategy={best['strategy']} trainer.micro_batch_size={best['micro_batch_size']} "
                f"trainer.activation_checkpointing={str(best['activation_checkpointing']).lower()}" if best else "")
        print(f"launch: warning: the memory plan needs {result['per_gpu_bytes']['total'] / 2**30:.1f} GiB per GPU "
              f"but a {result['gpu']} has {result['gpu_bytes'] / 2**30:.1f} GiB "
              f"(python -m launch plan ... for the breakdown){hint}", file=sys.stderr, flush=True)


def run(raw: dict[str, Any], overrides: list[str], planning: bool = False) -> int:
    """Validate, then print (dry run), submit (slurm) or exec (local, deepspeed) the launch."""
    fmt = raw.pop("format", "table")
    if fmt not in ("table", "json"):
        raise ConfigError([f"format={fmt!r}: use format=table or format=json"])
    req = load_launch(raw, planning=planning)
    if planning:
        return show_plan(req, fmt)
    warn_if_too_big(req)
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
        code = run(raw, list(HydraConfig.get().overrides.task), planning=_PLANNING)
    except (ConfigError, FileNotFoundError) as err:
        print(f"launch: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)


_PLANNING = len(sys.argv) > 1 and sys.argv[1] == PLAN_COMMAND
if _PLANNING:
    del sys.argv[1]  # Hydra reads only overrides

if __name__ == "__main__":
    exit_on_bad_override("launch: ")
    main()
