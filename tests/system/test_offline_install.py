"""The air-gapped path end to end: build the wheelhouse for this Python, install it with --no-index into
a fresh environment that has torch and nothing else, import every module there and train two steps.

The fresh venv sees torch (and torch's own dependencies) through a .pth file pointing at a folder of
links into this environment's site-packages, as a site image's torch would be; no other package of
this environment is visible, and pip runs with no configuration (no index, no find-links)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.helpers import REPO, child_env

pytestmark = [pytest.mark.system, pytest.mark.slow]


def _closure(name: str, seen: set[str] | None = None) -> set[str]:
    """`name` and everything it requires at run time in this environment (no extras)."""
    seen = set() if seen is None else seen
    key = name.lower().replace("_", "-")
    if key in seen:
        return seen
    seen.add(key)
    for spec in importlib.metadata.requires(name) or []:
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            _closure(req.name, seen)
    return seen


def _torch_only(dest: Path) -> None:
    """Links to torch and its dependencies' top-level files, and only those."""
    dest.mkdir()
    for name in _closure("torch"):
        dist = importlib.metadata.distribution(name)
        for top in {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            src = Path(dist.locate_file(top))
            if src.exists() and not (dest / top).exists():
                (dest / top).symlink_to(src)


def test_wheelhouse_installs_offline_next_to_an_existing_torch(tmp_path):
    wheels = tmp_path / "wheelhouse"
    build = subprocess.run([sys.executable, str(REPO / "scripts" / "wheelhouse.py"), "--out", str(wheels)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-3000:]
    assert "MB without wandb" in build.stdout
    names = [w.name for w in wheels.glob("*.whl")]
    assert any(n.startswith("scaletrain-") for n in names) and any(n.startswith("deepspeed-") for n in names)
    assert not [n for n in names if n.startswith(("torch-", "nvidia", "triton-"))]  # the node's torch stays

    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    _torch_only(tmp_path / "torch_only")
    (site / "site_torch.pth").write_text(str(tmp_path / "torch_only") + "\n")
    pin = tmp_path / "pin.txt"
    pin.write_text(f"torch=={importlib.metadata.version('torch')}\n")
    env = {k: v for k, v in child_env().items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    env["PIP_CONFIG_FILE"] = os.devnull  # no index, no find-links, no constraints from this machine
    # --no-compile: pip's byte-compilation of every package (89 wheels) was most of this test's time (the
    # modules imported below compile as they load; the wheels, resolution and pins are the same)
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-index", "--find-links",
                              str(wheels), "--only-binary=:all:", "--no-compile", "-c", str(pin), "scaletrain"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-3000:]

    work = tmp_path / "elsewhere"  # not the checkout: the installed package must be what runs
    work.mkdir()
    check = """
import importlib, json, pkgutil, torch
mods = []
for pkg in ("train", "data_pipeline", "launch"):
    root = importlib.import_module(pkg)
    mods += [m.name for m in pkgutil.walk_packages(root.__path__, pkg + ".")]
for m in mods:
    importlib.import_module(m)
import hydra, train.loop as train
print(json.dumps({"modules": len(mods), "train": train.__file__, "hydra": hydra.__file__, "torch": torch.__file__}))
"""
    proc = subprocess.run([str(py), "-c", check], cwd=work, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["modules"] > 50
    assert seen["train"].startswith(str(site)) and seen["hydra"].startswith(str(site))
    assert seen["torch"].startswith(str(tmp_path / "torch_only"))  # torch as it was, through the .pth
    assert str(Path(seen["torch"]).resolve()).startswith(sysconfig.get_paths()["purelib"])

    run = subprocess.run([str(py), "-m", "train", "trainer.max_steps=2", f"run.dir={work / 'run'}"], cwd=work,
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    steps = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2]
