"""Where the weights of a meta-built model come from, and how a rank materializes only what it keeps.

`train.model.build_meta_model` builds the module tree on the meta device (no weight allocated);
each strategy then fills it from a `Weights` source, one parameter at a time:

- `model=hf_local`: the safetensors files under `model.path`, read through `safe_open(...).get_slice`,
  so a rank reads only the rows of its shard (FSDP2) or one tensor at a time (DDP, ZeRO).
- models built from config: each module is initialized by the model's own `_init_weights` (peft's
  rule for LoRA A/B) on a full CPU tensor seeded from (trainer.seed, the module's name), then sliced.
  The initial weights are therefore the same for every world size and every strategy, which keeps
  the 1-rank vs N-rank parity tests exact; they differ from `LlamaForCausalLM(config)` under one
  global seed (only a seed per module makes a sharded init reproducible whatever the sharding).

No tensor larger than one parameter (the largest module's parameters for init) is ever whole on a
rank that only keeps a shard of it.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

# What wrappers insert in parameter names; the checkpoint key is the name without them.
_WRAPPER_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "base_layer.",
                  "original_module.", "modules_to_save.default.", "_forward_module.")
_ADAPTER_PARTS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def base_name(name: str) -> str:
    """The checkpoint key of a (possibly peft / compile / checkpoint-wrapped) parameter name."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def is_adapter_param(name: str) -> bool:
    return any(part in f".{name}" for part in _ADAPTER_PARTS)


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class Weights:
    """Full or row-sliced fp32/bf16 CPU tensors of a model's parameters, by parameter name.

    Checkpoint tensors come from `path` (safetensors); adapter parameters, and every parameter of a
    model built from config, are initialized deterministically (`seed`, the module's name).
    """

    def __init__(self, model: nn.Module, seed: int, path: str | Path | None = None) -> None:
        self.model, self.seed = model, seed
        self.files: dict[str, Path] = _safetensors_index(Path(path)) if path else {}
        self._cache: tuple[str, dict[str, torch.Tensor]] | None = None
        self.bytes_read = 0

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Parameter `name` (as the live model names it), rows [start, stop) of dim 0 if given."""
        key = base_name(name)
        if key in self.files:
            with safe_open(str(self.files[key]), framework="pt") as f:
                sl = f.get_slice(key)
                tensor = sl[rows[0]:rows[1]] if rows else sl[:]
            self.bytes_read += tensor.numel() * tensor.element_size()
            return tensor
        if self.files and not is_adapter_param(name):
            raise ValueError(f"model.path has no tensor {key!r} for parameter {name}: the checkpoint does "
                             "not match its config.json (re-save it with save_pretrained)")
        full = self._init(name)
        return full[rows[0]:rows[1]] if rows else full

    def _init(self, name: str) -> torch.Tensor:
        owner_name, _, pname = name.rpartition(".")
        if self._cache is None or self._cache[0] != owner_name:
            self._cache = (owner_name, self._init_module(owner_name))
        return self._cache[1][pname]

    def _init_module(self, owner_name: str) -> dict[str, torch.Tensor]:
        """The module's direct parameters, initialized on fresh CPU fp32 tensors of their full shape
        by the rule the model itself uses, under a seed of (seed, module name)."""
        module = self.model.get_submodule(owner_name)
        saved = dict(module._parameters)
        fresh = {k: nn.Parameter(torch.empty(p.shape, dtype=torch.float32), requires_grad=False)
                 for k, p in saved.items() if p is not None}
        digest = hashlib.sha256(f"{self.seed}:{base_name(owner_name + '.x')}".encode()).digest()
        try:
            module._parameters.update(fresh)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int.from_bytes(digest[:8], "little") % 2**63)
                _init_rule(self.model, owner_name)(module)
        finally:
            module._parameters.update(saved)
        return {k: p.data for k, p in fresh.items()}


def _init_rule(model: nn.Module, owner_name: str) -> Callable[[nn.Module], None]:
    """peft's default LoRA init (`init_lora_weights=True`) for adapter matrices, the model's own
    `_init_weights` for everything else."""
    if ".lora_A." in f".{owner_name}.":
        return lambda m: nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
    if ".lora_B." in f".{owner_name}.":
        return lambda m: nn.init.zeros_(m.weight)
    return hf_model(model)._init_weights


def _safetensors_index(path: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index when there is one, else from each file's header."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {k: path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    out: dict[str, Path] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            out.update({k: f for k in h.keys()})
    if not out:
        raise ValueError(f"model.path={path} holds no *.safetensors weights: save the model with "
                         "save_pretrained(..., safe_serialization=True)")
    return out


def resolve_base_dtype(base_dtype: str, path: str | None) -> torch.dtype:
    """model.base_dtype: `auto` is the most common floating dtype of the safetensors files (read
    from their headers), bf16 for a model built from config."""
    if base_dtype != "auto":
        return DTYPES[base_dtype]
    if not path:
        return torch.bfloat16
    counts: dict[torch.dtype, int] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                dtype = h.get_slice(k).get_dtype()
                torch_dtype = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}.get(dtype)
                if torch_dtype is not None:
                    counts[torch_dtype] = counts.get(torch_dtype, 0) + 1
    return max(counts, key=counts.get) if counts else torch.bfloat16


def require_weights(weights: Weights | None) -> Weights:
    assert weights is not None, "a meta-built model needs a Weights source to materialize from"
    return weights


def set_param_dtypes(model: nn.Module, base_dtype: torch.dtype) -> None:
    """On the meta model: trainable parameters fp32 (the optimizer's masters), frozen ones
    (the base under an adapter) in `base_dtype`, so that materializing allocates them so."""
    for p in model.parameters():
        want = torch.float32 if p.requires_grad else base_dtype
        if p.dtype != want:
            p.data = p.data.to(want)


def buffer_owners(model: nn.Module) -> list[nn.Module]:
    """Modules that own buffers and no parameters (rotary embeddings): `init_buffers` recomputes them."""
    return [m for m in model.modules() if next(m.buffers(recurse=False), None) is not None
            and next(m.parameters(recurse=False), None) is None]


def init_buffers(model: nn.Module, owners: list[nn.Module], device: torch.device) -> None:
    """Non-persistent buffers (rotary inv_freq) are not in checkpoints: the model recomputes them."""
    init = hf_model(model)._init_weights
    for m in owners:
        for k, b in m._buffers.items():
            if b is not None:
                m._buffers[k] = torch.empty_like(b, device=device)
        init(m)


def materialize_full(model: nn.Module, weights: Weights, device: torch.device) -> None:
    """Every parameter whole on `device` in its meta dtype, read one at a time (DDP, ZeRO-1/2);
    tied parameters stay tied."""
    owners = buffer_owners(model)
    done: dict[int, nn.Parameter] = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for module in model.modules():
        for k, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            if id(p) not in done:
                data = weights.read(names[id(p)]).to(device=device, dtype=p.dtype)
                done[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
            module._parameters[k] = done[id(p)]
    init_buffers(model, owners, device)


def fill_shards(model: nn.Module, weights: Weights, rank: int, world_size: int) -> None:
    """After `fully_shard` and `to_empty`: copy each rank's rows (FSDP2 shards dim 0 like
    torch.chunk) straight from the source into the local shard."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            n = p.shape[0]
            chunk = math.ceil(n / world_size) if hasattr(p, "to_local") else n
            start = min(rank * chunk, n) if hasattr(p, "to_local") else 0
            stop = min(start + chunk, n)
            assert local.shape[0] == stop - start, (name, tuple(local.shape), start, stop)
            if stop > start:
                local.copy_(weights.read(name, (start, stop)))
