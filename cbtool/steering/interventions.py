"""Interventions on codebook sites: force a code on, add its vector, or ablate it (docs/definitions.md "Steering").

Interventions are installed on a `CodebookModel` through each codebook's two hooks: `id_editor`
(rewrites the top-k selection before the gather: force, ablate) and `add_vector` (added to the
output: add). Every batch row carries its own list of interventions, so one batch can steer
different rows differently; the editor maps each flattened token (N = B*T, row-major) back to its
row. `steering(...)` is a context manager that always removes what it installed.

Positions: `prompt` steers the prompt's tokens (the prefill call), `generated` the generated
tokens as they are fed back (every decode call), `all` both. An explicit (B, T) mask can be passed
to a call instead (the TokFSM experiment steers only the last state's tokens).

Sampling draws one uniform per row and step from that sample's own seed, precomputed, so a sample
is a function of its prompt, seed and interventions only — not of its batch or batch size — and a
steered sample and its unsteered twin (same seed) draw identical random numbers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from cbtool.errors import UserError
from cbtool.model.codebook import Codebook
from cbtool.model.generate import left_pad, pick_token
from cbtool.model.refs import parse_code_ref
from cbtool.model.sites import CodebookModel, CodebookSpec, Site
from cbtool.util import progress
from cbtool.util.limits import check_representable

MODES = ("force", "add", "ablate")
POSITIONS = ("all", "prompt", "generated")


@dataclass(frozen=True)
class Intervention:
    """One code at one site, in one mode (strength only matters for `add`)."""

    site: Site
    code: int
    mode: str = "force"
    strength: float = 1.0

    @property
    def ref(self) -> str:
        return f"{self.site.name}:{self.code}"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.ref, "mode": self.mode}
        if self.mode == "add":
            d["strength"] = self.strength
        return d


def parse_interventions(refs: Sequence[str], model: CodebookModel, mode: str = "force",
                        strength: float = 1.0) -> list[Intervention]:
    """`SITE:CODE` references -> interventions (UserError on unknown sites, codes out of range)."""
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}: use {', '.join(MODES)}")
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    check_representable(strength, "--strength", torch.finfo(dtype).max, str(dtype).removeprefix("torch."))
    out: list[Intervention] = []
    for ref in refs:
        site, code = parse_code_ref(ref, model.sites)
        iv = Intervention(site, code, mode, float(strength))
        if iv not in out:
            out.append(iv)
    return out


# --------------------------------------------------------------------------- installation

class _ModulePlan:
    """Per-row intervention tensors for one codebook module (G groups)."""

    def __init__(self, spec: CodebookSpec, cb: Codebook, rows: list[list[Intervention]],
                 device: torch.device) -> None:
        b, g = len(rows), spec.groups
        self.spec, self.cb = spec, cb
        force: list[list[list[int]]] = [[[] for _ in range(g)] for _ in range(b)]
        ablate: list[list[list[int]]] = [[[] for _ in range(g)] for _ in range(b)]
        add = torch.zeros(b, g, spec.dim, dtype=torch.float32)
        has_add = False
        codes = cb.codes.detach().float().cpu()
        for r, ivs in enumerate(rows):
            for iv in ivs:
                if iv.site.spec != spec:
                    continue
                grp = iv.site.group
                if iv.mode == "force" and iv.code not in force[r][grp]:
                    force[r][grp].append(iv.code)
                elif iv.mode == "ablate" and iv.code not in ablate[r][grp]:
                    ablate[r][grp].append(iv.code)
                elif iv.mode == "add":
                    add[r, grp] += iv.strength * codes[grp, iv.code]
                    has_add = True
            for grp in range(g):
                if len(force[r][grp]) > spec.k:
                    name = spec.site_names[grp]
                    raise UserError(f"{len(force[r][grp])} codes forced on site {name}, whose codebook "
                                    f"selects only k={spec.k} per token")
        self.force = _pad_ids(force, device)  # (B, G, F) or None
        self.ablate = _pad_ids(ablate, device)  # (B, G, A) or None
        self.add = add.to(device) if has_add else None  # (B, G, d) or None

    @property
    def needs_editor(self) -> bool:
        return self.force is not None or self.ablate is not None


def _pad_ids(lists: list[list[list[int]]], device: torch.device) -> torch.Tensor | None:
    width = max((len(x) for row in lists for x in row), default=0)
    if width == 0:
        return None
    t = torch.full((len(lists), len(lists[0]), width), -1, dtype=torch.long)
    for r, row in enumerate(lists):
        for g, ids in enumerate(row):
            if ids:
                t[r, g, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return t.to(device)


def _per_token(rows_t: torch.Tensor, t: int, mask: torch.Tensor | None, fill: float) -> torch.Tensor:
    """(B, ...) per-row values -> (B*T, ...) per flattened token; `fill` where mask (B, T) is False."""
    b = rows_t.shape[0]
    tok = rows_t.unsqueeze(1).expand(b, t, *rows_t.shape[1:])
    if mask is not None:
        m = mask.view(b, t, *([1] * (rows_t.dim() - 1)))
        tok = torch.where(m, tok, torch.full_like(tok, fill))
    return tok.reshape(b * t, *rows_t.shape[1:])


class SteeredForward:
    """Calls the model with the installed interventions active at the chosen positions.

    `forward(idx, past=None, start=None, mask=None)`: a call without `past` is the prompt (prefill),
    a call with `past` carries generated tokens; `mask` (B, T) bool overrides the position rule."""

    def __init__(self, model: CodebookModel, plans: list[_ModulePlan], batch: int, positions: str) -> None:
        self.model, self.plans, self.batch, self.positions = model, plans, batch, positions
        self._t = 0
        self._mask: torch.Tensor | None = None
        self._active = False

    def __call__(self, idx: torch.Tensor, past=None, start: torch.Tensor | None = None,
                 mask: torch.Tensor | None = None):
        b, t = idx.shape
        if b != self.batch:
            raise ValueError(f"steering was set up for {self.batch} rows, got {b}")
        phase = "prompt" if past is None else "generated"
        if mask is not None:
            self._active, self._mask = bool(mask.any()), mask.to(idx.device)
        else:
            self._active, self._mask = self.positions in ("all", phase), None
        self._t = t
        for p in self.plans:
            if p.add is not None:
                p.cb.add_vector = _per_token(p.add, t, self._mask, 0.0) if self._active else None
        try:
            return self.model(idx, past=past, start=start)
        finally:
            for p in self.plans:
                if p.add is not None:
                    p.cb.add_vector = None

    def editor(self, plan: _ModulePlan):
        def edit(ids: torch.Tensor, scores: torch.Tensor, x: torch.Tensor):
            if not self._active or ids.shape[0] != self.batch * self._t:
                return ids, scores
            t, mask = self._t, self._mask
            if plan.ablate is not None:
                ids, scores = _ablate(plan.cb, ids, scores, x, _per_token(plan.ablate, t, mask, -1))
            if plan.force is not None:
                ids, scores = _force(plan.cb, ids, scores, x, _per_token(plan.force, t, mask, -1))
            return ids, scores

        return edit


def _cosine(x: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """x (N, G, d), vecs (N, G, F, d) -> cosine (N, G, F)."""
    return (F.normalize(vecs.float(), dim=-1) * F.normalize(x.float(), dim=-1).unsqueeze(2)).sum(-1)


def _force(cb: Codebook, ids: torch.Tensor, scores: torch.Tensor, x: torch.Tensor, forced: torch.Tensor):
    """Forced codes (N, G, F; -1 = none) join the selection, replacing the lowest-scoring codes."""
    k = ids.shape[-1]
    valid = forced >= 0
    g = torch.arange(cb.groups, device=ids.device).view(1, -1, 1)
    fscores = _cosine(x, cb.codes[g, forced.clamp(min=0)].detach())
    dup = (ids.unsqueeze(-1) == forced.unsqueeze(-2)).any(-1)  # selected codes that are also forced
    cand = torch.cat([forced, torch.where(dup, torch.full_like(ids, -1), ids)], dim=-1)
    cand_s = torch.cat([torch.where(valid, fscores, torch.zeros_like(fscores)), scores], dim=-1)
    order = torch.argsort((cand < 0).to(torch.int8), dim=-1, stable=True)[..., :k]
    return cand.gather(-1, order), cand_s.gather(-1, order)


def _ablate(cb: Codebook, ids: torch.Tensor, scores: torch.Tensor, x: torch.Tensor, banned: torch.Tensor):
    """Banned codes (N, G, A; -1 = none) leave the selection; the next best take their places."""
    need = (ids.unsqueeze(-1) == banned.unsqueeze(-2)).any(-1).any(-1)  # (N, G)
    tok = need.any(-1).nonzero().squeeze(1)
    if tok.numel() == 0:
        return ids, scores
    k, c = ids.shape[-1], cb.num_codes
    sub = F.normalize(x[tok].float(), dim=-1).transpose(0, 1)  # (G, n, d)
    sim = torch.bmm(sub, F.normalize(cb.codes.detach().float(), dim=-1).transpose(1, 2))  # (G, n, C)
    sim = torch.cat([sim, sim.new_zeros(*sim.shape[:2], 1)], dim=-1)
    b = banned[tok].transpose(0, 1)  # (G, n, A)
    sim.scatter_(-1, torch.where(b >= 0, b, torch.full_like(b, c)), float("-inf"))
    s, i = sim[..., :c].topk(k, dim=-1)
    s, i = s.transpose(0, 1), i.transpose(0, 1)  # (n, G, k)
    upd = need[tok].unsqueeze(-1)
    ids, scores = ids.clone(), scores.clone()
    ids[tok] = torch.where(upd, i, ids[tok])
    scores[tok] = torch.where(upd, s, scores[tok])
    return ids, scores


@contextmanager
def steering(model: CodebookModel, rows: list[list[Intervention]], positions: str = "all",
             device: torch.device | str | None = None) -> Iterator[SteeredForward]:
    """Install per-row interventions (one list per batch row) and yield the steered forward.

    Everything installed is removed on exit, also after an exception."""
    if positions not in POSITIONS:
        raise UserError(f"unknown positions {positions!r}: use {', '.join(POSITIONS)}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    touched = {iv.site.spec for ivs in rows for iv in ivs}
    plans = [_ModulePlan(s, model.codebook(s), rows, dev) for s in model.specs if s in touched]
    fwd = SteeredForward(model, plans, len(rows), positions)
    saved = [(p.cb, p.cb.id_editor, p.cb.add_vector) for p in plans]
    try:
        for p in plans:
            if p.needs_editor:
                if p.cb.id_editor is not None:
                    raise RuntimeError(f"codebook {p.spec.key} already has an intervention installed")
                p.cb.id_editor = fwd.editor(p)
        yield fwd
    finally:
        for cb, editor, add in saved:
            cb.id_editor, cb.add_vector = editor, add


# --------------------------------------------------------------------------- sampling

def sample_uniforms(seeds: Sequence[int], steps: int) -> torch.Tensor:
    """(B, steps) uniforms, row i drawn from a generator seeded with seeds[i]."""
    out = torch.empty(len(seeds), steps)
    for i, s in enumerate(seeds):
        out[i] = torch.rand(steps, generator=torch.Generator().manual_seed(int(s) % 2**63))
    return out


@torch.no_grad()
def sample_steered(fwd: SteeredForward, idx: torch.Tensor, start: torch.Tensor | None, uniforms: torch.Tensor,
                   temperature: float = 1.0, top_k: int | None = None,
                   prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Continue (B, T) prompts by uniforms.shape[1] tokens through the steered forward -> (B, n) new ids.

    temperature 0 is greedy; otherwise inverse-CDF sampling with the row's own uniform per step.
    `prompt_mask` (B, T) replaces the position rule for the prompt tokens."""
    device = idx.device
    if start is not None:
        start = start.to(device)
    steps = uniforms.shape[1]
    logits, past = fwd(idx, start=start, mask=prompt_mask)
    out = []
    for t in range(steps):
        nxt = pick_token(logits[:, -1].float(), uniforms[:, t], temperature, top_k)
        out.append(nxt)
        if t + 1 < steps:
            logits, past = fwd(nxt.to(device).unsqueeze(1), past=past, start=start)
    return torch.stack(out, dim=1) if out else torch.empty(idx.shape[0], 0, dtype=torch.long)


@dataclass
class SampleJob:
    """One sample: its prompt tokens, its interventions and its seed."""

    prompt: list[int]
    interventions: list[Intervention]
    seed: int


@torch.no_grad()
def generate_with_twins(
    model: CodebookModel, jobs: list[SampleJob], max_new_tokens: int, temperature: float = 1.0,
    top_k: int | None = None, positions: str = "all", batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> tuple[list[list[int]], list[list[int]]]:
    """Steered samples and their unsteered twins (same prompt, same seed) -> (steered, baseline).

    Each batch of `batch_size` samples runs as ONE forward of 2 x batch_size rows: the steered rows,
    then their twins with no intervention (per-row interventions make that one batch). Twins share
    their padding and their uniforms, so a difference between them comes from the intervention."""
    device = torch.device(device)
    block = _block_size(model)
    steered: list[list[int]] = []
    baseline: list[list[int]] = []
    with progress.track("generate", len(jobs), "samples") as bar:
        for lo in range(0, len(jobs), batch_size):
            chunk = jobs[lo: lo + batch_size]
            prompts = [j.prompt for j in chunk] * 2
            if block is not None and max(len(p) for p in prompts) + max_new_tokens > block:
                raise UserError(f"prompt + --max-new-tokens exceeds the model's context of {block} tokens")
            rows = [j.interventions for j in chunk] + [[] for _ in chunk]
            uniforms = sample_uniforms([j.seed for j in chunk] * 2, max_new_tokens)
            idx, start = left_pad(prompts)
            own = getattr(model, "steering", None)  # an SAE model installs its own (cbtool/steering/sae.py)
            with (own(rows, positions, device) if own is not None else steering(model, rows, positions, device)) \
                    as fwd:
                new = sample_steered(fwd, idx.to(device), start, uniforms, temperature, top_k).cpu()
            n = len(chunk)
            steered.extend(new[:n].tolist())
            baseline.extend(new[n:].tolist())
            bar.advance(n)
    return steered, baseline


@torch.no_grad()
def continuation_logprobs(model: CodebookModel, prompts: list[list[int]], continuations: list[list[int]],
                          batch_size: int = 32, device: torch.device | str = "cpu") -> list[float]:
    """Mean log-probability (nats/token) of each continuation after its prompt under `model` as it is, with no
    intervention: the fluency of steered text judged by the unsteered model (`intervene --fluency`). An empty
    continuation gets nan."""
    device = torch.device(device)
    means: list[float] = []
    for lo in range(0, len(prompts), batch_size):
        ps, cs = prompts[lo: lo + batch_size], continuations[lo: lo + batch_size]
        idx, start = left_pad([p + c for p, c in zip(ps, cs, strict=True)])
        logits, _ = model(idx.to(device), past=None, start=start.to(device))
        logp = F.log_softmax(logits[:, :-1].float(), -1).gather(-1, idx[:, 1:].to(device).unsqueeze(-1))[..., 0]
        width = idx.shape[1]
        for row, c in enumerate(cs):
            # the continuation's tokens are the last len(c) of the row; token t is predicted at t - 1
            means.append(float(logp[row, width - 1 - len(c):].mean()) if c else float("nan"))
    return means


def _block_size(model: CodebookModel) -> int | None:
    cfg = getattr(model.base, "config", None)
    return getattr(cfg, "block_size", None)


# --------------------------------------------------------------------------- statistics
