"""Nothing lost by an export (issue 12): refused targets leave the user's files intact, NaN/inf
weights are never published, and every file the exporter reads back may hold any bytes."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from tests.helpers.export_checkpoints import make_checkpoint
from train.export.__main__ import main
from train.export.config import ExportConfig
from train.export.hf_export import export_checkpoint
from train.export.hook import ExportHook
from train.export.verify import NonFiniteWeightsError

NO_VERIFY = ["export.verify=false", "export.verify_new_tokens=0"]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` (dirs too) with the sha256 of file contents: 'intact' means equal."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("safety") / "run")


@pytest.fixture()
def fresh(tmp_path):
    """A run of its own, for tests that damage it."""
    return make_checkpoint(tmp_path / "run")


def _refused(capsys, args, code=2):
    assert main(args) == code
    return capsys.readouterr().err


def test_out_that_is_not_an_export_is_refused_and_left_intact(run, tmp_path, capsys):
    user = tmp_path / "my_models"
    (user / "sub").mkdir(parents=True)
    (user / "notes.txt").write_text("precious")
    (user / "sub" / "weights.bin").write_bytes(b"\0" * 100)
    before, around = snapshot(user), sorted(p.name for p in tmp_path.iterdir())
    err = _refused(capsys, [f"checkpoint={run.path}", f"out={user}", *NO_VERIFY])
    assert f"out={user}" in err and "not an earlier export" in err and "Traceback" not in err
    assert snapshot(user) == before and sorted(p.name for p in tmp_path.iterdir()) == around

    (user / "export.json").write_text('["not ours"]')  # an export.json that scaletrain did not write
    before = snapshot(user)
    err = _refused(capsys, [f"checkpoint={run.path}", f"out={user}", *NO_VERIFY])
    assert "export.json" in err and snapshot(user) == before

    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"x")
    assert "is a file" in _refused(capsys, [f"checkpoint={run.path}", f"out={a_file}", *NO_VERIFY])
    assert a_file.read_bytes() == b"x"


@pytest.mark.parametrize("where", ["checkpoints", "checkpoints/new", "checkpoints/step_00000002/model",
                                   "checkpoints/step_00000002"])
def test_out_inside_checkpoints_is_refused(run, capsys, where):
    run_dir = run.path.parent.parent
    before = snapshot(run_dir)
    err = _refused(capsys, [f"checkpoint={run.path}", f"out={run_dir / where}", *NO_VERIFY])
    assert "inside the checkpoint directory" in err and str(run_dir / "checkpoints") in err
    assert snapshot(run_dir) == before


def test_reexport_over_an_earlier_export_and_into_an_empty_dir(run, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert main([f"checkpoint={run.path}", f"out={out}", *NO_VERIFY]) == 0
    first = json.loads((out / "export.json").read_text())
    assert main([f"checkpoint={run.path}", f"out={out}", "export.dtype=fp16", *NO_VERIFY]) == 0
    assert json.loads((out / "export.json").read_text())["dtype"] == "fp16" != first["dtype"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no temporary or moved-aside dirs


def test_hook_refuses_a_user_directory_at_exports_step_n(run, tmp_path):
    run_dir = tmp_path / "hookrun"
    shutil.copytree(run.path.parent.parent, run_dir)
    squatter = run_dir / "exports" / f"step_{run.path.name[5:]}"
    squatter.mkdir(parents=True)
    (squatter / "mine.txt").write_text("keep me")
    hook = ExportHook(ExportConfig(kind="hf", verify=False, verify_new_tokens=0), run_dir)
    meta = hook(2, run_dir / "checkpoints" / run.path.name)
    assert "not an earlier export" in meta["error"]
    assert sorted(p.name for p in squatter.iterdir()) == ["mine.txt"] and (squatter / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("value,word,dtype", [(float("nan"), "1 NaN", "fp32"), (float("inf"), "1 inf", "fp32"),
                                              (1e6, "1 inf", "fp16")])
def test_non_finite_weights_are_never_published(tmp_path, value, word, dtype):
    name = "model.layers.1.mlp.down_proj.weight"
    ckpt = make_checkpoint(tmp_path / "run", poison={name: value})
    out = tmp_path / "exports" / "x"
    with pytest.raises(NonFiniteWeightsError) as err:
        export_checkpoint(ckpt.path, out, ExportConfig(kind="hf", dtype=dtype, verify=False))
    assert name in str(err.value) and word in str(err.value) and "export.verify=false" in str(err.value)
    assert not out.exists() and list((tmp_path / "exports").iterdir()) == []


def test_non_finite_export_exits_1_on_the_cli(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "run", poison={"model.norm.weight": float("nan")})
    err = _refused(capsys, [f"checkpoint={ckpt.path}", f"out={tmp_path / 'e'}", *NO_VERIFY], code=1)
    assert "model.norm.weight" in err and "NaN" in err and not (tmp_path / "e").exists()


BAD_BYTES = {"invalid utf-8": b'{"step": 2, "x": "\xff\xfe"}', "binary": bytes(range(256)) * 4,
             "empty": b"", "a JSON list": b"[1, 2]", "not JSON": b"step=2"}


@pytest.mark.parametrize("kind", [*BAD_BYTES, "a directory"])
def test_corrupt_trainer_state_is_named_exit_2(fresh, capsys, kind):
    state = fresh.path / "trainer_state.json"
    state.unlink()
    if kind == "a directory":
        state.mkdir()
    else:
        state.write_bytes(BAD_BYTES[kind])
    err = _refused(capsys, [f"checkpoint={fresh.path}", *NO_VERIFY])
    assert str(state) in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["invalid utf-8", "binary", "empty", "names a missing step"])
def test_corrupt_latest_is_named_exit_2(fresh, capsys, kind):
    latest = fresh.path.parent / "latest"
    latest.write_bytes(b"step_00000099\n" if kind == "names a missing step" else BAD_BYTES[kind])
    err = _refused(capsys, [f"checkpoint={fresh.path.parent.parent}", *NO_VERIFY])
    assert str(latest) in err and "RUN_DIR/checkpoints/step_N" in err


def test_truncated_checkpoint_file_is_named_exit_2(fresh, capsys):
    shard = next((fresh.path / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])
    err = _refused(capsys, [f"checkpoint={fresh.path}", *NO_VERIFY])
    assert f"file model/{shard.name} has" in err and str(fresh.path) in err and "truncated" in err


def test_truncated_shard_of_an_unlisted_checkpoint_is_named_not_a_traceback(fresh, capsys):
    state = json.loads((fresh.path / "trainer_state.json").read_text())
    state.pop("files")  # a checkpoint that records no sizes: the reader itself must name the damage
    (fresh.path / "trainer_state.json").write_text(json.dumps(state))
    shard = next((fresh.path / "model").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    err = _refused(capsys, [f"checkpoint={fresh.path}", *NO_VERIFY])
    assert str(fresh.path / "model") in err and "corrupt" in err and "Traceback" not in err


@pytest.mark.parametrize("kind", [*BAD_BYTES, "a directory", "missing"])
def test_corrupt_export_json_is_named_by_verify_exit_2(run, tmp_path, capsys, kind):
    out = tmp_path / "e"
    export_checkpoint(run.path, out, ExportConfig(kind="hf", verify=False))
    meta = out / "export.json"
    meta.unlink()
    if kind == "a directory":
        meta.mkdir()
    elif kind != "missing":
        meta.write_bytes(BAD_BYTES[kind])
    err = _refused(capsys, [f"verify={out}"])
    assert str(meta) in err and "Traceback" not in err
