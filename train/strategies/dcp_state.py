"""Model + optimizer state through torch.distributed.checkpoint (used by DDP and FSDP2).

DCP writes one file per rank plus metadata and reshards on load, so a checkpoint written
by N ranks resumes on M. Model and optimizer live in separate DCP directories so that an
export can read the model tensors alone.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)


def save_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    dcp.save(get_model_state_dict(model), checkpoint_id=str(path / "model"))
    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=str(path / "optim"))
    torch.save(scheduler.state_dict(), path / "scheduler.pt")


def load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
             scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    model_sd = get_model_state_dict(model)
    dcp.load(model_sd, checkpoint_id=str(path / "model"))
    set_model_state_dict(model, model_sd)
    optim_sd = get_optimizer_state_dict(model, optimizer)
    dcp.load(optim_sd, checkpoint_id=str(path / "optim"))
    set_optimizer_state_dict(model, optimizer, optim_sd)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
