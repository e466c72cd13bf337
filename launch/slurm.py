"""target=slurm: render slurm/train.sbatch from config and submit it with sbatch.

The template in slurm/train.sbatch stays a script a user can submit by hand; rendering only
replaces its two marked blocks (#SBATCH directives and settings) with values from the config,
so the job that runs is the same readable script. The rendered copy is kept in
RUN_DIR/slurm/train.sbatch: `sbatch` on it again resumes the run by hand.
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from data_pipeline.fsutil import atomic_write_text
from launch.commands import Plan, override_key
from launch.config import CONTROL, LaunchConfig
from train.config import Config

TEMPLATE = Path(__file__).resolve().parents[1] / "slurm" / "train.sbatch"
BLOCKS = ("SBATCH", "settings")


PLAIN = re.compile(r"[A-Za-z0-9_./:%@=+,-]*")


def _quoted(value: str) -> str:
    """An #SBATCH option value. sbatch splits these lines on blanks, takes an unquoted `#` as the
    start of a comment, and reads quotes and backslashes (slurm's sbatch/opt.c `_get_argument`),
    so anything else is double-quoted with `\\` and `"` escaped. A control character (a newline
    would end the directive block and run the rest as a command) is refused, never rendered."""
    value = str(value)
    if CONTROL.search(value):
        raise ValueError(f"{value!r} contains a control character and cannot go into an #SBATCH line")
    if PLAIN.fullmatch(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _option(opt: str) -> str:
    """`--name=value` with the value quoted as needed."""
    name, eq, value = str(opt).partition("=")
    return f"{_quoted(name)}{eq}{_quoted(value)}" if eq else _quoted(name)


def _log_path(run_dir: Path, name: str) -> str:
    """A log file pattern in the run dir: `%` of the path escaped, `%j` (job id) kept."""
    return _quoted(str(run_dir / "logs").replace("%", "%%") + "/" + name)


def sbatch_options(lc: LaunchConfig, cfg: Config, run_dir: Path, workdir: Path) -> list[str]:
    """The job's sbatch options, one per #SBATCH line."""
    s = lc.slurm
    opts = [f"--job-name={_quoted(s.job_name or cfg.run.name)}", f"--nodes={lc.nnodes}", "--ntasks-per-node=1"]
    if lc.gpus_per_node > 0:
        opts.append(f"--gpus-per-node={lc.gpus_per_node}")
    opts.append(f"--cpus-per-task={s.cpus_per_task}")
    if s.mem is not None:
        opts.append(f"--mem={_quoted(s.mem)}")
    opts.append(f"--time={_quoted(s.time)}")
    for name in ("partition", "account", "qos"):
        if getattr(s, name):
            opts.append(f"--{name}={_quoted(getattr(s, name))}")
    opts += [f"--chdir={_quoted(str(workdir))}",
             f"--output={_log_path(run_dir, 'slurm-%j.out')}",
             f"--error={_log_path(run_dir, 'slurm-%j.err')}",
             f"--signal=B:USR1@{s.signal_seconds}", "--requeue", "--open-mode=append",
             *[_option(x) for x in s.extra]]
    return opts


def settings_lines(lc: LaunchConfig, run_dir: Path, overrides: list[str], python: str) -> list[str]:
    q = shlex.quote
    return [f"PYTHON={q(python)}",
            f"NPROC_PER_NODE={lc.procs}",
            f"MAX_REQUEUES={lc.max_requeues}",
            "TRAIN_OVERRIDES=(" + " ".join(q(o) for o in overrides) + ")",
            f"RUN_DIR={q(str(run_dir))}"]


def render(template: str, blocks: dict[str, list[str]]) -> str:
    """Replace the body of each `### NAME...` ... `### end NAME ###` block of the template."""
    lines, out, skipping = template.splitlines(), [], None
    for line in lines:
        if skipping is not None:
            if line.strip() == f"### end {skipping} ###":
                out.append(line)
                skipping = None
            continue
        out.append(line)
        for name, body in blocks.items():
            if line.startswith(f"### {name}"):
                out.extend(body)
                skipping = name
    if skipping is not None:
        raise ValueError(f"{TEMPLATE}: block '### {skipping}' has no '### end {skipping} ###' line")
    return "\n".join(out) + "\n"


def slurm_plan(lc: LaunchConfig, cfg: Config, overrides: list[str], *, python: str | None = None,
               workdir: Path | None = None) -> Plan:
    """The rendered job script (as a file to write) and the sbatch command that submits it."""
    run_dir = Path(cfg.run.dir).absolute()
    workdir = (workdir or Path.cwd()).absolute()
    overrides = [o for o in overrides if override_key(o) != "run.dir"]
    script = render(TEMPLATE.read_text(), {
        "SBATCH": [f"#SBATCH {o}" for o in sbatch_options(lc, cfg, run_dir, workdir)],
        "settings": settings_lines(lc, run_dir, overrides, python or sys.executable),
    })
    path = run_dir / "slurm" / "train.sbatch"
    return Plan(["sbatch", str(path)], {path: script})


def write_files(files: dict[Path, str]) -> None:
    """Write each file under a temp name in its directory, then rename (never half-written)."""
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text, mode=0o755 if path.suffix == ".sbatch" else 0o644)


def submit(plan: Plan, run_dir: Path) -> int:
    """Write the job script, create the log directory and submit; prints sbatch's own output."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise FileNotFoundError("sbatch not found on PATH: submit from a SLURM login node (or install "
                                "the SLURM client); dry_run=true prints the job script without it")
    (run_dir.absolute() / "logs").mkdir(parents=True, exist_ok=True)
    write_files(plan.files)
    res = subprocess.run([sbatch, *plan.argv[1:]], capture_output=True, text=True)
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    sys.stdout.flush()
    return res.returncode
