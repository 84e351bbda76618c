"""State patching, the paper's TokFSM causal experiment (arXiv 2310.17230 sec. 4, as its authors'
TokFSM tutorial measures it; docs/definitions.md).

For states a != b: run `BOS b`, keep the codes the model selects at its last position and its own
next-token distribution there (b's reference). Run an input that ends in state a with b's codes forced
at the last position, at the chosen codebooks, and take the Jensen-Shannon divergence (bits) between
the patched next-token distribution and b's reference. Average over all pairs; "none" is the input
left unpatched. Two input sets, each with one input per state a:
- "bare": `BOS a`, the state's two digits alone;
- "prefix": a random walk ending in a, whose prefix before a has a random length of 0..P states
  (uniform), drawn backwards along the FSM's edges from a.
Normalised JSD = raw / the largest row of the same input set (the paper plots it normalised).

The inputs are right-aligned by left padding; everything but the last token runs once, and every
(row, b) runs only the last token on that cache, so a table costs a few hundred one-token forwards.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from cbtool.errors import UserError
from cbtool.model.sites import CodebookModel, CodebookSpec
from cbtool.tasks.tokfsm import BOS, TokFSM
from cbtool.util import progress
from cbtool.util.stats import jsd_bits

PREFIX_SEED = 42  # the walks' stream (the tutorial's default seed); --seed moves it
# The paper's rows: none, layer-0 attention (all heads), layer-1 MLP, all attention, all MLP, all sites.
DEFAULT_ROWS = ("none", "0.attn", "1.mlp", "attn", "mlp", "all")
ROW_HELP = "none, all, attn, mlp, L.attn (all heads of layer L), L.mlp"


@dataclass(frozen=True)
class PatchRow:
    """One row of the table: a name and the codebook modules whose codes it forces."""

    name: str
    specs: tuple[CodebookSpec, ...]


def parse_rows(text: str, model: CodebookModel) -> list[PatchRow]:
    """`--patch-rows`: comma-separated rows (ROW_HELP). A row whose codebooks the model lacks -> UserError."""
    rows = []
    for raw in text.split(","):
        name = raw.strip()
        if not name:
            continue
        m = re.fullmatch(r"(?:([0-9]{1,4})\.)?(attn|mlp)|none|all", name)
        if not m:
            raise UserError(f"bad --patch-rows item {name!r}: use {ROW_HELP}")
        if name == "none":
            specs: list[CodebookSpec] = []
        elif name == "all":
            specs = list(model.specs)
        else:
            layer, comp = m.group(1), m.group(2)
            specs = [s for s in model.specs if (layer is None or s.layer == int(layer))
                     and (s.component == "mlp") == (comp == "mlp")]
            if not specs:
                have = ", ".join(s.key for s in model.specs)
                raise UserError(f"the checkpoint has no codebook for patch row {name!r} (its codebooks: {have})")
        rows.append(PatchRow(name, tuple(specs)))
    if not rows:
        raise UserError("--patch-rows selects no row")
    return rows


def state_prompts(fsm: TokFSM) -> torch.Tensor:
    """(S, 3): `BOS s` for every state s."""
    s = torch.arange(fsm.spec.num_states).view(-1, 1)
    return torch.cat([torch.full_like(s, BOS), s // 10 + 1, s % 10 + 1], 1)


def prefixed_walks(fsm: TokFSM, max_prefix: int, generator: torch.Generator) -> list[torch.Tensor]:
    """For every state a, a walk of 1 + U{0..max_prefix} states ending in a, drawn backwards: each earlier
    state uniform among the predecessors of the next (a state without one ends the prefix early)."""
    preds = [fsm.adjacency[:, t].nonzero().squeeze(1) for t in range(fsm.spec.num_states)]
    lengths = torch.randint(0, max_prefix + 1, (fsm.spec.num_states,), generator=generator)
    walks = []
    for a in range(fsm.spec.num_states):
        walk = [a]
        for _ in range(int(lengths[a])):
            p = preds[walk[-1]]
            if p.numel() == 0:
                break
            walk.append(int(p[torch.randint(0, p.numel(), (1,), generator=generator)]))
        walks.append(torch.tensor(walk[::-1]))
    return walks


def walk_tokens(walks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """State walks -> left-padded `BOS digits...` (n, L) and each row's first real position (n,)."""
    seqs = [torch.cat([torch.tensor([BOS]), torch.stack([w // 10 + 1, w % 10 + 1], 1).reshape(-1)]) for w in walks]
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), BOS, dtype=torch.long)
    start = torch.empty(len(seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, width - len(s):] = s
        start[i] = width - len(s)
    return tokens, start


@contextmanager
def forced_codes(model: CodebookModel, codes: dict[str, torch.Tensor]) -> Iterator[None]:
    """Every token through the codebook modules keyed in `codes` selects the given ids (G, k)."""
    cbs = {spec.key: cb for spec, cb in model.items()}
    try:
        for key, ids in codes.items():
            cbs[key].id_editor = lambda cur, scores, _x, ids=ids: (ids.to(cur).expand_as(cur), scores)
        yield
    finally:
        for key in codes:
            cbs[key].id_editor = None


@torch.no_grad()
def reference(model: CodebookModel, fsm: TokFSM, device) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every state's own next-token distribution at the last position of `BOS s` (S, V), and the codes
    each codebook selects there, per module key (S, G, k)."""
    model.set_record(True)
    try:
        logits, _ = model(state_prompts(fsm).to(device))
        codes = {spec.key: cb.last.ids.view(fsm.spec.num_states, 3, spec.groups, -1)[:, -1].cpu()
                 for spec, cb in model.items()}
    finally:
        model.set_record(False)
    return torch.softmax(logits[:, -1].double().cpu(), -1), codes


@torch.no_grad()
def pair_jsd(model: CodebookModel, tokens: torch.Tensor, start: torch.Tensor, states: torch.Tensor,
             ref: torch.Tensor, codes: dict[str, torch.Tensor], row: PatchRow, device) -> float:
    """Mean JSD (bits) over pairs (a, b), a != b, between the next-token distribution at the last token
    of each input (ending in state `states[i]`) with b's codes forced at `row`'s codebooks, and b's
    reference. `tokens` (n, L) left-padded, `start` (n,) their first real positions."""
    tokens, start = tokens.to(device), start.to(device)
    _, past = model(tokens[:, :-1], start=start)
    last = tokens[:, -1:]
    s_count = ref.shape[0]
    total, count = 0.0, 0
    unpatched = None
    for b in range(s_count):
        if row.specs or unpatched is None:
            with forced_codes(model, {spec.key: codes[spec.key][b] for spec in row.specs}):
                logits, _ = model(last, past=past, start=start)
            dist = torch.softmax(logits[:, -1].double().cpu(), -1)
            if not row.specs:
                unpatched = dist
        else:
            dist = unpatched
        keep = states != b
        total += float(jsd_bits(dist[keep], ref[b].expand(int(keep.sum()), -1)).sum())
        count += int(keep.sum())
    return total / max(count, 1)


@torch.no_grad()
def state_patching(model: CodebookModel, fsm: TokFSM, device, rows: list[PatchRow],
                   prefix_states: int = 62, seed: int = 0) -> dict[str, Any]:
    """The state-patching table (see the module docstring)."""
    if fsm.spec.num_states > 100:
        raise UserError("state patching needs a TokFSM of at most 100 (two-digit) states")
    block = model.base.config.block_size
    if 2 * (prefix_states + 1) + 1 > block:
        raise UserError(f"--prefix-states {prefix_states} needs {2 * (prefix_states + 1) + 1} tokens, past the "
                        f"model's block size {block}: use at most {(block - 3) // 2}")
    if prefix_states < 0:
        raise UserError(f"--prefix-states must be >= 0, got {prefix_states}")
    was_training = model.training
    model.eval()
    try:
        ref, codes = reference(model, fsm, device)
        states = torch.arange(fsm.spec.num_states)
        gen = torch.Generator().manual_seed(PREFIX_SEED + seed)
        walks = prefixed_walks(fsm, prefix_states, gen)
        inputs = {"bare": (state_prompts(fsm), torch.zeros(len(states), dtype=torch.long)),
                  "prefix": walk_tokens(walks)}
        table = [{"row": r.name, "codebooks": [s.key for s in r.specs],
                  "sites": sum(len(s.site_names) for s in r.specs)} for r in rows]
        with progress.track("state patching", len(inputs) * len(rows), "rows") as bar:
            raw_by: dict[str, list[float]] = {}
            for label, (tokens, start) in inputs.items():
                raw_by[label] = []
                for r in rows:
                    raw_by[label].append(pair_jsd(model, tokens, start, states, ref, codes, r, device))
                    bar.advance(1)
        for label, raw in raw_by.items():
            top = max(raw) or 1.0
            for entry, v in zip(table, raw, strict=True):
                entry[f"jsd_{label}"] = v
                entry[f"normalised_{label}"] = v / top
    finally:
        model.train(was_training)
    prefix_lengths = [len(w) - 1 for w in walks]
    return {"prefix_states": prefix_states, "seed": seed, "pairs": len(states) * (len(states) - 1),
            "mean_prefix_states": sum(prefix_lengths) / len(prefix_lengths), "jsd_units": "bits",
            "table": table}


PATCHING_NOTE = ("JSD (bits) between the next-token distribution at the last token of an input ending in state a, "
                 "with the codes the model selects at the last token of `BOS b` forced there at the row's "
                 "codebooks, and the model's own next-token distribution on `BOS b`; mean over all a != b. "
                 "bare: inputs `BOS a`; prefix: a random walk ending in a after 0..P states. norm.: / the "
                 "largest row.")
