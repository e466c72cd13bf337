"""`python -m train [overrides]` under torchrun, the deepspeed launcher, srun, or alone."""
from __future__ import annotations

import gc

# Start-up: importing torch, transformers and the engines allocates millions of objects that live
# as long as the run, and the cyclic collector would scan them again at every full collection while
# they are being created (about a sixth of the start-up's CPU time: docs/BENCHMARKS.md, "Trainer
# start-up imports"). Collection is off until they are imported, then they are frozen out of it.
gc.disable()

import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from typing import NoReturn  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402


def _strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends --local_rank=N; Hydra would reject it."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
            continue
        if arg in ("--local_rank", "--local-rank"):
            skip = True
            continue
        out.append(arg)
    return out


def exit_at_once(code: int) -> NoReturn:
    """The process ends here, without destroying its engines and process group: after a finished
    run (0), a lost data source or a collective that timed out (1).

    Their C++ destructors (gloo's process group, DDP's reducer) can wait forever for a peer that
    has already exited: seen on CPU as one rank of a finished 2-rank run blocked in the teardown of
    train()'s locals after every step, checkpoint and `destroy_process_group` was done, so that
    torchrun, srun and the job around them never returned (and a wedged group after a timeout, or
    DataLoader workers torchrun would SIGTERM after a lost source, likewise). Nothing is lost by
    skipping it: metrics are appended and closed per record, the tracker finished and the checkpoints
    were published before, the run lock is released and the logs are flushed here."""
    from train.lock import release_all

    release_all()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_of_imports() -> None:
    """What is alive now (modules, their functions and tables) lives until exit: moved out of the
    collector's generations (`gc.freeze`), so that the run's collections never scan it again."""
    gc.freeze()
    gc.enable()


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(dcfg: DictConfig) -> None:
    from train.config import ConfigError, load_config
    from train.host_memory import tune_allocator
    from train.signals import enable_stack_dumps

    tune_allocator()  # before the model is built: every later large block is returned when freed
    enable_stack_dumps()  # kill -USR2 <pid>: every thread's stack to stderr
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[%(asctime)s r{rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # Engine deprecation chatter (DeepSpeed calls deprecated c10d names) would drown the log.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process.*")
    raw = OmegaConf.to_container(dcfg, resolve=True)
    try:
        cfg = load_config(raw)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from data_pipeline.shards.manifest import ManifestError
    from train import dist
    from train.checkpoint import CheckpointWriteError
    from train.data_loss import DataSourceStop, report_for_launcher
    from train.guard import DivergedError
    from train.lock import RunLockError, release_all
    from train.loop import train
    from train.strategies import strategy_class

    strategy_class(cfg.strategy.kind)  # the engine's modules (DeepSpeed's) imported with the rest
    end_of_imports()
    finished: list = []  # the Run, kept alive past train(): see exit_at_once
    try:
        train(cfg, raw, keep=finished)
    except DataSourceStop as e:  # every rank stopped at the same step, after its checkpoint
        report_for_launcher(str(e))  # torchrun's failure summary shows it as the root cause
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        exit_at_once(1)  # on every rank, nothing printed after
    except (RunLockError, ManifestError, ConfigError, DivergedError, CheckpointWriteError) as e:  # no traceback
        release_all()
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, (DivergedError, CheckpointWriteError)) else 2)
    except Exception as e:
        if not dist.is_timeout(e):
            raise
        logging.getLogger("scaletrain").error("%s", dist.timeout_message(e, cfg.dist.timeout_s))
        exit_at_once(1)  # the process group is wedged
    exit_at_once(0)


if __name__ == "__main__":
    sys.argv = _strip_launcher_args(sys.argv)
    from data_pipeline.overrides import exit_on_bad_override

    exit_on_bad_override()
    main()
