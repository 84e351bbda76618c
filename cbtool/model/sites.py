"""Sites: where codebooks sit in a model, what they are called, and the hooks that insert them.

A *codebook module* is one `Codebook` at (layer, component), component one of
`attn_heads` (all heads of a layer, batched; before the attention output projection),
`attn` (attention output), `mlp` (MLP output) or `resid` (the residual stream after block L, the block's
output; where most public SAEs read). A *site* is what users name: `L.mlp`, `L.attn`, `L.resid`,
or `L.attn.hH` for head H of an `attn_heads` module. Codebooks are inserted with module hooks at
points a `Locator` provides, so the built-in model and Hugging Face models share this code.
"""

from __future__ import annotations

import re
from typing import Protocol

import torch
from torch import nn

from cbtool.errors import UserError
from cbtool.model.codebook import Codebook
from cbtool.model.specs import _COMPONENT_WORDS, COMPONENTS, CodebookSpec, Site  # noqa: F401 - re-exported


class Locator(Protocol):
    """Where the hook points of a model are."""

    n_layer: int
    n_head: int
    d_model: int

    def head_projection(self, layer: int) -> nn.Module: ...  # input = heads side by side
    def attention(self, layer: int) -> nn.Module: ...  # output (or its first element) = attn output
    def mlp(self, layer: int) -> nn.Module: ...  # output = MLP output
    def block(self, layer: int) -> nn.Module: ...  # output (or its first element) = residual stream after it
    def check_sites(self, chosen: list[tuple[int, str]]) -> None: ...  # UserError for sites it cannot host


class BuiltinLocator:
    def __init__(self, model: nn.Module) -> None:
        cfg = model.config
        self.model, self.n_layer, self.n_head, self.d_model = model, cfg.n_layer, cfg.n_head, cfg.d_model

    def head_projection(self, layer: int) -> nn.Module:
        return self.model.layers[layer].attn.proj

    def attention(self, layer: int) -> nn.Module:
        return self.model.layers[layer].attn

    def mlp(self, layer: int) -> nn.Module:
        return self.model.layers[layer].mlp

    def block(self, layer: int) -> nn.Module:
        return self.model.layers[layer]

    def check_sites(self, chosen: list[tuple[int, str]]) -> None:
        """Every site fits the built-in model (its heads always split d_model evenly)."""


def middle_sites(n_layer: int) -> set[tuple[int, str]]:
    """MLP outputs at 1/3, 1/2, 2/3 of the depth, attention outputs at 1/2 and 2/3 (`--sites middle`)."""
    third, half, two_thirds = n_layer // 3, n_layer // 2, (2 * n_layer) // 3
    return {(third, "mlp"), (half, "mlp"), (two_thirds, "mlp"), (half, "attn"), (two_thirds, "attn")}


def parse_sites_option(text: str, n_layer: int) -> list[tuple[int, str]]:
    """`--sites`: comma-separated items, each COMPONENT (every layer), LAYERS.COMPONENT or LAYERS,
    where COMPONENT is attn-heads|attn|mlp|resid and LAYERS is `2` or `0-2`; a bare LAYERS means
    attn-heads and mlp at those layers. The item `middle` (the pretrained-base default) means the MLP
    outputs at 1/3, 1/2 and 2/3 of the depth and the attention outputs at 1/2 and 2/3 (SmolLM2's 30 layers:
    10.mlp, 15.mlp, 20.mlp, 15.attn, 20.attn). Returns sorted unique (layer, component)."""
    out: set[tuple[int, str]] = set()
    if "middle" in (t.strip() for t in text.split(",")):
        out.update(middle_sites(n_layer))
        text = ",".join(t for t in text.split(",") if t.strip() != "middle")
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        m = re.fullmatch(r"(?:([0-9]{1,9})(?:-([0-9]{1,9}))?)?\.?([a-z_-]+)?", item)
        if not m or (m.group(1) is None and m.group(3) is None):
            raise UserError(f"bad --sites item {item!r}: use mlp, attn, attn-heads, resid, 2.mlp, 0-1.attn, "
                            "3.resid or 0,2")
        lo, hi, word = m.group(1), m.group(2), m.group(3)
        if word is not None and word not in _COMPONENT_WORDS:
            raise UserError(f"unknown site component {word!r} in --sites: use attn-heads, attn, mlp or resid")
        if lo is None:
            layers = range(n_layer)
        else:
            a, b = int(lo), int(hi) if hi is not None else int(lo)
            if b < a or b >= n_layer:
                raise UserError(f"--sites layer {item!r} out of range: the model has layers 0-{n_layer - 1}")
            layers = range(a, b + 1)
        comps = [_COMPONENT_WORDS[word]] if word else ["attn_heads", "mlp"]
        out.update((layer, c) for layer in layers for c in comps)
    if not out:
        raise UserError("--sites selects no site")
    return sorted(out, key=lambda lc: (lc[0], COMPONENTS.index(lc[1])))


def parse_site_codes(text: str, chosen: list[tuple[int, str]], n_layer: int) -> dict[tuple[int, str], int]:
    """`--site-codes`: comma-separated SITES=C items, SITES as in `--sites` (`0.mlp=4000`, `mlp=2000`);
    later items win. Every item must name at least one chosen module."""
    out: dict[tuple[int, str], int] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        where, eq, count = item.partition("=")
        if not eq or not count.strip().isdigit():
            raise UserError(f"bad --site-codes item {item!r}: use SITES=C, e.g. 0.mlp=4000 or mlp=2000")
        try:
            modules = [m for m in parse_sites_option(where, n_layer) if m in chosen]
        except UserError as e:
            raise UserError(f"--site-codes item {item!r}: {e}") from None
        if not modules:
            raise UserError(f"--site-codes item {item!r} names no codebook of --sites")
        out.update((m, int(count)) for m in modules)
    return out


class CodebookModel(nn.Module):
    """A base model with codebooks hooked in at its sites."""

    def __init__(self, base: nn.Module, locator: Locator, specs: list[CodebookSpec]) -> None:
        super().__init__()
        self.base, self.locator = base, locator
        self.specs = list(specs)
        self.codebooks = nn.ModuleDict(
            {_module_key(s): Codebook(s.dim, s.num_codes, s.k, s.groups) for s in self.specs}
        )
        self._handles = [self._hook(s) for s in self.specs]
        self._off: set[str] = set()  # module keys kept bypassed (`only_sites`)
        self.sites: dict[str, Site] = {
            name: Site(name, s, g) for s in self.specs for g, name in enumerate(s.site_names)
        }

    @classmethod
    def build(cls, base: nn.Module, locator: Locator, chosen: list[tuple[int, str]],
              num_codes: int, k: int, site_codes: dict[tuple[int, str], int] | None = None) -> CodebookModel:
        """`site_codes`: C for some (layer, component) modules instead of `num_codes`."""
        specs = []
        for layer, comp in chosen:
            if comp == "attn_heads":
                groups, dim = locator.n_head, locator.d_model // locator.n_head
            else:
                groups, dim = 1, locator.d_model
            c = (site_codes or {}).get((layer, comp), num_codes)
            specs.append(CodebookSpec(layer, comp, groups, dim, c, k))
        return cls(base, locator, specs)

    def codebook(self, spec: CodebookSpec) -> Codebook:
        return self.codebooks[_module_key(spec)]

    def items(self) -> list[tuple[CodebookSpec, Codebook]]:
        return [(s, self.codebook(s)) for s in self.specs]

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def set_enabled(self, enabled: bool) -> None:
        """Codebooks on (their codes replace the activations) or bypassed; those outside `only_sites` stay
        bypassed."""
        for key, cb in self.codebooks.items():
            cb.enabled = enabled and key not in self._off

    def only_sites(self, names: list[str]) -> None:
        """Keep the codebooks of these sites switchable and every other one bypassed from now on (`cbtool eval
        --sites`). A codebook is switched whole: naming some heads of a per-head codebook is a UserError."""
        chosen = set(names)
        off = set()
        for spec in self.specs:
            named = chosen & set(spec.site_names)
            if named and len(named) < len(spec.site_names):
                raise UserError(f"--sites names {len(named)} of the {len(spec.site_names)} heads of one codebook "
                                f"({spec.site_names[0]} ...); a codebook is switched on or off whole")
            if not named:
                off.add(_module_key(spec))
        self._off = off
        self.set_enabled(True)

    def set_record(self, record: bool) -> None:
        for cb in self.codebooks.values():
            cb.record = record
            cb.last = None

    def aux_loss(self) -> torch.Tensor | None:
        losses = [cb.aux_loss for cb in self.codebooks.values() if cb.aux_loss is not None]
        for cb in self.codebooks.values():
            cb.aux_loss = None
        return torch.stack([x.to(losses[0].device) for x in losses]).sum() if losses else None  # any devices

    def _hook(self, spec: CodebookSpec):
        cb = self.codebook(spec)
        if spec.component == "attn_heads":
            h = spec.groups

            def pre_hook(_module, args):
                x = args[0]
                y = cb(x.reshape(*x.shape[:-1], h, x.shape[-1] // h)).reshape(x.shape)
                return (y, *args[1:])

            return self.locator.head_projection(spec.layer).register_forward_pre_hook(pre_hook)

        def post_hook(_module, _args, output):
            if isinstance(output, tuple):
                return (cb(output[0].unsqueeze(-2)).squeeze(-2), *output[1:])
            return cb(output.unsqueeze(-2)).squeeze(-2)

        target = {"attn": self.locator.attention, "mlp": self.locator.mlp, "resid": self.locator.block}
        return target[spec.component](spec.layer).register_forward_hook(post_hook)


def _module_key(spec: CodebookSpec) -> str:
    return spec.key.replace(".", "_")


# -- reading and replacing one site's activations (SAEs) ---------------------------------------------
_SITE_RE = re.compile(r"([0-9]{1,6})\.(resid|mlp|attn|attn\.h([0-9]{1,6})|attn\.heads)")
SITE_FORMS = "L.resid, L.mlp, L.attn, L.attn.hH or L.attn.heads"


def parse_site(name: str, locator: Locator) -> tuple[int, str, int | None]:
    """A site name -> (layer, component, head): component resid | mlp | attn | attn_heads; head H for `L.attn.hH`,
    None for `L.attn.heads` (every head side by side) and the other components. UserError for a name that is
    none of SITE_FORMS or a layer / head the model lacks."""
    m = _SITE_RE.fullmatch(name.strip())
    if not m:
        raise UserError(f"unknown site {name!r}: use {SITE_FORMS}")
    layer, what = int(m.group(1)), m.group(2)
    if layer >= locator.n_layer:
        raise UserError(f"site {name}: the model has layers 0-{locator.n_layer - 1}")
    if what.startswith("attn.h") and what != "attn.heads":
        head = int(m.group(3))
        if head >= locator.n_head:
            raise UserError(f"site {name}: the model has heads 0-{locator.n_head - 1}")
        return layer, "attn_heads", head
    return layer, {"attn.heads": "attn_heads"}.get(what, what), None


def hook_site(locator: Locator, name: str, fn) -> torch.utils.hooks.RemovableHandle:
    """Call `fn(x)` with the activations (B, T, width) at site `name` on every forward; what it returns (a tensor
    of the same shape) replaces them, None leaves them. Residual stream, MLP and attention outputs are the outputs
    of the block, MLP and attention modules; heads are the input of the attention output projection (one head's
    slice for `L.attn.hH`)."""
    layer, comp, head = parse_site(name, locator)
    if comp == "attn_heads":
        width = getattr(locator, "head_dim", None) or locator.d_model // locator.n_head

        def pre_hook(_module, args):
            x = args[0]
            part = x if head is None else x[..., head * width:(head + 1) * width]
            y = fn(part)
            if y is None:
                return None
            if head is not None:
                y = torch.cat([x[..., :head * width], y.to(x.dtype), x[..., (head + 1) * width:]], dim=-1)
            return (y.to(x.dtype), *args[1:])

        return locator.head_projection(layer).register_forward_pre_hook(pre_hook)

    def post_hook(_module, _args, output):
        x = output[0] if isinstance(output, tuple) else output
        y = fn(x)
        if y is None:
            return None
        y = y.to(x.dtype)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    target = {"attn": locator.attention, "mlp": locator.mlp, "resid": locator.block}[comp]
    return target(layer).register_forward_hook(post_hook)
