"""FSDP2 on CPU ranks, one unit at a time (train/strategies/parallelize.py), on 2 gloo ranks.

Rank 0 prints one `CASE <name> <json>` line per case; tests/integration/test_fsdp_cpu_units.py
reads them:
- `one_weight`: a frozen Linear (one parameter) is all-gathered into the parameter's own storage
  (FSDP2's all-gather buffer is the weight), with the same products and input gradients, twice
  (the second all-gather rewrites the storage autograd saved in the first forward);
- `two_params`: a Linear with a bias (the twin) gets an all-gather buffer of its own;
- `recompute` / `recompute_hookless`: three frozen projections inside an activation-checkpointed
  block: how many are gathered at once during backward, with `_reshard_after_recompute` and
  without it (FSDP2 keeps a recomputed unit gathered until its own backward). With it: two, the
  last projection (gathered by its pre-backward hook, whose saved tensors start the recompute)
  and the one recomputing; without it all three.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.checkpoint import checkpoint

from train.strategies.parallelize import InPlaceAllGather, _reshard_after_recompute, gather_one_unit_at_a_time


class Recording(InPlaceAllGather):
    """Records the storage of each all-gather buffer it hands FSDP2."""

    IN_PLACE_FROM = 0  # broadcasts even for these small units

    def __init__(self, module, events: list) -> None:
        super().__init__(module)
        self.events = events

    def allocate(self, size, *, dtype, device):
        out = super().allocate(size, dtype=dtype, device=device)
        self.events.append(("buffer", storage(out)))
        return out


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def unit(module: nn.Module, mesh) -> tuple[list, nn.Module]:
    """`module` its own unit inside a root (the root's unit is never resharded after forward);
    the events: each all-gather buffer, and the weight each forward computes with."""
    fully_shard(module, mesh=mesh)
    events: list = []
    module.set_custom_all_gather(Recording(module, events))
    module.register_forward_pre_hook(lambda m, a: events.append(("weight", storage(m.weight))))
    return events, fully_shard(nn.Sequential(module), mesh=mesh)


def computes_in_buffer(events: list) -> bool:
    """Whether every forward computed with the weight in the storage of the last all-gather buffer."""
    pairs = [(events[i - 1], e) for i, e in enumerate(events) if e[0] == "weight"]
    return bool(pairs) and all(b[0] == "buffer" and b[1] == w[1] for b, w in pairs)


def one_weight(mesh) -> dict:
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=False).requires_grad_(False)
    ref = lin.weight.detach().clone()
    events, root = unit(lin, mesh)
    x = torch.randn(5, 64, requires_grad=True)
    equal = []
    for _ in range(2):  # backward gathers the weight again, into the storage autograd saved
        y = root(x)
        equal.append(torch.equal(y, x @ ref.T))
        y.square().sum().backward()
    grad_ok = torch.allclose(x.grad, 2 * (2 * (x @ ref.T)) @ ref)
    return {"equal": all(equal) and grad_ok, "gathers": sum(e[0] == "buffer" for e in events),
            "in_place": computes_in_buffer(events)}


def two_params(mesh) -> dict:
    torch.manual_seed(0)
    lin = nn.Linear(64, 96)
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    events, root = unit(lin, mesh)
    x = torch.randn(5, 64)
    return {"equal": torch.equal(root(x), x @ ref_w.T + ref_b), "gathers": sum(e[0] == "buffer" for e in events),
            "in_place": computes_in_buffer(events)}


class Block(nn.Module):
    """Three frozen projections and a trainable scale, the block recomputed in backward."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.mid, self.down = (nn.Linear(64, 128, bias=False), nn.Linear(128, 128, bias=False),
                                        nn.Linear(128, 64, bias=False))
        self.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(64))

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.up(x * self.scale)))))


def recompute(mesh, hook: bool) -> dict:
    torch.manual_seed(0)
    block = Block()
    projections = [block.up, block.mid, block.down]
    for proj in projections:
        fully_shard(proj, mesh=mesh)
        if hook:
            proj.register_forward_hook(_reshard_after_recompute)
    fully_shard(block, mesh=mesh)
    gather_one_unit_at_a_time(block)  # as apply_fsdp on CPU ranks: no backward prefetch
    most = [0]

    def count():
        gathered = sum(p._get_fsdp_state()._fsdp_param_groups[0].is_unsharded for p in projections)
        most[0] = max(most[0], gathered)
    for proj in projections:
        proj.register_forward_pre_hook(lambda m, a: count())
        proj.register_full_backward_pre_hook(lambda m, g: count())
    x = torch.randn(5, 64)
    loss = checkpoint(block, x, use_reentrant=False).square().sum()
    loss.backward()
    return {"most_gathered_in_backward": most[0], "grad": float(block.scale.grad.full_tensor().abs().sum())}


def main() -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cases = {"one_weight": one_weight(mesh), "two_params": two_params(mesh),
             "recompute": recompute(mesh, hook=True), "recompute_hookless": recompute(mesh, hook=False)}
    if dist.get_rank() == 0:
        for name, result in cases.items():
            print("CASE", name, json.dumps(result), flush=True)
    dist.barrier()
    os._exit(0)  # as the trainer ends (train/__main__.py): gloo's threads can abort a normal teardown


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
