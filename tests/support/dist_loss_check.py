"""Chunked vs plain loss through real wrappers (DDP, FSDP2, ZeRO-3) on 2 gloo ranks.

For each strategy: build the tiny model and the strategy as the trainer does, take one step
with each loss kind from the same seed, then score a second batch. Equal losses before and
after the step mean equal gradients reached the optimizer through the wrapper. Rank 0 prints
`MATCH <strategy>` when they agree and the chunked run's head never produced full logits.
Run by tests/integration/test_loss.py.
"""
from __future__ import annotations

import sys

import torch
from dist_state_bytes import (
    build_loader,
    build_model,
    build_strategy,
    compose_config,
    d,
)

import train.loss as L
from train.loss import lm_loss, output_head
from train.step import forward_backward as step_backward
from train.step import global_loss, optimizer_step

CASES = {"ddp": [], "fsdp": ["model.tie_word_embeddings=true"], "zero3": []}


def run(name: str, kind: str, info) -> tuple[list[float], set[tuple[int, ...]]]:
    cfg = compose_config([f"strategy={name}", "model=tiny", "trainer.seq_len=32", f"trainer.loss={kind}",
                          "run.dir=/tmp/unused", *CASES[name]])
    model = build_model(cfg.model, cfg.data.vocab_size, cfg.trainer.seed)
    seen: set[tuple[int, ...]] = set()
    output_head(model).register_forward_hook(lambda m, i, out: seen.add(tuple(out.shape[:-1])))
    strategy = build_strategy(model, cfg, info, accum=1)
    batches = iter(build_loader(cfg.data, rank=info.rank, world_size=info.world_size, micro_batch_size=2,
                                seq_len=32))
    loss_sum, num_tokens = step_backward(strategy, [next(batches)], info.device)
    first = global_loss(loss_sum, num_tokens, info.device)
    optimizer_step(strategy)
    with torch.no_grad():
        second = lm_loss(strategy.model, next(batches), kind).item()
    return [first, second], seen


def main() -> None:
    L.SMALL_LOGITS = 0  # these micro-batches are small: compare the chunk loop, not plain's one piece
    info = d.init_distributed("cpu", need_group=True)
    for name in sys.argv[1:] or CASES:
        plain, plain_seen = run(name, "plain", info)
        chunked, chunked_seen = run(name, "chunked", info)
        ok = (torch.allclose(torch.tensor(plain), torch.tensor(chunked), rtol=1e-5, atol=1e-6)
              and plain_seen == {(2, 32)} and (2, 0) in chunked_seen and (2, 32) not in chunked_seen)
        if info.is_main:
            print(f"{'MATCH' if ok else 'DIFFER'} {name} plain={plain} chunked={chunked} "
                  f"head positions plain={plain_seen} chunked={chunked_seen}", flush=True)
    d.shutdown()


if __name__ == "__main__":
    main()
