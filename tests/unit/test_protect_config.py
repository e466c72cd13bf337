"""Start-up checks added for issue 12: evaluation needs a validation split; lock and timeout settings."""
from __future__ import annotations

import pytest

from tests.integration.test_config import compose_train
from tests.support.data import make_shards
from train.config import ConfigError, load_config


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    return {"with val": make_shards(tmp_path_factory.mktemp("val")),
            "without val": make_shards(tmp_path_factory.mktemp("noval"), val_sizes=())}


def _urls(shards, form: str) -> str:
    return {"dir": str(shards.root), "pattern": f"'{shards.urls}'", "manifest": str(shards.root / "manifest.json")}[form]


@pytest.mark.parametrize("form", ["dir", "pattern", "manifest"])
def test_eval_without_a_validation_split_is_a_start_up_error_naming_val_urls(shard_sets, form):
    args = ["data=webdataset", f"data.urls={_urls(shard_sets['without val'], form)}", "trainer.eval_every=5"]
    with pytest.raises(ConfigError) as err:
        load_config(compose_train(args))
    assert "trainer.eval_every>0" in str(err.value) and "data.val_urls" in str(err.value)
    load_config(compose_train([*args[:2], "trainer.eval_every=0"]))  # no evaluation: no problem
    load_config(compose_train([*args, f"data.val_urls={shard_sets['with val'].val_paths[0]}"]))


@pytest.mark.parametrize("form", ["dir", "pattern", "manifest"])
def test_eval_with_the_manifests_validation_split_validates(shard_sets, form):
    load_config(compose_train(["data=webdataset", f"data.urls={_urls(shard_sets['with val'], form)}",
                               "trainer.eval_every=5"]))


def test_eval_on_synthetic_data_needs_nothing():
    load_config(compose_train(["trainer.eval_every=5"]))


def test_lock_and_timeout_settings_are_checked():
    with pytest.raises(ConfigError) as err:
        load_config(compose_train(["run.lock_stale_s=0", "dist.timeout_s=-1"]))
    assert "run.lock_stale_s=0" in str(err.value) and "dist.timeout_s=-1" in str(err.value)
    cfg = load_config(compose_train([]))
    assert cfg.run.lock_stale_s == 300 and cfg.dist.timeout_s == 1800
