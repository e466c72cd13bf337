"""Values rendered into the sbatch script can never end the #SBATCH block or run as a command.

A control character (a newline above all) is refused at validation, naming the key; any other
character is quoted so that sbatch reads back exactly the value given. `sbatch` cannot run here,
so the directives are read back by a port of slurm's own argument reader (src/sbatch/opt.c,
`_get_argument`: blanks split, quotes group, backslash escapes, an unquoted `#` starts a comment),
and the settings block by bash itself.
"""
from __future__ import annotations

import copy
import subprocess

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from launch.config import load_launch
from launch.slurm import slurm_plan
from tests.helpers import REPO
from train.config import ConfigError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sbatch")
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        raw = OmegaConf.to_container(compose("launch", overrides=["target=slurm", f"run.dir={run_dir}"]),
                                     resolve=True)
    return raw


def _with(raw: dict, **slurm) -> dict:
    raw = copy.deepcopy(raw)
    for key, value in slurm.items():
        section, name = key.split("__") if "__" in key else ("slurm", key)
        target = raw["run"] if section == "run" else raw["launch"]["slurm"]
        target[name] = value
    return raw


def slurm_argument(line: str) -> str:
    """The first argument of an #SBATCH line as sbatch reads it (port of `_get_argument`)."""
    out, quote, escape, i = [], None, False, 0
    text = line[len("#SBATCH"):].lstrip()
    while i < len(text) and (quote or not text[i].isspace()) and text[i] != "\n":
        c = text[i]
        i += 1
        if escape:
            escape = False
        elif c == "\\":
            escape = True
            continue
        elif quote:
            if c == quote:
                quote = None
                continue
        elif c in "\"'":
            quote = c
            continue
        elif c == "#":
            break
        out.append(c)
    return "".join(out)


def directives(script: str) -> list[str]:
    block = script.split("### SBATCH")[1].split("### end SBATCH ###")[0].splitlines()[1:]
    assert all(line.startswith("#SBATCH ") for line in block), block  # the block is only directives
    return block


HOSTILE = {"partition": "gpu\ntouch /tmp/pwned", "account": "proj;rm -rf ~", "qos": "high $(id)",
           "job_name": "run\n#SBATCH --wrap=evil", "time": "01:00:00\necho hi", "mem": "64G\rX",
           "extra": ["--comment=ok", "--constraint=a100\nrm -rf ~"]}


def test_hostile_values_are_refused_at_once_naming_each_key(base):
    with pytest.raises(ConfigError) as err:
        load_launch(_with(base, **HOSTILE))
    text = "\n".join(err.value.problems)
    for key in ("launch.slurm.partition", "launch.slurm.account", "launch.slurm.qos", "launch.slurm.job_name",
                "launch.slurm.time", "launch.slurm.mem", "launch.slurm.extra item='--constraint=a100\\nrm -rf ~'"):
        assert key in text, (key, text)
    assert "--comment=ok" not in text


@pytest.mark.parametrize("key,value", [("run__name", "nightly\nreboot"), ("run__dir", "/shared/runs/a\nb")])
def test_run_name_and_dir_reach_the_directives_too(base, key, value):
    with pytest.raises(ConfigError, match="control character"):
        load_launch(_with(base, **{key: value}))


def test_awkward_legal_values_are_quoted_and_read_back_exactly(base, tmp_path):
    run_dir = tmp_path / "runs #1" / "it's \"quoted\" \\ here"
    job = 'my "big" run #1 \\ end'
    extra = ["--comment=two words # not a comment", "--exclusive"]
    req = load_launch(_with(base, run__dir=str(run_dir), job_name=job, extra=extra, partition="gpu,debug"))
    script = next(iter(slurm_plan(req.launch, req.train, ["trainer.max_steps=5"]).files.values()))
    args = [slurm_argument(line) for line in directives(script)]
    assert f"--job-name={job}" in args and "--partition=gpu,debug" in args
    assert extra[0] in args and "--exclusive" in args
    assert f"--output={run_dir}/logs/slurm-%j.out" in args
    # bash runs the head of the job (directives are comments; the settings only assign variables)
    head = script.split("### end settings ###")[0]
    res = subprocess.run(["bash", "-c", head + '\nprintf "%s\\n" "$RUN_DIR" "${TRAIN_OVERRIDES[@]}"'],
                         capture_output=True, text=True, check=True)
    assert res.stdout.splitlines() == [str(run_dir), "trainer.max_steps=5"]


def test_a_control_character_that_slips_past_validation_is_never_rendered(base):
    req = load_launch(base)
    req.launch.slurm.partition = "gpu\necho owned"
    with pytest.raises(ValueError, match="control character"):
        slurm_plan(req.launch, req.train, [])
