"""An SAE spliced into its base model (`cbtool eval --sae DIR --base-model MODEL`; docs/analyse.md "SAEs").

The figures SAE papers report, measured like `cbtool eval` measures a checkpoint's codebooks, on held-out text:

* loss **spliced**: the site's activations x replaced by the SAE's reconstruction x_hat (its top-k latents,
  decoded with b_dec; no error term) in every forward; **bypassed**: the base model as it is; **ablated**: the
  site's activations set to zero. `loss_recovered` = (ablated - spliced) / (ablated - bypassed), SAELens'
  "CE loss score" (1 = the reconstruction loses nothing);
* `fvu`: the fraction of the site's variance the reconstruction leaves, sum |x - x_hat|^2 / sum |x - mean x|^2;
* `l0`: latents active per token; `alive`: the share of the d_sae latents that fired on these tokens.

The held-out tokens: a cbtool checkpoint base's own held-out blocks (the ones `cbtool eval` scores), a TokFSM
base's held-out sequences, or with a Hugging Face base the held-out split of `--corpus` (every 20th document,
cbtool/tasks/text.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from cbtool.formats.sae import SAEBase, SparseDictionary, check_site
from cbtool.model.sites import hook_site
from cbtool.tasks.evaluate import mean_loss
from cbtool.util import progress

__all__ = ["sae_eval"]


class _Splice:
    """The hook: replaces the site's activations (or zeroes them), and counts what the SAE does to them."""

    def __init__(self, sae: SparseDictionary) -> None:
        self.sae, self.mode = sae, "splice"
        self.fired = torch.zeros(sae.d_sae, dtype=torch.bool)
        self.err = self.sq = self.total = self.active = 0.0
        self.sum: torch.Tensor | None = None
        self.tokens = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if self.mode == "off":
            return None
        if self.mode == "ablate":
            return torch.zeros_like(x)
        b, t, d = x.shape
        flat = x.reshape(b * t, d).float()
        ids, acts = self.sae.encode(flat)
        y = self.sae.reconstruct(ids, acts, flat).to(flat.device)
        on = acts > 0
        self.fired[ids[on].cpu()] = True
        self.active += float(on.sum())
        self.err += float(((flat - y) ** 2).sum())
        self.sq += float((flat ** 2).sum())
        self.sum = flat.sum(0) if self.sum is None else self.sum + flat.sum(0)
        self.tokens += flat.shape[0]
        return y.view(b, t, d).to(x.dtype)

    def stats(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        mean = (self.sum if self.sum is not None else torch.zeros(1)) / n
        variance = self.sq - n * float((mean ** 2).sum())  # sum |x - mean|^2
        return {"fvu": self.err / max(variance, 1e-30), "l0": self.active / n,
                "alive": float(self.fired.float().mean())}


@torch.no_grad()
def sae_eval(base: SAEBase, sae: SparseDictionary, batches: Iterable[torch.Tensor], device: torch.device | str,
             site: str | None = None) -> dict[str, Any]:
    """Loss spliced / bypassed / ablated on `batches` of (n, L) token ids, and the SAE's fvu, l0 and alive
    share (module docstring)."""
    name, _ = check_site(sae, base, site)
    chunks = list(batches)
    splice = _Splice(sae)
    handle = hook_site(base.locator, name, splice)
    was_training = base.model.training
    base.model.eval()
    result: dict[str, Any] = {"site": name}
    try:
        with progress.track("eval (SAE spliced)", 3, "parts") as bar:
            for label, mode in (("spliced", "splice"), ("bypassed", "off"), ("ablated", "ablate")):
                splice.mode = mode
                result[label] = {"loss": mean_loss(base.model, chunks, device)}
                bar.advance(1, phase=f"eval ({label})")
    finally:
        handle.remove()
        base.model.train(was_training)
    on, off, zero = (result[k]["loss"] for k in ("spliced", "bypassed", "ablated"))
    result["loss_increase"] = on - off
    result["loss_recovered"] = (zero - on) / (zero - off) if zero != off else None
    result.update(splice.stats())
    result["heldout_tokens"] = int(sum(c.shape[0] * (c.shape[1] - 1) for c in chunks))
    return result
