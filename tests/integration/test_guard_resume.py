"""Resume says what changed and trusts no file it reads back: a changed LR wins, a changed
shape or engine refuses with the fix, a corrupt `latest`, rank file or flipped bit falls back
to an older checkpoint, and a full disk names the path and the bytes.

The refusals, the full disk and the garbled files are checked on `python -m train` (its exit
status, what it prints); which checkpoint the other resumes take and what they say on the way is
checked on the same run in this process (`train_here`: the checks are on the run's log, and each
resume skips an interpreter's start-up, about 4 CPU-s).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import TINY, child_env, run_train
from tests.helpers.inprocess import train_here
from train.checkpoint_layout import resume_candidates
from train.metrics import read_metrics

BASE = [*TINY, "schedule=constant", "optim.lr=1e-3", "checkpoint.every_steps=2", "trainer.log_every=1"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """Four steps with checkpoints at 2 and 4 (with checksums); each test copies it. Trained in this
    process: the CLI's resumes below read it like any run's."""
    run_dir = tmp_path_factory.mktemp("guard") / "base"
    train_here([*BASE, "trainer.max_steps=4", "checkpoint.verify=true", f"run.dir={run_dir}"])
    return run_dir


def _copy(base: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    return run_dir


def _resume(run_dir: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    return run_train([*BASE, "trainer.max_steps=6", f"run.dir={run_dir}", *extra], check=check)


def _resume_here(run_dir: Path, caplog, *extra: str) -> str:
    """`_resume` in this process; the run's log (what the CLI prints to stderr)."""
    caplog.set_level(logging.INFO)
    train_here([*BASE, "trainer.max_steps=6", f"run.dir={run_dir}", *extra])
    assert not [r for r in caplog.records if r.exc_info], caplog.text  # nothing logged a traceback
    return caplog.text


def _resumed_from(log: str) -> str:
    line = next(x for x in log.splitlines() if "resumed from" in x)
    return Path(line.split("resumed from ")[1].split(" at step")[0]).name


def test_changed_lr_takes_the_new_value_with_a_warning(base_run, tmp_path, caplog):
    run_dir = _copy(base_run, tmp_path)
    log = _resume_here(run_dir, caplog, "optim.lr=2e-4", "optim.weight_decay=0.05")
    assert "optim.lr: 0.001 -> 0.0002 (the new value is used)" in log
    assert "optim.weight_decay: 0.1 -> 0.05" in log
    lrs = {r["step"]: r["lr"] for r in read_metrics(run_dir) if "lr" in r}
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] == pytest.approx(2e-4) and lrs[6] == pytest.approx(2e-4)


@pytest.mark.parametrize("change, named", [
    (["model.hidden_size=32"], "model.hidden_size: the checkpoint has 64, this run 32"),
    (["strategy=zero1"], "strategy: the checkpoint was written by ddp (ddp), this run uses zero1"),
])
def test_incompatible_change_refused_naming_keys_and_fix(base_run, tmp_path, change, named):
    run_dir = _copy(base_run, tmp_path)
    proc = _resume(run_dir, *change, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert named in proc.stderr and "keep the old settings, or start a new run with a new run.dir" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run_dir / "checkpoints" / "step_00000004").is_dir()  # nothing lost


def test_ddp_checkpoint_resumes_under_fsdp(base_run, tmp_path, caplog):
    run_dir = _copy(base_run, tmp_path)
    log = _resume_here(run_dir, caplog, "strategy=fsdp")
    assert "strategy ddp -> fsdp: converting through torch.distributed.checkpoint" in log
    assert _resumed_from(log) == "step_00000004"


@pytest.mark.parametrize("content", [os.urandom(300), b"", b"\xff\xfe step_00000004", b"../../etc"])
def test_corrupt_latest_is_ignored_with_a_warning(tmp_path, content):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "trainer_state.json").write_text(json.dumps({"step": step, "files": {}}))
    (root / "latest").write_bytes(content)
    assert [p.name for p in resume_candidates(root)] == ["step_00000004", "step_00000002"]
    (root / "latest").unlink()
    (root / "latest").mkdir()  # a directory where a file should be
    assert [p.name for p in resume_candidates(root)] == ["step_00000004", "step_00000002"]


def test_latest_of_random_bytes_resumes_the_newest(base_run, tmp_path, caplog):
    run_dir = _copy(base_run, tmp_path)
    (run_dir / "checkpoints" / "latest").write_bytes(os.urandom(4096))
    log = _resume_here(run_dir, caplog)
    assert "ignoring" in log and "latest" in log
    assert _resumed_from(log) == "step_00000004"


def _garble(path: Path) -> None:
    """Same size (so the size check passes), different bytes."""
    path.write_bytes(os.urandom(path.stat().st_size))


@pytest.mark.parametrize("victim", ["rng/rank_00000.pt", "data/rank_00000.pt", "model/__0_0.distcp"])
def test_garbage_in_a_checkpoint_file_falls_back_to_the_older_one(base_run, tmp_path, victim):
    """On `python -m train` (not `_resume_here`): what it prints before the skip has no traceback (in
    this process, torch's own checkpoint logger would add one, which the CLI does not print)."""
    run_dir = _copy(base_run, tmp_path)
    state = run_dir / "checkpoints" / "step_00000004" / "trainer_state.json"
    state.write_text(json.dumps({k: v for k, v in json.loads(state.read_text()).items() if k != "checksums"}))
    _garble(run_dir / "checkpoints" / "step_00000004" / victim)
    proc = _resume(run_dir)
    assert f"skipping checkpoint {run_dir / 'checkpoints' / 'step_00000004'}" in proc.stderr
    assert "Traceback" not in proc.stderr.split("skipping checkpoint")[0]
    assert _resumed_from(proc.stderr) == "step_00000002"


def test_checkpoint_verify_catches_a_flipped_bit(base_run, tmp_path, capsys, caplog):
    from train.export.__main__ import main as export_main

    run_dir = _copy(base_run, tmp_path)
    ckpt = run_dir / "checkpoints" / "step_00000004"
    target = ckpt / "optim" / "__0_0.distcp"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x04
    target.write_bytes(bytes(data))
    # the export CLI's main() in this process (its exit status is main's return value; the CLI's
    # own subprocess runs are in test_export_cli.py): the checksum refuses before any export
    assert export_main([f"checkpoint={ckpt}", f"out={tmp_path / 'out'}"]) == 2
    assert f"{target} fails its checksum" in capsys.readouterr().err
    log = _resume_here(run_dir, caplog)
    assert f"{target} fails its checksum" in log
    assert _resumed_from(log) == "step_00000002"


def test_truncated_file_named_and_skipped(base_run, tmp_path, caplog):
    run_dir = _copy(base_run, tmp_path)
    target = run_dir / "checkpoints" / "step_00000004" / "rng" / "rank_00000.pt"
    target.write_bytes(target.read_bytes()[:100])
    log = _resume_here(run_dir, caplog)
    assert "file rng/rank_00000.pt has 100 bytes, expected" in log and str(target.parent.parent) in log
    assert _resumed_from(log) == "step_00000002"


def test_disk_full_while_checkpointing(base_run, tmp_path):
    run_dir = _copy(base_run, tmp_path)
    proc = run_train([*BASE, "trainer.max_steps=8", f"run.dir={run_dir}"], check=False,
                     env=child_env(SCALETRAIN_FAULT="checkpoint.enospc@6"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "No space left on device" in proc.stderr
    assert f"could not write checkpoint {run_dir / 'checkpoints' / '.tmp-step_00000006'}" in proc.stderr
    assert "A checkpoint needs about" in proc.stderr and "bytes (the size of step_00000004)" in proc.stderr
    assert not (run_dir / "checkpoints" / ".tmp-step_00000006").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"


@pytest.mark.parametrize("content", [os.urandom(200), b"", b"\xc3\x28 not utf-8", b"[1, 2]", None])
def test_corrupt_trainer_state_is_skipped_naming_it(tmp_path, content, caplog):
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "trainer_state.json").write_text(json.dumps({"step": step, "files": {}}))
    state = root / "step_00000004" / "trainer_state.json"
    state.unlink()
    if content is None:
        state.mkdir()
    else:
        state.write_bytes(content)
    assert [p.name for p in resume_candidates(root)] == ["step_00000002"]
    assert f"skipping checkpoint {root / 'step_00000004'}" in caplog.text and str(state) in caplog.text


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 3 MiB filesystem (needs root and mount rights; skipped elsewhere)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root); the fault-injected disk-full test covers the path")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_on_a_real_small_filesystem(small_tmpfs):
    """The twin of the fault-injected test: a real ENOSPC from inside torch.distributed.checkpoint."""
    run_dir = small_tmpfs / "run"
    proc = run_train([*BASE, "trainer.max_steps=8", "checkpoint.keep_last=3", f"run.dir={run_dir}"], check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "could not write checkpoint" in proc.stderr and "bytes are free" in proc.stderr
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert (run_dir / "checkpoints" / latest).is_dir()
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))
