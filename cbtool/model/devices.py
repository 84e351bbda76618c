"""`train --device-map auto`: a pretrained base too large for one device, spread over the visible devices by
accelerate (the `hf` extra), with every codebook on the device of the layer it is hooked into.

Without a device map the whole model sits on `--device`. With one, Hugging Face's loader places the base's
layers (GPUs first, then the CPU), a codebook follows its layer's module, the input ids go to the device of
the input embeddings, and accelerate's hooks carry activations from layer to layer. Under torchrun a model
spread over devices is not data-parallel: refused.

`resolve_device`: the --device option (auto, cpu, cuda) as a torch device.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from cbtool.errors import UserError
from cbtool.model.sites import CodebookModel
from cbtool.util import distributed

DEVICE_MAPS = ("auto",)


def check_device_map(value: str | None, pretrained: bool) -> None:
    """Refuse (one line, exit 2) a device map cbtool does not offer, or one it cannot use here."""
    if value is None:
        return
    if value not in DEVICE_MAPS:
        raise UserError(f"unknown --device-map {value!r}: use {', '.join(DEVICE_MAPS)} (or leave it out)")
    if not pretrained:
        raise UserError("--device-map places a pretrained base: it needs --base-model")
    if distributed.world().active:
        raise UserError("--device-map spreads one model over devices; run it in one process, not under torchrun")
    if importlib.util.find_spec("accelerate") is None:
        raise UserError("--device-map needs the `accelerate` package: pip install -e '.[hf]' in the cbtool checkout")


def module_device(module: nn.Module) -> torch.device:
    """Where a module's weights are (the first parameter's device)."""
    for p in module.parameters():
        return p.device
    raise UserError(f"module {type(module).__name__} has no weights to place a codebook beside")


def place_codebooks(model: CodebookModel) -> None:
    """Move every codebook to the device of the module it is hooked into."""
    loc = model.locator
    for spec, cb in model.items():
        if spec.component == "attn_heads":
            target = loc.head_projection(spec.layer)
        elif spec.component == "attn":
            target = loc.attention(spec.layer)
        else:
            target = loc.mlp(spec.layer)
        cb.to(module_device(target))


def input_device(model: CodebookModel) -> torch.device:
    """Where the input ids go: the device of the base's input embeddings."""
    return module_device(model.base.hf.get_input_embeddings())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {name!r}: use auto, cpu or cuda")
    return torch.device(name)
