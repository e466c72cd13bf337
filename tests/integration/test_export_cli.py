"""`python -m train.export` as users run it (real subprocesses), and what a SIGKILL leaves."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.export_checkpoints import make_checkpoint
from train.export.config import ExportConfig
from train.export.files import clean_stale, verify_dir
from train.export.hf_export import export_checkpoint


def run_export(args: list[str], **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-m", "train.export", *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli") / "run")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_export_verify_and_tamper(ckpt, tmp_path, capsys):
    from train.export.__main__ import main

    out = tmp_path / "exported"
    proc = run_export([f"checkpoint={ckpt.path}", f"out={out}", "export.dtype=bf16", "export.gguf=q8_0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["path"] == str(out) and summary["verified"] is True and summary["gguf"] == ["model-q8_0.gguf"]
    assert json.loads((out / "export.json").read_text())["dtype"] == "bf16"

    # verify= through the CLI's main() in this process (the subprocess above ran the module's entry;
    # its exit status is main's return value): a file check needs no interpreter of its own
    assert main([f"verify={out}"]) == 0 and json.loads(capsys.readouterr().out)["ok"] is True
    gguf_file = out / "model-q8_0.gguf"
    gguf_file.write_bytes(gguf_file.read_bytes()[:-10])
    assert main([f"verify={out}"]) == 1 and "model-q8_0.gguf: size" in capsys.readouterr().err



def test_cli_usage_errors_exit_2(ckpt, capsys):
    from train.export.__main__ import main

    assert main([f"checkpoint={ckpt.path}", "export.dtype=int4", "export.max_shard_size=lots"]) == 2
    err = capsys.readouterr().err
    assert "export.dtype='int4'" in err and "export.max_shard_size" in err
    assert main(["export.nonsense=1"]) == 2 and "nonsense" in capsys.readouterr().err
    assert main(["out=/tmp/x"]) == 2 and "checkpoint= is required" in capsys.readouterr().err
    assert main([f"checkpoint={ckpt.path}/missing"]) == 2 and "does not exist" in capsys.readouterr().err


def _export_then_die(checkpoint: Path, final: Path) -> None:
    os.environ["SCALETRAIN_FAULT"] = "export.write"
    export_checkpoint(checkpoint, final, ExportConfig(kind="hf", dtype="fp16"))


@pytest.mark.timeout(300)
def test_sigkill_mid_export_leaves_previous_export_and_no_partial_final(ckpt, tmp_path):
    exports = tmp_path / "exports"
    final = exports / "step_00000002"
    export_checkpoint(ckpt.path, final, ExportConfig(kind="hf", verify=False))
    before = (final / "export.json").read_text()

    # a forked exporter (libraries already imported: no start-up cost) SIGKILLs itself after
    # writing every weight shard into its temporary directory, before verification and rename
    child = multiprocessing.get_context("fork").Process(target=_export_then_die, args=(ckpt.path, final))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL
    assert (final / "export.json").read_text() == before
    verify_dir(final)
    leftovers = [p.name for p in exports.iterdir() if p.name != "step_00000002"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-step_00000002-"), leftovers

    # the next export cleans the stale temporary directory and replaces the export in place
    export_checkpoint(ckpt.path, final, ExportConfig(kind="hf", dtype="fp16", verify=False))
    assert sorted(p.name for p in exports.iterdir()) == ["step_00000002"]
    assert json.loads((final / "export.json").read_text())["dtype"] == "fp16"


def test_clean_stale_restores_an_export_moved_aside_by_a_killed_publish(tmp_path):
    previous = tmp_path / "step_00000004"
    previous.mkdir()
    (previous / "export.json").write_text("{}")
    dead_pid = 2**22 + 12345  # above the default pid_max: never a live process
    shutil.move(previous, tmp_path / f".old-step_00000004-{dead_pid}")
    (tmp_path / f".tmp-step_00000006-{dead_pid}").mkdir()
    notes = clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004"]
    assert any("restored" in n for n in notes) and any("removed stale" in n for n in notes)
