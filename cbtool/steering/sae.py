"""Steering SAE latents (`cbtool intervene --sae DIR --base-model MODEL`; docs/steer.md "SAEs").

The SAE's site is read by a hook (cbtool/model/sites.py `hook_site`) and replaced by an edited copy; with
`act_i` the SAE's activation of latent i at the token (after its own top-k, or cbtool's k_max cap) and `d_i` its
decoder row (W_dec[i]):

* ablate: x' = x - act_i * d_i (the latent's contribution removed, the SAE's reconstruction error kept);
* add:    x' = x + s * d_i (s = --strength);
* set:    x' = x + (v - act_i) * d_i (the latent held at v, the error kept).

Rows, positions, seeds and twins are those of cbtool/steering/interventions.py: `SAEModel` plugs into
`generate_with_twins` and `steer` through its `steering` and `parse_interventions` methods.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cbtool.errors import UserError
from cbtool.formats.sae import SAEBase, SparseDictionary, check_site
from cbtool.formats.store import Store
from cbtool.model.sites import hook_site
from cbtool.steering.interventions import POSITIONS, SteeredForward
from cbtool.util.files import content_hash

SAE_MODES = ("ablate", "add", "set")
SET_QUANTILE = 0.99  # `--mode set` without --value: this quantile of the latent's nonzero activations in --store


@dataclass(frozen=True)
class LatentIntervention:
    """One SAE latent in one mode: `strength` for add, `value` for set."""

    site: str
    latent: int
    mode: str
    strength: float = 1.0
    value: float | None = None

    @property
    def ref(self) -> str:
        return f"{self.site}:{self.latent}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.ref, "mode": self.mode}
        if self.mode == "add":
            d["strength"] = self.strength
        if self.mode == "set":
            d["value"] = self.value
        return d


def latent_quantile(store: Store, site: str, latent: int, q: float = SET_QUANTILE) -> float:
    """The q-quantile of a latent's nonzero activations in an SAE store; UserError when it never fires there."""
    vals = []
    for s in range(store.num_shards):
        ids, acts = np.asarray(store.codes(s, site)), store.acts(s, site)
        if acts is None:
            raise UserError(f"store {store.path} holds no activations for {site}: not an SAE store")
        a = np.asarray(acts, dtype=np.float32)
        vals.append(a[(ids == latent) & (a > 0)])
    v = np.concatenate(vals) if vals else np.zeros(0)
    if not len(v):
        raise UserError(f"latent {site}:{latent} never fires in store {store.path}: give --value")
    return float(np.quantile(v, q))


class SAEModel(nn.Module):
    """A base model with an SAE at one site, steerable per batch row. `forward` is the base model's."""

    modes = SAE_MODES

    def __init__(self, base: SAEBase, sae: SparseDictionary, site: str | None = None,
                 store: Store | None = None, value: float | None = None) -> None:
        super().__init__()
        self.base, self.locator, self.sae = base.model, base.locator, sae
        self.site, _ = check_site(sae, base, site)
        self.store, self.value = store, value
        if store is not None:
            rec = store.manifest.get("sae")
            if not isinstance(rec, dict) or rec.get("files") != sae.files or self.site not in store.sites:
                raise UserError(f"--store {store.path} was not embedded with SAE {sae.path} at {self.site}")

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def parse_interventions(self, refs: Sequence[str], mode: str, strength: float = 1.0
                            ) -> list[LatentIntervention]:
        """`SITE:LATENT` references -> interventions; SITE must be the SAE's site."""
        if mode not in SAE_MODES:
            raise UserError(f"unknown mode {mode!r} for SAE latents: use {', '.join(SAE_MODES)}")
        out: list[LatentIntervention] = []
        for ref in refs:
            m = re.fullmatch(r"\s*([^:\s]+)\s*:\s*([0-9]{1,9})\s*", ref)
            if not m:
                raise UserError(f"bad latent reference {ref!r}: expected SITE:LATENT, e.g. {self.site}:42")
            site, latent = m.group(1), int(m.group(2))
            if site != self.site:
                raise UserError(f"{ref}: the SAE reads site {self.site}, not {site}")
            if latent >= self.sae.d_sae:
                raise UserError(f"latent {latent} out of range for the SAE (0-{self.sae.d_sae - 1})")
            value = None
            if mode == "set":
                if self.value is not None:
                    value = float(self.value)
                elif self.store is not None:
                    value = latent_quantile(self.store, site, latent)
                else:
                    raise UserError("--mode set needs --value V, or --store STORE (an SAE store of this SAE) to "
                                    f"take the {SET_QUANTILE} quantile of the latent's activations from")
            iv = LatentIntervention(site, latent, mode, float(strength), value)
            if iv not in out:
                out.append(iv)
        return out

    @contextmanager
    def steering(self, rows: list[list[LatentIntervention]], positions: str = "all",
                 device: torch.device | str | None = None) -> Iterator[SteeredForward]:
        """Install per-row latent interventions (one list per batch row); removed on exit."""
        if positions not in POSITIONS:
            raise UserError(f"unknown positions {positions!r}: use {', '.join(POSITIONS)}")
        fwd = SteeredForward(self, [], len(rows), positions)
        if not any(rows):
            yield fwd
            return
        sae = self.sae

        def edit(x: torch.Tensor) -> torch.Tensor | None:
            if not fwd._active or x.shape[0] != len(rows):
                return None
            b, t, d = x.shape
            flat = x.reshape(b * t, d).float()
            ids, acts = sae.encode(flat)
            ids, acts = ids.view(b, t, -1), acts.view(b, t, -1)
            delta = torch.zeros(b, t, d, device=x.device)
            touched = False
            for r, ivs in enumerate(rows):
                for iv in ivs:
                    act = (acts[r] * (ids[r] == iv.latent)).sum(-1)  # (T,) the latent's activation
                    if iv.mode == "ablate":
                        coef = -act
                    elif iv.mode == "add":
                        coef = torch.full_like(act, iv.strength)
                    else:
                        coef = float(iv.value) - act
                    if bool(coef.any()):  # an inactive latent's ablation leaves x exactly as it is
                        delta[r] += coef[:, None] * sae.W_dec[iv.latent].to(x.device)
                        touched = True
            if not touched:
                return None
            if fwd._mask is not None:
                delta = delta * fwd._mask.view(b, t, 1).to(delta.dtype)
            return (x.float() + delta).to(x.dtype)

        handle = hook_site(self.locator, self.site, edit)
        try:
            yield fwd
        finally:
            handle.remove()


@dataclass
class SAETarget:
    """What `steer` (cbtool/steering/jobs.py) needs of a checkpoint, for an SAE on a base model: the model, the
    task that encodes prompts and decodes samples, a path and a hash to report."""

    model: SAEModel
    task: Any
    path: Path
    sha256: str


def sae_target(base: SAEBase, sae: SparseDictionary, site: str | None = None, store: Store | None = None,
               value: float | None = None) -> SAETarget:
    model = SAEModel(base, sae, site, store, value)
    digest = content_hash([(name, sae.path / name) for name in sorted(sae.files)])
    return SAETarget(model, base.task, sae.path, digest)
