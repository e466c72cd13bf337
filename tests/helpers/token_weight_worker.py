"""Run one fixed global batch through the trainer's step (train/step.py) in a given layout and
save the loss and gradients: `python -m tests.helpers.token_weight_worker BASE OUT STRATEGY:MICRO:ACCUM ...`
(under torchrun for 2 ranks). The rows carry very unequal numbers of trained tokens."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

ROWS, SEQ, VOCAB = 4, 32, 256
TRAINED = (1, 31, 3, 16)  # trained positions per row: the rest is label -100


def global_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    ids = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=gen)
    labels = ids[:, 1:].clone()
    for row, n in enumerate(TRAINED):
        labels[row, : SEQ - n] = -100  # trained tokens at the end of the row, like an assistant reply
    return {"input_ids": ids[:, :SEQ], "labels": labels,
            "position_ids": torch.arange(SEQ).expand(ROWS, SEQ).contiguous()}


def run(base: str, strategy: str, micro: int, accum: int) -> dict:
    from train import dist as d
    from train.config import Config, ModelConfig, TrainerConfig
    from train.model import build_model
    from train.step import forward_backward, global_loss, optimizer_step
    from train.strategies import build_strategy
    from train.strategies.config import DDPConfig, DeepSpeedConfig

    info = d.init_distributed("cpu", need_group=True)
    engine = DDPConfig() if strategy == "ddp" else DeepSpeedConfig(name="zero2", zero_stage=2)
    cfg = Config(model=ModelConfig(kind="hf_local", path=base), strategy=engine,
                 trainer=TrainerConfig(micro_batch_size=micro, grad_accum_steps=accum, seq_len=SEQ, grad_clip=0.0,
                                       max_steps=10))
    strat = build_strategy(build_model(cfg.model, VOCAB, 0), cfg, info, accum)
    batch = global_batch()
    rows = list(range(info.rank * micro * accum, (info.rank + 1) * micro * accum))
    micro_batches = [{k: v[rows[i * micro:(i + 1) * micro]] for k, v in batch.items()} for i in range(accum)]
    loss_sum, num_tokens = forward_backward(strat, micro_batches, info.device)
    out = {"loss": global_loss(loss_sum, num_tokens, info.device), "num_tokens": num_tokens}
    if strategy == "ddp":
        module = getattr(strat.model, "module", strat.model)
        out["grads"] = {n: p.grad.clone() for n, p in module.named_parameters()}
    out["grad_norm"] = optimizer_step(strat)
    return out


def main(argv: list[str]) -> None:
    base, out = argv[0], Path(argv[1])
    results = {}
    for layout in argv[2:]:
        strategy, micro, accum = layout.split(":")
        results[layout] = run(base, strategy, int(micro), int(accum))
    import torch.distributed as dist

    if dist.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(sys.argv[1:])
