"""What really runs on a GPU: one step of the tiny model under a strategy, then a JSON report.

    torchrun --nproc_per_node 1 tests/support/gpu_probe.py STRATEGY [training overrides]

Reports the process group's backend, the dtype the decoder blocks compute in, the block module
type (compiled or not), the attention kernel transformers dispatched to (recorded from inside
the attention call), and the loss. Run by tests/system/test_gpu.py where a GPU is lent.
"""
from __future__ import annotations

import json
import sys

import torch.distributed as dist
from dist_state_bytes import (
    build_loader,
    build_model,
    build_strategy,
    compose_config,
    d,
)

from train.model import decoder_layers
from train.step import forward_backward as step_backward
from train.step import optimizer_step


def spy_attention(kernel: str, seen: dict[str, str]) -> None:
    """Record, from inside transformers' attention dispatch, which kernel the layers called."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS[kernel]

    def spy(*args, **kwargs):
        seen["attention_kernel_called"] = kernel
        return original(*args, **kwargs)

    ALL_ATTENTION_FUNCTIONS[kernel] = spy


def main() -> None:
    name, extra = sys.argv[1], sys.argv[2:]
    cfg = compose_config([f"strategy={name}", "model=tiny", "trainer.seq_len=64", "run.dir=/tmp/unused", *extra])
    info = d.init_distributed(cfg.trainer.device, need_group=True)
    model = build_model(cfg.model, cfg.data.vocab_size, cfg.trainer.seed)
    seen: dict[str, str] = {}
    attn = model.model.layers[0].self_attn
    attn.register_forward_hook(lambda m, args, out: seen.update(attn_out_dtype=str(out[0].dtype)))
    spy_attention(model.config._attn_implementation, seen)
    strategy = build_strategy(model, cfg, info, accum=1)
    batch = next(iter(build_loader(cfg.data, rank=info.rank, world_size=info.world_size, micro_batch_size=2,
                                   seq_len=64)))
    batch = {k: v.to(info.device) for k, v in batch.items()}
    loss, _ = step_backward(strategy, [batch], info.device)
    optimizer_step(strategy)
    if info.is_main:
        print(json.dumps({"backend": dist.get_backend(), "device": str(info.device),
                          "block_type": type(decoder_layers(model)[0]).__name__,
                          "attn_implementation": model.config._attn_implementation,
                          "loss": float(loss), **seen}), flush=True)
    d.shutdown()


if __name__ == "__main__":
    main()
