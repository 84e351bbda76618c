"""Pretrained Hugging Face causal LMs from a local directory (or a GGUF file in it), offline.

Codebooks go in with module hooks on the library's own modules (never a copy of its forward code):
per family a `Locator` names the module whose input is the heads side by side (the attention output
projection), the attention module, the MLP module and the decoder layer (its output: the residual stream,
site `L.resid`) of every layer. `HFAdapter` gives the model
the built-in model's interface, forward(idx, past=None, start=None) -> (logits, cache), so sampling,
evaluation and the analysis commands work unchanged.

Nothing here touches the network: HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set before
`transformers` is imported and every load passes local_files_only=True.
"""

from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from cbtool.errors import UserError, first_line
from cbtool.util import progress
from cbtool.util.files import content_hash as files_hash

SUPPORTED = {"gpt2": "GPT-2", "gpt_neox": "GPT-NeoX (Pythia)", "llama": "Llama (SmolLM2)"}
_HASHED_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".gguf")


def _transformers():
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        import transformers
    except ImportError:
        raise UserError("--base-model needs the `transformers` package: pip install -e '.[hf]' in the cbtool "
                        "checkout") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:  # the GGUF converter draws its own tqdm bar, which disable_progress_bar() does not reach
        from transformers import modeling_gguf_pytorch_utils as gguf_utils

        gguf_utils.tqdm = lambda items, *args, **kwargs: items
    except ImportError:
        pass
    return transformers


# -- locating and hashing the base ------------------------------------------------------------------
def check_base_dir(path: str | Path, gguf_file: str | None = None) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"--base-model {p}: no such local directory (cbtool never downloads models)")
    if not p.is_dir():
        raise UserError(f"--base-model {p} is not a directory; pass the model's local folder "
                        f"(and --gguf-file NAME for a GGUF file in it)")
    if gguf_file is not None:
        if Path(gguf_file).name != gguf_file:
            raise UserError(f"--gguf-file {gguf_file!r} must be a file name inside --base-model")
        if not (p / gguf_file).is_file():
            raise UserError(f"--gguf-file {gguf_file}: not found in {p}")
    elif not (p / "config.json").is_file():
        raise UserError(f"--base-model {p} is not a local Hugging Face model: no config.json "
                        f"(for a GGUF file pass --gguf-file)")
    return p.resolve()


def hashed_files(path: Path, gguf_file: str | None = None) -> list[Path]:
    if gguf_file is not None:
        return [path / gguf_file]
    return sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")
                  and f.suffix in _HASHED_SUFFIXES and f.suffix != ".gguf")


def content_hash(path: Path, gguf_file: str | None = None) -> str:
    """sha256 over (name, bytes) of the model's files: config, weights, tokenizer (or the GGUF file)."""
    return files_hash([(f.name, f) for f in hashed_files(path, gguf_file)])


# -- family locators --------------------------------------------------------------------------------
class HFLocator:
    """Hook points of GPT-2, GPT-NeoX and Llama models (see `cbtool.model.sites.Locator`)."""

    def __init__(self, hf_model: nn.Module) -> None:
        cfg = hf_model.config
        self.family = cfg.model_type
        if self.family not in SUPPORTED:
            raise UserError(f"unsupported architecture {self.family!r}: cbtool supports "
                            f"{', '.join(f'{k} ({v})' for k, v in SUPPORTED.items())}")
        self.model = hf_model
        self.n_layer = int(cfg.num_hidden_layers)
        self.n_head = int(cfg.num_attention_heads)
        self.d_model = int(cfg.hidden_size)
        self.head_dim = int(getattr(cfg, "head_dim", None) or self.d_model // self.n_head)
        if self.family == "gpt2":
            self.layers = hf_model.transformer.h
        elif self.family == "gpt_neox":
            self.layers = hf_model.gpt_neox.layers
        else:
            self.layers = hf_model.model.layers

    def head_projection(self, layer: int) -> nn.Module:
        block = self.layers[layer]
        if self.family == "gpt2":
            return block.attn.c_proj
        if self.family == "gpt_neox":
            return block.attention.dense
        return block.self_attn.o_proj

    def attention(self, layer: int) -> nn.Module:
        block = self.layers[layer]
        if self.family == "gpt2":
            return block.attn
        if self.family == "gpt_neox":
            return block.attention
        return block.self_attn

    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def block(self, layer: int) -> nn.Module:
        """The decoder layer: its output (or the output's first element) is the residual stream after it."""
        return self.layers[layer]

    def check_sites(self, chosen: list[tuple[int, str]]) -> None:
        if any(c == "attn_heads" for _, c in chosen) and self.head_dim * self.n_head != self.d_model:
            raise UserError(f"per-head sites need heads x head_dim == hidden size; this model has "
                            f"{self.n_head} x {self.head_dim} != {self.d_model}: use attn or mlp sites")


class HFAdapter(nn.Module):
    """A HF causal LM with the built-in model's interface: forward(idx, past, start) -> (logits, cache).

    `start` (B,) is each row's first real position in a left-padded batch; positions count from it
    and keys before it are masked. While `frozen`, the wrapped model stays in eval mode (no dropout)."""

    def __init__(self, hf_model: nn.Module, frozen: bool = True) -> None:
        super().__init__()
        self.hf = hf_model
        self.frozen = frozen
        cfg = hf_model.config
        block = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        self.config = SimpleNamespace(
            vocab_size=int(cfg.vocab_size), block_size=int(block), n_layer=int(cfg.num_hidden_layers),
            n_head=int(cfg.num_attention_heads), d_model=int(cfg.hidden_size), model_type=cfg.model_type,
        )
        self.hf.config.use_cache = True
        # transformers 5 renamed `past_key_values` to `cache`; use whichever this release takes
        params = inspect.signature(hf_model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    def train(self, mode: bool = True) -> HFAdapter:
        super().train(mode)
        if self.frozen:
            self.hf.eval()
        return self

    def forward(self, idx: torch.Tensor, past: Any = None, start: torch.Tensor | None = None):
        b, t = idx.shape
        offset = 0 if past is None else int(past.get_seq_length())
        total = offset + t
        if total > self.config.block_size:
            raise ValueError(f"sequence of {total} tokens exceeds the model's "
                             f"{self.config.block_size} positions")
        kwargs: dict[str, Any] = {}
        if start is not None:
            start = start.to(idx.device)
            keys = torch.arange(total, device=idx.device).unsqueeze(0)
            kwargs["attention_mask"] = (keys >= start.unsqueeze(1)).long()
            pos = torch.arange(offset, total, device=idx.device).unsqueeze(0) - start.unsqueeze(1)
            kwargs["position_ids"] = pos.clamp(min=0)
        use_cache = past is not None or not torch.is_grad_enabled()
        if past is not None:
            kwargs[self._cache_kw] = past
        out = self.hf(input_ids=idx, use_cache=use_cache, **kwargs)
        cache = out.get("cache", None) if "cache" in out else out.get("past_key_values", None)
        return out.logits, cache


# -- loading ------------------------------------------------------------------------------------------
# The last base loaded in this process, keyed by (path, gguf file, content hash): a GGUF file takes tens of
# seconds to parse and de-quantize, and in-process callers (tests, notebooks) open the same base repeatedly.
_LOADED: dict[tuple[str, str | None, str], nn.Module] = {}  # one entry: the last base loaded


def load_hf_model(path: str | Path, gguf_file: str | None = None, frozen: bool = True,
                  device_map: str | None = None) -> tuple[HFAdapter, HFLocator, dict[str, Any]]:
    """Load a local HF causal LM (or GGUF) in fp32; returns adapter, locator and the model spec.
    `device_map="auto"`: accelerate spreads the layers over the visible devices (cbtool/model/devices.py); such a
    model is loaded afresh, not from this process's cache of the last base."""
    p = check_base_dir(path, gguf_file)
    transformers = _transformers()
    kw: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        kw["gguf_file"] = gguf_file
    digest = content_hash(p, gguf_file)
    key = (str(p), gguf_file, digest)
    cached = _LOADED.get(key) if device_map is None else None
    if cached is None:
        try:
            config = transformers.AutoConfig.from_pretrained(str(p), **kw)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"--base-model {p}: cannot read the model config ({first_line(e)})") from None
        if config.model_type not in SUPPORTED:
            raise UserError(f"unsupported architecture {config.model_type!r} in {p}: cbtool supports "
                            f"{', '.join(f'{k} ({v})' for k, v in SUPPORTED.items())}")
        try:
            # weights only from safetensors (or the GGUF file): never a pickled pytorch_model.bin
            weights = {} if gguf_file is not None else {"use_safetensors": True}
            if device_map is not None:
                weights["device_map"] = device_map
            with progress.track(f"loading {gguf_file or p.name}", None, "models"):
                cached = transformers.AutoModelForCausalLM.from_pretrained(str(p), config=config,
                                                                           dtype=torch.float32, **kw, **weights)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"--base-model {p}: cannot load the model ({first_line(e)})") from None
        cached.eval()
        if device_map is not None:  # placed on its devices: used as it is, never copied or cached
            return _wrap(cached, frozen, p, gguf_file, digest)
        _LOADED.clear()
        _LOADED[key] = cached
    return _wrap(copy.deepcopy(cached), frozen, p, gguf_file, digest)  # callers hook (and may train) their copy


def _wrap(hf_model: nn.Module, frozen: bool, p: Path, gguf_file: str | None, digest: str
          ) -> tuple[HFAdapter, HFLocator, dict[str, Any]]:
    hf_model.eval()
    adapter = HFAdapter(hf_model, frozen=frozen)
    locator = HFLocator(hf_model)
    spec = {"kind": "hf", "path": str(p), "gguf_file": gguf_file, "sha256": digest,
            "family": hf_model.config.model_type, "n_layer": locator.n_layer, "n_head": locator.n_head,
            "d_model": locator.d_model, "vocab_size": adapter.config.vocab_size}
    return adapter, locator, spec


def build_base_from_meta(meta: dict[str, Any], where: Path) -> tuple[HFAdapter, HFLocator]:
    """Re-open the base a checkpoint references; refuse a missing or changed one."""
    m = meta["model"]
    try:
        path, gguf_file, digest = Path(m["path"]), m.get("gguf_file"), str(m["sha256"])
    except (KeyError, TypeError):
        raise UserError(f"{where}/cbtool.json: malformed Hugging Face model spec") from None
    if not path.is_dir():
        raise UserError(f"checkpoint {where} needs its base model at {path}, which does not exist")
    if gguf_file is not None and not (path / gguf_file).is_file():
        raise UserError(f"checkpoint {where} needs {gguf_file} in {path}, which does not exist")
    if content_hash(path, gguf_file) != digest:
        raise UserError(f"base model {path} changed since checkpoint {where} was made "
                        f"(content hash differs); refusing to load")
    adapter, locator, _ = load_hf_model(path, gguf_file, frozen=True)
    return adapter, locator
