"""The tree's architecture, checked on the source: layers without circles, declared dependencies,
no product module that only tests use, the checkpoint layout's names in one module."""
from __future__ import annotations

import ast
import re
import sys

import pytest

from tests.helpers import REPO
from tests.support.imports import PACKAGES, cycles, graph, modules

# data_pipeline's layers, lowest first: a module may import only from its own layer or below.
LAYERS = {
    "data_pipeline.fsutil": 0, "data_pipeline.schema": 0, "data_pipeline.overrides": 0,
    "data_pipeline.shards": 1, "data_pipeline.storage": 1,
    "data_pipeline.read": 2, "data_pipeline.prepare": 2,
    "data_pipeline": 3,
}
# import name -> distribution name, where they differ
DIST_NAMES = {"yaml": "PyYAML", "hydra": "hydra-core", "liger_kernel": "liger-kernel"}
OPTIONAL = {"liger_kernel", "bitsandbytes", "flash_attn", "submitit"}   # extras, imported lazily


def _layer(mod: str) -> int:
    while mod not in LAYERS:
        mod = mod.rpartition(".")[0]
    return LAYERS[mod]


@pytest.fixture(scope="module")
def g():
    return graph(REPO)


def test_no_import_circle_anywhere(g):
    assert cycles(g) == []


def test_data_pipeline_arrows_only_go_down(g):
    up = [f"{m}:{line} imports {t}" for m, deps in g.items() if m.startswith("data_pipeline.")
          for t, line, _ in deps if t.startswith("data_pipeline") and _layer(t) > _layer(m)]
    assert up == []
    # the two sides of the format never meet: reading does not prepare, preparing does not read
    across = [f"{m} -> {t}" for m, deps in g.items() for t, _, _ in deps
              if (m.startswith("data_pipeline.read") and t.startswith("data_pipeline.prepare"))
              or (m.startswith("data_pipeline.prepare") and t.startswith("data_pipeline.read"))
              or (m.startswith("data_pipeline.storage") and t.startswith("data_pipeline.read"))]
    assert across == []
    assert not [m for m, deps in g.items() if m.startswith("data_pipeline")
                for t, _, _ in deps if t.split(".")[0] in ("train", "launch")]


def test_no_private_name_imported_across_modules():
    bad = []
    for mod, path in modules(REPO).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                bad += [f"{mod} imports {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert bad == []


def test_no_product_module_used_only_by_tests_or_benches(g):
    used = {t for deps in g.values() for t, _, _ in deps}
    entry = {m for m in g if m.endswith("__main__") or m in PACKAGES or m.count(".") == 0}
    # a package is used when one of its modules is, and its __init__ is what `import pkg.mod` runs
    used |= {m.rpartition(".")[0] for m in list(used)}
    # modules named in configs (_target_), the Makefile or docs as user entry points count as used
    # (a `-m` command in slurm/ or the Makefile, a "module:Class" registry string in the product)
    texts = "".join(p.read_text() for p in [*REPO.glob("conf/**/*.yaml"), *REPO.glob("slurm/*"), REPO / "Makefile"])
    registry = "".join(p.read_text() for p in modules(REPO).values())
    named = {m for m in g if f"-m {m}" in texts or f'"{m}:' in registry or f"_target_: {m}" in texts}
    orphans = sorted(set(g) - used - entry - named)
    assert orphans == [], f"imported by no product module: {orphans}"


def test_every_third_party_import_is_declared():
    text = (REPO / "pyproject.toml").read_text()
    declared = {re.split(r"[<>=!\[ ;]", d.strip().strip('"'))[0].lower()
                for d in re.findall(r'"([A-Za-z0-9_.\-]+[^"]*)"', text)}
    stdlib = set(sys.stdlib_module_names)
    missing = set()
    for path in modules(REPO).values():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            for n in names:
                top = n.split(".")[0]
                if top in stdlib or top in PACKAGES or top in OPTIONAL:
                    continue
                dist = DIST_NAMES.get(top, top).lower().replace("_", "-")
                if dist not in declared and top.lower() not in declared:
                    missing.add(f"{top} ({path.relative_to(REPO)})")
    assert not missing, f"declare these in pyproject.toml [project] dependencies: {sorted(missing)}"


LAYOUT_NAMES = {"checkpoints", "trainer_state.json"}  # train/checkpoint_layout.py's distinctive names


def test_the_checkpoint_layout_names_are_spelled_in_one_module():
    """The layout's distinctive names appear as string constants only in checkpoint_layout.py
    (generic ones such as "latest", "model", "step_" or ".tmp-" are left to review: W&B aliases,
    the prepare and remote-cache temp folders use them for other things)."""
    found = []
    for path in sorted(p for pkg in ("train", "launch", "data_pipeline") for p in (REPO / pkg).rglob("*.py")):
        if path.name == "checkpoint_layout.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in LAYOUT_NAMES:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {node.value!r}")
    assert not found, "import the name from train/checkpoint_layout.py instead:\n" + "\n".join(found)
