"""LoRA adapters as serving artifacts: the PEFT directory, and the merged weights, without the base in memory.

`write_peft_adapter` writes adapter_config.json + adapter_model.safetensors that
`PeftModel.from_pretrained(base, DIR)` loads offline. The key names and the config are peft's own:
a PeftModel is built on the meta device (no weights allocated) from the base config, and peft's
`get_peft_model_state_dict` maps its parameter names to the saved names, so whatever peft's
version expects is what is written.

`LoraMergedWeights` is a WeightSource (checkpoint_reader.py) that yields base + scaling * B @ A
for each adapted weight, one tensor at a time, with the scaling each peft layer computed itself
(r, lora_alpha, use_rslora, rank_pattern, alpha_pattern): the same sum peft's merge_and_unload()
makes, streamed like every other export.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from train.export.weights import CheckpointError, WeightSource, canonical_name

ADAPTER_NAME = "default"
PREFIX = "base_model.model."
_UNSUPPORTED = ("use_dora", "lora_bias")
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "BOOL": torch.bool}


class AdapterExportError(ValueError):
    """The adapter cannot be written or merged as given; the message names the key or setting."""


def lora_config(config: dict[str, Any], base_name: str | None = None) -> Any:
    """peft.LoraConfig from a plain dict (a task_type of CAUSAL_LM unless given)."""
    from peft import LoraConfig

    fields = {k: v for k, v in config.items() if k not in ("peft_type", "auto_mapping", "revision")}
    fields.setdefault("task_type", "CAUSAL_LM")
    if base_name is not None:
        fields["base_model_name_or_path"] = base_name
    try:
        cfg = LoraConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise AdapterExportError(f"invalid LoRA config {config}: {exc}") from exc
    bad = [k for k in _UNSUPPORTED if getattr(cfg, k, False)]
    if bad:
        raise AdapterExportError(f"LoRA config sets {bad}: only plain LoRA is exported here")
    return cfg


def meta_peft_model(base: Any, config: dict[str, Any]) -> Any:
    """A PeftModel over `base` (a model directory, a transformers config or model), all on meta."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(base, (str, Path)):
        model_config = AutoConfig.from_pretrained(str(base), local_files_only=True)
    elif isinstance(base, PretrainedConfig):
        model_config = base
    else:
        model_config = base.config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
        return get_peft_model(model, lora_config(config))


def saved_to_named(peft_model: Any) -> dict[str, str]:
    """peft's saved key -> the PeftModel's parameter name, computed by peft itself."""
    from peft import get_peft_model_state_dict

    keys = list(peft_model.state_dict())
    tags = {k: torch.tensor(i) for i, k in enumerate(keys)}  # which named key each saved key came from
    saved = get_peft_model_state_dict(peft_model, state_dict=tags, adapter_name=ADAPTER_NAME)
    return {k: keys[int(v)] for k, v in saved.items()}


def named_state(peft_model: Any, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Adapter tensors keyed by the PeftModel's parameter names, from any of the forms training
    holds them in: peft's parameter names, peft's saved names, either without `base_model.model.`
    (inject_adapter_in_model), with wrapper prefixes (DDP `module.`, FSDP, compile)."""
    mapping = saved_to_named(peft_model)
    wanted = set(mapping.values())
    out, unknown = {}, []
    for key, tensor in state.items():
        name = canonical_name(key)
        name = name if name.startswith(PREFIX) else PREFIX + name
        name = mapping.get(name, name)
        (out.__setitem__(name, tensor) if name in wanted else unknown.append(key))
    missing = sorted(wanted - set(out))
    if unknown or missing:
        raise AdapterExportError(f"adapter state does not match the LoRA config on this base: unexpected "
                                 f"{unknown[:4]}, missing {missing[:4]}")
    params = dict(peft_model.state_dict())
    bad = [f"{k}: {tuple(v.shape)} vs {tuple(params[k].shape)}" for k, v in out.items() if v.shape != params[k].shape]
    if bad:
        raise AdapterExportError(f"adapter tensor shapes do not match the LoRA config (r): {bad[:4]}")
    return out


def write_peft_adapter(out_dir: str | Path, base: Any, state: dict[str, torch.Tensor],
                       config: dict[str, Any], base_name: str | None = None) -> dict[str, Any]:
    """Write OUT/adapter_config.json and OUT/adapter_model.safetensors; returns what went in."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    from train.export.verify import check_finite

    model = meta_peft_model(base, config)
    named = named_state(model, state)
    for name, tensor in named.items():
        check_finite(name, tensor, Path(str(base)), "fp32")
    model.load_state_dict({k: v.detach().float().contiguous() for k, v in named.items()}, strict=False, assign=True)
    saved = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in saved.items()}, str(out / "adapter_model.safetensors"),
              metadata={"format": "pt"})
    name = base_name if base_name is not None else (str(base) if isinstance(base, (str, Path)) else None)
    peft_config = lora_config(config, name)
    peft_config.save_pretrained(str(out))
    return {"tensors": len(saved), "parameters": sum(t.numel() for t in saved.values()),
            "r": peft_config.r, "lora_alpha": peft_config.lora_alpha,
            "target_modules": sorted(peft_config.target_modules or [])}


class LoraMergedWeights:
    """WeightSource: the base weights with each LoRA delta added (modules_to_save replace theirs)."""

    def __init__(self, base: WeightSource, base_config: Any, state: dict[str, torch.Tensor],
                 config: dict[str, Any]):
        self.base = base
        self.state, self.config = state, config
        model = meta_peft_model(base_config, config)
        named = named_state(model, state)
        self.deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
        self.replaced: dict[str, torch.Tensor] = {}
        modules = dict(model.named_modules())
        for key, tensor in named.items():
            match = re.match(rf"^{re.escape(PREFIX)}(.+)\.lora_A\.{ADAPTER_NAME}\.weight$", key)
            if match:
                layer = modules[PREFIX + match.group(1)]
                b = named[key.replace(".lora_A.", ".lora_B.")]
                self.deltas[match.group(1) + ".weight"] = (
                    tensor.float(), b.float(), float(layer.scaling[ADAPTER_NAME]), bool(layer.fan_in_fan_out))
            elif f".modules_to_save.{ADAPTER_NAME}." in key:
                self.replaced[key[len(PREFIX):].replace(f".modules_to_save.{ADAPTER_NAME}", "")] = tensor
            elif ".lora_B." not in key:
                raise AdapterExportError(f"cannot merge adapter tensor {key}: only LoRA on linear layers "
                                         "and modules_to_save are merged")
        absent = sorted((set(self.deltas) | set(self.replaced)) - set(base.names()))
        if absent:
            raise CheckpointError(f"the base model has no weights {absent[:4]} that the adapter changes")

    def names(self) -> list[str]:
        return self.base.names()

    def shape(self, name: str) -> torch.Size:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def load(self, name: str) -> torch.Tensor:
        if name in self.replaced:
            return self.replaced[name].detach().clone()
        weight = self.base.load(name)
        if name not in self.deltas:
            return weight
        a, b, scaling, fan_in_fan_out = self.deltas[name]
        delta = (b @ a) * scaling
        return weight.float() + (delta.T if fan_in_fan_out else delta)


@torch.no_grad()
def peft_reference_logits(base_dir: Path, state: dict[str, torch.Tensor], config: dict[str, Any],
                          batch: torch.Tensor) -> torch.Tensor:
    """fp32 logits of peft's own PeftModel (base + unmerged adapter): the offline oracle a merged
    export is verified against, computed by code that shares nothing with the streamed merge."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
    model = get_peft_model(base, lora_config(config)).eval()
    missing = model.load_state_dict(named_state(model, state), strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    return model(input_ids=batch).logits.float()


class SafetensorsWeights:
    """WeightSource over a Hugging Face model directory's safetensors (sharded or single)."""

    def __init__(self, model_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.dir / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.dir / "model.safetensors").is_file():
            with safe_open(str(self.dir / "model.safetensors"), framework="pt") as f:
                self.files = {k: self.dir / "model.safetensors" for k in f.keys()}
        else:
            raise CheckpointError(f"{self.dir} has no model.safetensors(.index.json): the adapter's base model "
                                  "must be a Hugging Face directory with safetensors weights")
        self._info: dict[str, tuple[torch.Size, torch.dtype]] = {}

    def names(self) -> list[str]:
        return list(self.files)

    def _slice_info(self, name: str) -> tuple[torch.Size, torch.dtype]:
        from safetensors import safe_open

        if name not in self._info:
            with safe_open(str(self.files[name]), framework="pt") as f:
                piece = f.get_slice(name)
                self._info[name] = (torch.Size(piece.get_shape()), _DTYPES[piece.get_dtype()])
        return self._info[name]

    def shape(self, name: str) -> torch.Size:
        return self._slice_info(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        return self._slice_info(name)[1]

    def load(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)
