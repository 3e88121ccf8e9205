"""Houlsby bottleneck adapters (`adapter: adapter`): a small residual MLP after each attention and MLP block.

    h  ->  h + up(dropout(act(down(h))))        down: hidden -> size, up: size -> hidden, `up` starts at zero

Houlsby et al. (2019) put one after the attention block and one after the feed-forward block of every layer. No
maintained library supports them with current transformers, so this file is the whole implementation. Each
adapter is attached as a child of the block it follows (`…layers.3.self_attn.bottleneck`) and applied by a forward
hook on that block, so every base parameter keeps its name and the adapter's own weights are a plain state dict:
`adapter/bottleneck.safetensors` plus `adapter/bottleneck_config.json` in the run folder.

The adapter's arithmetic runs in fp32 even under bf16 autocast: a fresh adapter's update is far below bf16's
resolution of the block output (the same reason LoRA's sums are kept in fp32, see adapters.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.artifacts import atomic_write
from tunesmith.errors import RunError

WEIGHTS = "bottleneck.safetensors"
CONFIG = "bottleneck_config.json"
# placement -> where the adapter goes in a layer: decoders (Llama, Mistral, Qwen2, Gemma, …) wrap the attention and
# MLP blocks before their residual add; BERT-style encoders the blocks' output projections, before the residual
# add and layer norm: both are where Houlsby et al. put them
BLOCKS = {"attention": ("self_attn", "attention.output.dense"), "mlp": ("mlp", "output.dense")}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """h + up(dropout(act(down(h)))), computed in fp32; the up-projection starts at zero (an identity map)."""

    def __init__(self, hidden: int, size: int, non_linearity: str = "gelu", dropout: float = 0.0):
        super().__init__()
        from tunesmith.methods.common import FastDropout

        self.down = nn.Linear(hidden, size)
        self.act = ACTIVATIONS[non_linearity]()
        self.dropout = FastDropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(size, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        device = h.device.type
        autocast = torch.is_autocast_enabled(device)
        with torch.autocast(device, enabled=False):
            x = h.to(self.down.weight.dtype)
            out = x + self.up(self.dropout(self.act(self.down(x))))
        # under autocast the residual stream is fp32 anyway: keep the sum there; otherwise match the model's dtype
        return out if autocast else out.to(h.dtype)


def decoder_layers(model) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer layers, and its dotted name (found by the config's layer count)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    count = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and count and len(module) == count:
            return name, module
    raise RunError(f"can't find the {count} transformer layers of {type(model).__name__}",
                   "layer-wise adapters (adapter, freeze.train_layers) need a model with a list of layers")


def _apply(block: nn.Module, args: tuple, output: Any) -> Any:
    """Forward hook: run the block's output through its bottleneck (attention blocks return a tuple)."""
    if isinstance(output, tuple):
        return (block.bottleneck(output[0]), *output[1:])
    return block.bottleneck(output)


def add_bottleneck(model, params) -> list[str]:
    """Attach a zero-initialised bottleneck after the chosen blocks of every layer; return the adapters' names.

    `params` has `size`, `non_linearity`, `dropout` and `placement` (adapters.BottleneckParams).
    """
    prefix, layers = decoder_layers(model)
    hidden = (model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config).hidden_size
    names = []
    for i, layer in enumerate(layers):
        for place in params.placement:
            path = next((p for p in BLOCKS[place] if _has(layer, p)), None)
            if path is None:
                raise RunError(f"{type(layer).__name__} has none of {list(BLOCKS[place])} for a bottleneck adapter",
                               "bottleneck adapters fit decoders with `self_attn` and `mlp` blocks (Llama, Mistral, "
                               "Qwen2, Gemma, …) and BERT-style encoders; choose another method.adapter")
            block = layer.get_submodule(path)
            if isinstance(getattr(block, "bottleneck", None), Bottleneck):
                raise RunError(f"{prefix}.{i}.{path} already has a bottleneck adapter")
            weight = next(block.parameters())
            block.bottleneck = Bottleneck(hidden, params.size, params.non_linearity, params.dropout).to(
                device=weight.device, dtype=torch.float32)
            block.register_forward_hook(_apply)
            names.append(f"{prefix}.{i}.{path}.bottleneck")
    return names


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def bottleneck_state(model) -> dict[str, torch.Tensor]:
    """Every bottleneck parameter under its name in `model` (the adapter's whole trained state)."""
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, Bottleneck):
            for pname, p in module.named_parameters():
                state[f"{name}.{pname}"] = p.detach()
    return state


def save_bottleneck(model, params, folder: Path, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write the adapter weights (plus `extra` trained tensors, e.g. a classification head) and its settings."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {**bottleneck_state(model), **(extra or {})}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / WEIGHTS))
    settings = {"size": params.size, "non_linearity": params.non_linearity, "dropout": params.dropout,
                "placement": list(params.placement)}
    atomic_write(folder / CONFIG, json.dumps({"format": 1, "settings": settings, "extra": sorted(extra or {})},
                                             indent=2) + "\n")


def load_bottleneck(model, folder: Path) -> list[str]:
    """Attach the adapters described in `folder` to `model` and load their weights; return their names."""
    from safetensors.torch import load_file

    from tunesmith.methods.adapters import BottleneckParams

    folder = Path(folder)
    config = json.loads((folder / CONFIG).read_text())
    names = add_bottleneck(model, BottleneckParams.model_validate(config["settings"]))
    saved = load_file(str(folder / WEIGHTS))
    params = dict(model.named_parameters())
    unknown = sorted(set(saved) - set(params))
    missing = sorted(set(bottleneck_state(model)) - set(saved))
    if unknown or missing:
        raise RunError(f"{folder}: the saved bottleneck weights don't fit this model "
                       f"(unknown: {unknown[:3]}, missing: {missing[:3]})",
                       "load the run on the base model it was trained from")
    with torch.no_grad():
        for name, tensor in saved.items():
            params[name].copy_(tensor)
    return names
