"""Start-up cost of big models: peak host memory per rank and time to the first step (issue 17).

    python bench/startup.py [--sizes 100m,350m,1b] [--strategies fsdp,zero3] [--adapters none,lora]
                            [--ranks 2,4] [--variant NAME=OVERRIDES ...] [--smoke]

For each size a Llama is built from a config and saved as bf16 safetensors in several files
(cached under --cache), then trained for one step by the real trainer on 2 CPU ranks (--ranks:
each count in turn, all on this node) (`model=hf_local`, torchrun, gloo) for every strategy x
adapter x variant. A variant is a set of
extra overrides (`--variant old=model.base_dtype=fp32 --variant new=`): the loading path to
compare is one flag. Without --variant the path on this checkout runs once, as `today`; an
older path that no flag reproduces runs from its own checkout with the same --cache (models are
built once): `git worktree add /tmp/old <commit> && cd /tmp/old && python bench/startup.py ...`.

Peak host memory is the largest peak resident set of any process of the run (the kernel's
ru_maxrss of the reaped tree, read by a small parent process so that nothing inherits a big
parent's RSS), minus the same run with `model=tiny` (imports and engines). Time to the first
step is the run's wall time from launch to exit with max_steps=1 and no checkpoint (an upper
bound: it includes shutdown). The planner's per-rank prediction (launch/host.py, CPU) is next to
each row, and the peak before the first step from the run's `startup` record (over the tiny run's).
"over_shard" divides by the rank's share of the bf16 files (files / ranks): the issue's goal is at
most 1.2, flat in the number of ranks per node. Ends with one JSON line, ratios first (keyed
size/strategy/adapter/variant/ranks). --smoke: one tiny case, no baseline, seconds.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
SIZES = {  # vocab, hidden, intermediate, layers, heads, kv heads
    "smoke": (256, 64, 128, 2, 4, 2),
    "100m": (32000, 768, 2048, 12, 12, 4),
    "350m": (32000, 1024, 2816, 24, 16, 4),
    "1b": (32000, 2048, 5632, 18, 16, 4),
}
MEASURE = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
           "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)")
RUN = ["trainer.device=cpu", "trainer.max_steps=1", "trainer.seq_len=32", "trainer.micro_batch_size=1",
       "checkpoint.at_end=false", "export=none", "tracking=none", "tracking.progress=false"]


def save_model(size: str, cache: Path) -> Path:
    """The size's Llama, random weights saved once as bf16 safetensors shards."""
    out = cache / f"llama_{size}"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    v, h, i, n, heads, kv = SIZES[size]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                                         num_attention_heads=heads, num_key_value_heads=kv,
                                         tie_word_embeddings=False)).to(torch.bfloat16)
    model.save_pretrained(out, max_shard_size="200MB")
    return out


def run(overrides: list[str], run_dir: Path, ranks: int = 2) -> dict:
    """One training run on `ranks` ranks: peak RSS (bytes, largest process) and wall seconds."""
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={ranks}", "-m", "train", *overrides, *RUN, f"run.dir={run_dir}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"run failed: {' '.join(overrides)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    rss = int(proc.stdout.rsplit("MAXRSS_KB", 1)[1].split()[0]) * 1024
    startup = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "startup" in r]
    return {"peak_rss": rss, "wall_s": round(wall, 2), "startup": startup[0]["startup"] if startup else None}


def planned(overrides: list[str], ranks: int = 2) -> int:
    """The planner's per-rank host peak over its CPU baseline for this run."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from launch.config import load_launch
    from launch.host import BASELINE
    from launch.plan import plan_request

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        raw = OmegaConf.to_container(compose(config_name="train", overrides=[*overrides, *RUN]), resolve=True)
    raw.update(target="local", dry_run=False, launch={"nproc_per_node": ranks})
    req = load_launch(raw, planning=True)
    return plan_request(req.train, req.launch)["host_bytes_per_node"]["per_rank"]["peak"] - BASELINE["cpu"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="100m,350m,1b")
    ap.add_argument("--strategies", default="fsdp,zero3")
    ap.add_argument("--adapters", default="lora,none")
    ap.add_argument("--ranks", default="2", help="comma-separated numbers of ranks on this node")
    ap.add_argument("--variant", action="append", default=[], help="NAME=space-separated overrides")
    ap.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "scaletrain_bench_startup"))
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    if a.smoke:
        a.sizes, a.strategies, a.adapters = "smoke", "fsdp", "lora"
    variants = dict(v.split("=", 1) for v in a.variant) or {"today": ""}
    cache = Path(a.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows, baselines = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes.split(","):
            path = save_model(size, cache)
            weights = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            for strategy, adapter, (name, extra), ranks in itertools.product(
                    a.strategies.split(","), a.adapters.split(","), variants.items(), map(int, a.ranks.split(","))):
                common = [f"strategy={strategy}", f"adapter={adapter}", *extra.split()]
                key = (strategy, adapter, name, ranks)
                if key not in baselines:
                    baselines[key] = None if a.smoke else run(["model=tiny", *common], Path(tmp) / f"tiny_{len(rows)}",
                                                              ranks)
                base = baselines[key] or {"peak_rss": 0, "startup": None}
                model = ["model=hf_local", f"model.path={path}", *common]
                got = run(model, Path(tmp) / f"run_{len(rows)}", ranks)
                over, shard = got["peak_rss"] - base["peak_rss"], weights / ranks
                plan = planned(model, ranks)
                before = (max(got["startup"]["rank_peak_rss_bytes_before_first_step"])
                          - (max(base["startup"]["rank_peak_rss_bytes_before_first_step"]) if base["startup"] else 0))
                rows.append({"size": size, "strategy": strategy, "adapter": adapter, "variant": name,
                             "ranks": ranks, "weights_bf16_mib": round(weights / 2**20),
                             "peak_over_baseline_mib": round(over / 2**20),
                             "planned_mib": round(plan / 2**20),
                             "over_shard": round(over / shard, 2),
                             "before_step1_over_shard": round(before / shard, 2),
                             "measured_over_planned": round(over / plan, 2),
                             "baseline_mib": round(base["peak_rss"] / 2**20), "wall_s": got["wall_s"],
                             "startup": got["startup"]})
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ratios = {f"{r['size']}/{r['strategy']}/{r['adapter']}/{r['variant']}/{r['ranks']}":
              {"measured_over_planned": r["measured_over_planned"], "over_shard": r["over_shard"],
               "before_step1_over_shard": r["before_step1_over_shard"]} for r in rows}
    print(json.dumps({"ratios": ratios, "rows": rows}))


if __name__ == "__main__":
    main()
