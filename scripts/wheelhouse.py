"""Collect scaletrain and every runtime dependency as wheels, for an offline install on a node that
already has its own (CUDA) torch: everything except torch and its CUDA libraries.

    python scripts/wheelhouse.py --out wheelhouse --python-version 3.12     # make wheelhouse PYVER=3.12
    # on the node (no network), into the environment that has the site's torch:
    python -m pip install --no-index --find-links wheelhouse --only-binary=:all: -c torch-pin.txt scaletrain
    # (make setup-offline WHEELHOUSE=wheelhouse PYTHON=/path/to/python writes the pin itself)

How: pip resolves `scaletrain` for the target interpreter and platform with `--only-binary=:all:`,
while torch resolves to a stub wheel with no dependencies (built here, left out of the result), so
neither torch nor nvidia-*/triton is downloaded. Distributions the index has only as sources
(deepspeed, antlr4-python3-runtime) are built here with `pip wheel --no-deps`; they must come out
pure Python (py3-none-any), or the script stops naming them. Versions are pinned to those of the
environment running this script (the tested set) unless --no-pin.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["train", "data_pipeline", "launch", "conf", "slurm", "pyproject.toml", "README.md"]
NOT_PINNED = re.compile(r"^(torch|triton|nvidia-.*|scaletrain|pip|setuptools|wheel)$")
NOT_SHIPPED = re.compile(r"^(torch|triton|nvidia_.*)-")


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, text=True, capture_output=True, **kw)


def stub_torch(where: Path, version: str) -> str:
    """A dependency-free wheel named torch, so that the resolver treats torch as present."""
    name = f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    with zipfile.ZipFile(where / name, "w") as z:
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: scaletrain\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return version


def pins(stub_version: str) -> str:
    """Constraints: the versions of this environment (what the tests ran on), torch = the stub."""
    lines = [f"torch=={stub_version}"]
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name and not NOT_PINNED.match(name):
            lines.append(f"{name}=={dist.version}")
    return "\n".join(sorted(set(lines))) + "\n"


def build_own_wheel(dest: Path) -> Path:
    """scaletrain's wheel, built from a copy so that the checkout gets no build/ or egg-info."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for item in SHIPPED:
            path = REPO / item
            if path.is_dir():
                shutil.copytree(path, src / item, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif path.exists():
                shutil.copy2(path, src / item)
        proc = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest), str(src)])
        if proc.returncode:
            sys.exit(f"error: building scaletrain's wheel failed:\n{proc.stderr[-3000:]}")
    return next(dest.glob("scaletrain-*.whl"))


def build_pure(requirement: str, dest: Path, constraints: Path) -> Path:
    """A wheel from the sdist of `requirement`; refuses anything that is not pure Python."""
    before = set(dest.glob("*.whl"))
    env = {**os.environ, "DS_BUILD_OPS": "0"}  # DeepSpeed: ops JIT-build at run time
    proc = run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-c", str(constraints), "-w", str(dest),
                requirement], env=env)
    built = sorted(set(dest.glob("*.whl")) - before)
    if proc.returncode or not built:
        sys.exit(f"error: {requirement} has no wheel for the target and building one failed:\n{proc.stderr[-3000:]}")
    if not built[0].name.endswith("-py3-none-any.whl"):
        sys.exit(f"error: {requirement} built as {built[0].name}, not pure Python: it cannot be carried to another "
                 "platform this way; build it on the target's Python and platform and add it to the wheelhouse")
    return built[0]


def platforms(target: str) -> list[str]:
    """--platform flags for `target` and every older manylinux it runs: pip download takes the tags
    literally (a manylinux_2_17 wheel is not picked for --platform manylinux_2_28 alone)."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", target)
    if not m:
        return ["--platform", target]
    glibc, arch = int(m.group(1)), m.group(2)
    tags = [f"manylinux_2_{v}_{arch}" for v in range(glibc, 4, -1)]
    tags += [f"{legacy}_{arch}" for v, legacy in ((17, "manylinux2014"), (12, "manylinux2010"), (5, "manylinux1"))
             if glibc >= v]
    return [flag for tag in tags for flag in ("--platform", tag)]


def sdist_only(pip_output: str) -> list[str]:
    """The requirements pip found no wheel for, from its two wordings of that."""
    found = re.findall(r"No matching distribution found for (\S+)", pip_output)
    block = re.search(r"no matching distributions available for your environment:\n((?:[ \t]+\S+\n?)+)", pip_output)
    if block:
        found += block.group(1).split()
    return list(dict.fromkeys(found))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=REPO / "wheelhouse")
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="target interpreter, e.g. 3.12 (default: this one)")
    p.add_argument("--platform", default="manylinux_2_28_x86_64",
                   help="target platform tag (manylinux_2_28 covers RHEL 8 and later; older manylinux wheels count)")
    p.add_argument("--no-pin", action="store_true", help="newest versions allowed by pyproject.toml, not this env's")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    abi = "cp" + args.python_version.replace(".", "")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "stub").mkdir()
        (tmp / "built").mkdir()
        base = importlib.metadata.version("torch").split("+")[0]
        stub = stub_torch(tmp / "stub", f"{base}+wheelhouse.stub")
        constraints = tmp / "constraints.txt"
        constraints.write_text(pins(stub) if not args.no_pin else f"torch=={stub}\n")
        own = build_own_wheel(out)
        print(f"built {own.name}", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--python-version", args.python_version,
               "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none", *platforms(args.platform),
               "-d", str(out), "--find-links", str(out), "--find-links", str(tmp / "stub"),
               "--find-links", str(tmp / "built"), "-c", str(constraints), f"scaletrain=={own.name.split('-')[1]}"]
        built: set[str] = set()
        while True:
            proc = run(cmd)
            if proc.returncode == 0:
                break
            todo = [r for r in sdist_only(proc.stdout + proc.stderr) if r not in built]
            if not todo:
                sys.exit(f"error: pip download failed:\n{proc.stderr[-4000:]}")
            for requirement in todo:
                built.add(requirement)
                wheel = build_pure(requirement, tmp / "built", constraints)
                print(f"built {wheel.name} from its sdist (no wheel on the index)", flush=True)
        for wheel in (tmp / "built").glob("*.whl"):
            shutil.copy2(wheel, out)
    for wheel in out.glob("*.whl"):
        if NOT_SHIPPED.match(wheel.name):
            wheel.unlink()
    report(out)
    return 0


def report(out: Path) -> None:
    sizes = sorted(((w.stat().st_size, w.name) for w in out.glob("*.whl")), reverse=True)
    total = sum(s for s, _ in sizes)
    wandb = sum(s for s, n in sizes if n.startswith("wandb-"))
    for size, name in sizes[:12]:
        print(f"{size / 2**20:8.1f} MB  {name}")
    print(f"{len(sizes)} wheels in {out}: {total / 2**20:.1f} MB ({(total - wandb) / 2**20:.1f} MB without wandb)")


if __name__ == "__main__":
    sys.exit(main())
