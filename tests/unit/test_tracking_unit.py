"""W&B-free tracking helpers: redaction, FLOPs/MFU, loss alerts, straggler judgement, progress."""
from __future__ import annotations

import io
import logging
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from data_pipeline.schema import ConfigError, load
from train.tracking import NullTracker, TrackingConfig, build_tracker
from train.tracking.alerts import LossMonitor
from train.tracking.flops import (
    device_peak_flops,
    flops_per_token,
    flops_per_token_from_model,
    mfu,
    peak_flops,
)
from train.tracking.progress import Progress
from train.tracking.redact import REDACTED, is_secret_key, redact, redact_argv
from train.tracking.straggler import StragglerMonitor
from train.tracking.wandb_tracker import resolve_mode

ENV = {"HF_TOKEN": "hf_abcdefgh123", "MY_SERVICE_PASSWORD_FILE": "pw-0987654", "WANDB_API_KEY": "k" * 40,
       "SHORT_TOKEN": "1", "HOME": "/root", "PATH": "/usr/bin"}


@pytest.mark.parametrize("name,secret", [
    ("hf_token", True), ("WANDB_API_KEY", True), ("apiKey", True), ("db-password", True), ("secret", True),
    ("aws_secret_access_key", True), ("credentials", True),
    ("num_key_value_heads", False), ("max_tokens", False), ("tokenizer", False), ("bos_token", False),
    ("pad_token", False), ("vocab_size", False), ("keep_last", False), (3, False)])
def test_secret_key_names(name, secret):
    assert is_secret_key(name) is secret


def test_redact_hides_secret_keys_and_environment_values_only():
    cfg = {"model": {"num_key_value_heads": 2, "bos_token": "<s>"},
           "trainer": {"max_tokens": 1000},
           "tracking": {"settings": {"api_key": "typed-on-cli"}, "notes": "hf_abcdefgh123",
                        "tags": ["a", "url=https://u:hf_abcdefgh123@host/x"], "hf_token": None},
           "data": {"urls": "/data/{000..009}.tar", "db": [{"password": 12345}]},
           "x": "pw-0987654", "flag": "1"}
    out = redact(cfg, environ=ENV)
    assert out["model"] == cfg["model"] and out["trainer"] == cfg["trainer"]
    assert out["tracking"]["settings"]["api_key"] == REDACTED
    assert out["tracking"]["notes"] == REDACTED
    assert out["tracking"]["tags"] == ["a", f"url=https://u:{REDACTED}@host/x"]
    assert out["tracking"]["hf_token"] is None  # unset stays visible as unset
    assert out["data"] == {"urls": "/data/{000..009}.tar", "db": [{"password": REDACTED}]}
    assert out["x"] == REDACTED
    assert out["flag"] == "1"  # short env values ("1") never redact innocent values
    assert cfg["tracking"]["settings"]["api_key"] == "typed-on-cli"  # input untouched
    assert redact(out, environ=ENV) == out


def test_redact_argv():
    argv = ["trainer.max_steps=3", "+tracking.settings.api_key=abc", "--hf-token", "tok", "--key=v",
            "tracking.notes=hf_abcdefgh123", "--verbose"]
    assert redact_argv(argv, environ=ENV) == [
        "trainer.max_steps=3", f"+tracking.settings.api_key={REDACTED}", "--hf-token", REDACTED,
        f"--key={REDACTED}", f"tracking.notes={REDACTED}", "--verbose"]


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_matches_live_parameter_count(tied):
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=172, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    embed = 300 * 64
    n = total - embed + (embed if tied else 0)  # lm_head matmul counted even when tied
    expected = 6 * n + 12 * 3 * 4 * 16 * 128
    assert flops_per_token(cfg.to_dict(), 128) == expected
    assert flops_per_token(cfg, 128) == expected
    assert flops_per_token_from_model(model, cfg, 128) == expected


def test_flops_config_without_sizes_names_the_keys():
    with pytest.raises(ValueError, match="hidden_size.*vocab_size"):
        flops_per_token({"num_hidden_layers": 2, "num_attention_heads": 2}, 16)


def test_peak_flops_table_override_and_mfu():
    assert device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert device_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert device_peak_flops("NVIDIA H100 NVL") == 835e12
    assert device_peak_flops("NVIDIA H200") == 989e12
    assert device_peak_flops("NVIDIA H20") == 148e12
    assert device_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert device_peak_flops("NVIDIA A10G") == 125e12
    assert device_peak_flops("NVIDIA L40S") == 362e12
    assert device_peak_flops("NVIDIA L4") == 121e12
    assert device_peak_flops("NVIDIA GeForce RTX 4090") == 165e12
    assert device_peak_flops("Some New Accelerator") is None
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), 2e12) == 2e12
    assert mfu(1000.0, 6e9, 12e12) == pytest.approx(0.5)
    assert mfu(1000.0, 6e9, None) is None


def test_loss_monitor_nan_and_spike():
    m = LossMonitor(spike_factor=2.0, window=20, quiet_steps=100)
    alerts = [m.check(s, 5.0 - 0.1 * s) for s in range(1, 12)]
    assert alerts == [None] * 11  # a falling loss never alerts
    nan = m.check(12, float("nan"))
    assert nan.kind == "nonfinite" and "step 12" in nan.title
    assert m.check(13, None) is None  # metrics.jsonl's null loss is NaN too, but quiet now
    spike = m.check(14, 12.0)
    assert spike.kind == "spike" and "step 14" in spike.title
    assert m.check(15, 4.0) is None
    assert m.metrics() == {"alerts/loss_nonfinite": 2, "alerts/loss_spike": 1}
    assert m.check(200, float("inf")).kind == "nonfinite"  # reported again after quiet_steps


def test_straggler_judge_names_the_rank():
    mon = StragglerMonitor(every=10, margin=0.2)
    assert mon.judge(10, [[1.0, 0.01], [1.0, 0.02], [1.01, 0.01], [0.99, 0.01]]) is None
    msg = mon.judge(20, [[1.0, 0.01], [1.0, 0.45], [1.0, 0.01], [1.0, 0.02]])
    assert "rank 1" in msg and "data" in msg and "step 20" in msg
    assert mon.last["straggler/most_waiting_rank"] == 1.0
    msg = mon.judge(30, [[1.0, 0.0], [1.0, 0.0], [1.6, 0.0], [1.0, 0.0]])
    assert "rank 2" in msg and "60%" in msg
    assert mon.last["straggler/step_time_max_s"] == 1.6


def test_straggler_is_a_noop_without_a_process_group():
    mon = StragglerMonitor(every=1, margin=0.1)
    assert [mon.update(s, 1.0 + s, 0.5) for s in range(1, 5)] == [None] * 4


def test_progress_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    p = Progress(total_steps=10, initial_step=4, enabled=True, stream=out, every_s=0.0)
    for step in range(5, 11):
        p.update(step, {"loss": 2.5 - step / 10, "tokens_per_s": 12345.0})
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 6 and "\r" not in out.getvalue()
    assert lines[0].startswith("train step 5/10 (50.0%)") and "loss 2.0000" in lines[0]
    assert "12.3k tok/s" in lines[0] and "ETA" in lines[0]
    assert lines[-1].startswith("train step 10/10 (100.0%)") and "ETA 0:00:00" in lines[-1]
    quiet = io.StringIO()
    q = Progress(total_steps=10, initial_step=0, enabled=False, stream=quiet)
    with q.redirect_logging():
        q.update(5, {"loss": 1.0})
    q.close()
    assert quiet.getvalue() == ""


def test_progress_bar_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = Progress(total_steps=4, initial_step=0, enabled=True, stream=out)
    for step in range(1, 5):
        p.update(step, {"loss": 1.5, "tokens_per_s": 2_000_000.0})
    p.close()
    text = out.getvalue()
    assert "\r" in text and "4/4" in text and "loss=1.5000" in text and "2.0M tok/s" in text


def test_config_validate_names_keys():
    raw = dict(kind="wandb", mode="sometimes", console="loud", run_id="has space", peak_flops=-1.0,
               loss_spike_factor=1.0, straggler_every=-1, straggler_margin=0.0,
               settings={"not_a_setting": 1, "base_url": "http://x"})
    with pytest.raises(ConfigError) as err:
        load(TrackingConfig, raw, prefix="tracking")
    text = "\n".join(err.value.problems)
    for key in ("tracking.mode", "tracking.console", "tracking.run_id", "tracking.peak_flops",
                "tracking.loss_spike_factor", "tracking.straggler_every", "tracking.straggler_margin",
                "tracking.settings.not_a_setting"):
        assert key in text
    assert "base_url" not in text
    assert TrackingConfig(kind="wandb").validate() == []


def test_resolve_mode():
    assert resolve_mode("auto", {}) == "offline"
    assert resolve_mode("auto", {"WANDB_API_KEY": "x" * 40}) == "online"
    assert resolve_mode("auto", {"WANDB_API_KEY": "x" * 40, "WANDB_MODE": "offline"}) == "offline"
    assert resolve_mode("auto", {"WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_mode("offline", {"WANDB_API_KEY": "x" * 40}) == "offline"
    assert resolve_mode("online", {}) == "online"


def test_tracking_none_still_warns_and_reports_memory(tmp_path, caplog):
    tracker = build_tracker(TrackingConfig(kind="none"), run_dir=tmp_path, rank=0, world_size=1,
                            config={}, resume=False)
    with caplog.at_level(logging.WARNING, logger="scaletrain.tracking"):
        extra = tracker.log({"loss": math.nan}, 3)
    assert "loss is nan at step 3" in caplog.text
    assert extra["alerts/loss_nonfinite"] == 1 and extra["sys/host_rss_gb"] > 0
    assert tracker.log({"eval_loss": 1.0}, 3) == {}
    tracker.finish()
    other = build_tracker(TrackingConfig(kind="none"), run_dir=tmp_path, rank=1, world_size=2,
                          config={}, resume=False)
    assert isinstance(other, NullTracker) and other.log({"loss": math.nan}, 3) == {}
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_memory_figures_and_peak_table_are_plausible():
    from train.tracking.system import memory_metrics

    dev = torch.device("cuda", torch.cuda.current_device())
    block = torch.empty(512 * 2**20, dtype=torch.uint8, device=dev)
    mem = memory_metrics(dev)
    assert mem["sys/gpu_mem_allocated_gb"] >= 0.5 and mem["sys/gpu_mem_used_gb"] >= 0.5
    assert mem["sys/gpu_mem_total_gb"] > mem["sys/gpu_mem_used_gb"]
    del block
    peak = peak_flops(dev)
    if peak is None:
        pytest.skip(f"{torch.cuda.get_device_name(dev)} is not in the peak table")
    # A large bf16 matmul reaches a good share of the dense peak, never more: the table holds
    # dense (not sparsity-doubled) figures.
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ a
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ a
    end.record()
    torch.cuda.synchronize()
    achieved = 20 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3)
    assert 0.3 < achieved / peak < 1.05, (torch.cuda.get_device_name(dev), achieved, peak)
