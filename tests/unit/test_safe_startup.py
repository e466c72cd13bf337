"""Issue 21's start-up checks, in process: adapter targets against the model, a run.dir that
belongs to one run (retention per run, no fresh start over old checkpoints), seq_len against an
hf_local model's positions, the data path's start-up errors against a real HTTP server, a shard
changed since its manifest, the data-loss exception through a DataLoader worker's re-raise,
hostfile and override parse errors."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from data_pipeline.overrides import override_problem
from data_pipeline.read.config import WebDatasetConfig
from data_pipeline.read.loader import WebDatasetLoader
from data_pipeline.schema import ConfigError
from data_pipeline.shards.manifest import ManifestError
from data_pipeline.storage.backends import DataSourceLost, FetchError
from launch.config import LaunchConfig, check_launch
from tests.helpers import compose_train
from tests.support.data import make_shards
from tests.support.http_server import ShardServer
from train.adapters.config import AdapterConfig
from train.adapters.targets import check_targets
from train.checkpoint import _retain
from train.config import load_config
from train.data_loss import StepFetcher, agree_on_loss, last_line


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


def test_adapter_entries_that_match_no_module_are_named_with_the_linear_modules():
    with torch.device("meta"):  # names and types only: a meta-device model is checked the same way
        meta = tiny_llama()
    cfg = AdapterConfig(kind="lora", target_modules=["q_proj", "nonexistent_proj"], modules_to_save=["lm_head", "head"])
    for model in (meta, tiny_llama()):
        with pytest.raises(ConfigError) as err:
            check_targets(model, cfg)
        text = str(err.value)
        assert "adapter.target_modules: ['nonexistent_proj'] match no module" in text
        assert "adapter.modules_to_save: ['head'] match no module" in text
        assert "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in text
    check_targets(meta, AdapterConfig(kind="lora", modules_to_save=["lm_head"]))  # the defaults all match
    check_targets(meta, AdapterConfig(kind="lora", target_modules=["self_attn.q_proj"]))  # a dotted suffix
    # the twin: peft itself trains q_proj only and says nothing about the other name
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj", "nonexistent_proj"]))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj"}


def _ckpt(root, step: int, run_id: str | None) -> None:
    d = root / f"step_{step:08d}"
    d.mkdir(parents=True)
    state = {"step": step, "files": {}, "finite": True, **({"run_id": run_id} if run_id is not None else {})}
    (d / "trainer_state.json").write_text(json.dumps(state))


def test_retention_deletes_only_checkpoints_of_the_run_that_writes(tmp_path):
    for step, run in ((10, "old"), (20, "old"), (2, "new"), (4, "new"), (6, "new")):
        _ckpt(tmp_path, step, run)
    _retain(tmp_path, keep_last=1, run_id="new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000006", "step_00000010", "step_00000020"]
    _ckpt(tmp_path, 8, "")  # written before run ids: a run resumed from it carries run_id ""
    _retain(tmp_path, keep_last=1, run_id="")
    assert (tmp_path / "step_00000008").is_dir() and (tmp_path / "step_00000020").is_dir()


def test_a_fresh_start_over_old_checkpoints_is_refused(tmp_path):
    _ckpt(tmp_path / "checkpoints", 4, "a")
    with pytest.raises(ConfigError) as err:
        load_config(compose_train([f"run.dir={tmp_path}", "checkpoint.resume=false"]))
    assert "checkpoint.resume=false" in str(err.value) and "newest step_00000004" in str(err.value)
    assert "new run.dir" in str(err.value)
    load_config(compose_train([f"run.dir={tmp_path / 'new'}", "checkpoint.resume=false"]))


def test_seq_len_beyond_the_models_positions(tmp_path, caplog):
    from tests.helpers import save_tiny_llama

    base = save_tiny_llama(tmp_path / "base")
    config = json.loads((base / "config.json").read_text())
    args = ["model=hf_local", f"model.path={base}", f"run.dir={tmp_path / 'run'}"]
    limit = config["max_position_embeddings"]
    load_config(compose_train([*args, f"trainer.seq_len={limit}"]))
    with pytest.raises(ConfigError) as err:
        load_config(compose_train([*args, f"trainer.seq_len={limit + 1}"]))
    assert f"trainer.seq_len={limit + 1} exceeds max_position_embeddings={limit}" in str(err.value)
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (base / "config.json").write_text(json.dumps(config))
    load_config(compose_train([*args, f"trainer.seq_len={limit + 1}"]))
    assert "rope_scaling" in caplog.text and str(limit) in caplog.text


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A corpus without a validation split, served over HTTP; tests may change its files."""
    shards = make_shards(tmp_path_factory.mktemp("served"), sizes=(4,) * 6, val_sizes=(), min_len=5, max_len=15,
                         vocab_size=256, content="random")
    with ShardServer(shards.root) as server:
        yield shards, server.url + "/"


def _loader(url: str, split: str = "train", **kw) -> WebDatasetLoader:
    cfg = WebDatasetConfig(urls=url, retries=0, num_workers=0, shuffle=False, **kw)
    return WebDatasetLoader(cfg, rank=0, world_size=1, micro_batch_size=2, seq_len=16, split=split)


def test_data_start_up_problems_are_config_errors(served, tmp_path):
    shards, url = served
    with pytest.raises(ConfigError, match=r"data.cache_limit='1KB' \(1,000 bytes\) is smaller than the prefetch"):
        _loader(url, cache_limit="1KB", cache_dir=str(tmp_path / "c"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="data.cache_dir=.*file/cache' is not a writable directory"):
        _loader(url, cache_dir=str(tmp_path / "file" / "cache"))
    with pytest.raises(ConfigError, match="lists no val shards: set data.val_urls"):
        _loader(url, "val", cache_dir=str(tmp_path / "c"))
    binary = tmp_path / "binary"
    shutil.copytree(shards.root, binary)
    (binary / "manifest.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(range(256)))
    with ShardServer(binary) as other:
        with pytest.raises(ManifestError, match=r"manifest http://.*/manifest.json is not UTF-8 text"):
            _loader(other.url + "/", cache_dir=str(tmp_path / "c"))


def test_a_shard_changed_after_its_manifest_stops_naming_both_digests(served, tmp_path):
    shards, _ = served
    changed = tmp_path / "changed"
    shutil.copytree(shards.root, changed)
    victim = changed / "train" / "shard-000000.tar"
    data = bytearray(victim.read_bytes())
    data[600] ^= 0xFF  # same size, other bytes
    victim.write_bytes(bytes(data))
    want = json.loads((changed / "manifest.json").read_text())["splits"]["train"]["shards"][0]["sha256"]
    import hashlib

    got = hashlib.sha256(bytes(data)).hexdigest()
    with ShardServer(changed) as server:
        loader = _loader(server.url + "/", cache_dir=str(tmp_path / "c"))
        before = loader.state_dict()
        data = StepFetcher(iter(loader), loader, 2, torch.device("cpu")).fetch()
        micro, reason = data.micro_batches, agree_on_loss(data, loader)
    assert micro == [] and data.lost_everywhere and "\n" not in reason
    assert f"shard {server.url}/train/shard-000000.tar has sha256 {got} but the manifest says {want}" in reason
    assert loader.state_dict() == before  # the checkpoint of the last step resumes at this step


def test_data_source_lost_survives_a_dataloader_workers_reraise():
    lost = DataSourceLost.from_fetch(FetchError("http://h:1/c/train/s-1.tar", None, "Connection refused", 2))
    assert (lost.url, lost.error) == ("http://h:1/c/train/s-1.tar", "no HTTP status (Connection refused) after 2 tries")
    # torch's ExceptionWrapper.reraise: type(e)("Caught ... in DataLoader worker process 0.\nOriginal Traceback ...")
    wrapped = DataSourceLost("Caught DataSourceLost in DataLoader worker process 0.\nOriginal Traceback (most "
                             "recent call last):\n  File \"x.py\", line 1, in f\n"
                             f"data_pipeline.storage.backends.DataSourceLost: {lost}\n")
    assert (wrapped.url, wrapped.error) == (lost.url, lost.error) and str(wrapped) == str(lost)
    assert last_line(ValueError("Caught ValueError ...\nOriginal Traceback ...\nValueError: shard x: bad")) == \
        "shard x: bad"


def test_a_hostfile_is_never_ignored(tmp_path):
    missing = LaunchConfig(hostfile=str(tmp_path / "nope"))
    for target in ("local", "deepspeed", "slurm"):
        assert any("does not exist" in p for p in check_launch(target, missing, str(tmp_path)))
    (tmp_path / "hosts").write_text("node1 slots=8\n")
    problems = check_launch("deepspeed", LaunchConfig(hostfile=str(tmp_path / "hosts")), str(tmp_path))
    assert any("read only by target=deepspeed with launch.nnodes > 1" in p for p in problems)


def test_an_unparsable_override_is_named_with_the_quoted_form():
    problem = override_problem(["trainer.max_steps=3", "--multirun", "run.name=héllo"])
    assert problem.startswith("cannot parse the override 'run.name=héllo'")
    assert "run.name='héllo'" in problem and "\"run.name='héllo'\"" in problem
    assert override_problem(["run.name='héllo'", "a.b=[1,2]", "x=y z".replace(" ", "")]) is None
