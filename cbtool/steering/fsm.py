"""The paper's TokFSM state-steering experiment (arXiv 2310.17230, sec. 4): force state b's codes
onto an input that ends in state a and measure how far the model's next-state distribution moves
from a's transitions to b's.

1. Best code per state per site, computed on the fly: fresh TokFSM sequences run with the codebooks
   recording; a bincount of (code, state label) gives precision = hits / fires for every code; each
   state's best code is the most precise one among codes with at least `min_hits` hits (ties: most
   hits), falling back to the code with most hits.
2. For many (a, b) pairs: a random walk ending in a; at the tokens of a (both digits, or only the
   last with patch="last") b's best codes are forced at the chosen sites (none, attention, mlp,
   all). The next-state distribution is the product of the two digit distributions: P(d1) from the
   last input position and P(d2 | d1) from the input extended by each of the ten d1 (one batch of ten
   rows per pair). JSD (bits, 0..1) to b's true distribution (uniform over b's out-neighbours) and
   to a's.
3. One generated continuation per pair (a sampled next state, same seed with and without the
   patch): the share whose transition is valid for b, and for a.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cbtool.model.sites import CodebookModel, Site
from cbtool.steering.interventions import Intervention, pick_token, sample_uniforms, steering
from cbtool.tasks.tokfsm import BOS, TokFSM
from cbtool.util import progress
from cbtool.util.stats import jsd_bits

CODE_SEARCH_SEED = 424_242_421  # held-out stream for the label search
CHOICES = ("none", "attention", "mlp", "all")


@dataclass
class BestCodes:
    """Per state and digit position: the best code at one site, its precision and hits.

    Shapes (S, 2): column j is the code for the state's j-th digit token. With `by_digit=False` both
    columns hold the state's best code over both of its tokens."""

    codes: torch.Tensor  # (S, 2) long
    precision: torch.Tensor  # (S, 2) float
    hits: torch.Tensor  # (S, 2) long


@torch.no_grad()
def best_codes_per_state(model: CodebookModel, fsm: TokFSM, device: torch.device | str = "cpu",
                         num_seqs: int = 256, min_hits: int = 5, batch_size: int = 64,
                         seed: int = CODE_SEARCH_SEED, by_digit: bool = True,
                         rank: str = "precision") -> dict[str, BestCodes]:
    """For every site, each state's most precise code over `num_seqs` fresh sequences.

    by_digit: the label is (state, digit position) — a state's two tokens get their own codes, as
    k=1 codebooks separate them; else the label is the state alone."""
    s_count = fsm.spec.num_states
    n_lab = s_count * 2 if by_digit else s_count
    joint = {spec.key: torch.zeros(spec.groups * spec.num_codes * n_lab, dtype=torch.long)
             for spec in model.specs}
    fires = {spec.key: torch.zeros(spec.groups * spec.num_codes, dtype=torch.long) for spec in model.specs}
    gen = torch.Generator().manual_seed(seed)
    model.set_record(True)
    try:
        for lo in range(0, num_seqs, batch_size):
            tokens, labels = fsm.batch(min(batch_size, num_seqs - lo), gen)
            model(tokens.to(device))
            if by_digit:  # token i >= 1 is digit (i - 1) % 2 of its state
                digit = (torch.arange(tokens.shape[1]) - 1).remainder(2).view(1, -1)
                labels = torch.where(labels >= 0, labels * 2 + digit, labels)
            lab = labels.reshape(-1)
            keep = lab >= 0
            for spec, cb in model.items():
                ids = cb.last.ids.cpu()  # (N, G, k)
                flat = ids + (torch.arange(spec.groups) * spec.num_codes).view(1, -1, 1)
                fires[spec.key] += torch.bincount(flat.reshape(-1), minlength=fires[spec.key].numel())
                jf = flat[keep] * n_lab + lab[keep].view(-1, 1, 1)
                joint[spec.key] += torch.bincount(jf.reshape(-1), minlength=joint[spec.key].numel())
    finally:
        model.set_record(False)
    out: dict[str, BestCodes] = {}
    labels_idx = torch.arange(n_lab)
    for spec in model.specs:
        c = spec.num_codes
        j = joint[spec.key].view(spec.groups, c, n_lab)
        f = fires[spec.key].view(spec.groups, c, 1)
        prec = j.double() / f.clamp(min=1).double()
        total = float(f.sum()) + 1
        if rank == "precision":
            score = prec + j.double() / total * 1e-6  # ties: more hits first
        elif rank == "hits":
            score = j.double() + prec * 1e-6
        else:  # f1
            rec = j.double() / j.sum(1, keepdim=True).clamp(min=1).double()
            score = 2 * prec * rec / (prec + rec).clamp(min=1e-12)
        score = torch.where(j >= min_hits, score, torch.full_like(score, -1.0))
        best = torch.where(score.amax(dim=1) >= 0, score.argmax(dim=1), j.argmax(dim=1))  # (G, n_lab)
        for g, name in enumerate(spec.site_names):
            idx = best[g]
            res = (idx, prec[g, idx, labels_idx].float(), j[g, idx, labels_idx])
            if by_digit:
                res = tuple(t.view(s_count, 2) for t in res)
            else:
                res = tuple(t.unsqueeze(1).expand(s_count, 2) for t in res)
            out[name] = BestCodes(*res)
    return out


def choice_sites(model: CodebookModel, choice: str) -> list[Site]:
    """Sites a choice patches: none, attention (every attention site), mlp, all."""
    sites = list(model.sites.values())
    if choice == "none":
        return []
    if choice == "attention":
        return [s for s in sites if s.spec.component in ("attn", "attn_heads")]
    if choice == "mlp":
        return [s for s in sites if s.spec.component == "mlp"]
    if choice == "all":
        return sites
    raise ValueError(f"unknown site choice {choice!r}")


def first_digit(dist: torch.Tensor) -> torch.Tensor:
    """(n, 100) next-state distributions -> (n, 10) marginals of the first digit."""
    return dist.view(-1, 10, 10).sum(-1)


def true_next_state(fsm: TokFSM, states: torch.Tensor) -> torch.Tensor:
    """(n,) states -> (n, 100) their true next-state distributions over two-digit states."""
    dist = torch.zeros(states.shape[0], 100, dtype=torch.float64)
    dist[torch.arange(states.shape[0]).unsqueeze(1), fsm.neighbours[states]] = 1.0 / fsm.spec.out_degree
    return dist


@torch.no_grad()
def patched_next_state(model: CodebookModel, tokens: torch.Tensor, first: list[list[Intervention]],
                       second: list[list[Intervention]], uniforms: torch.Tensor,
                       device: torch.device | str, temperature: float = 1.0,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, P) ending in a state's two digits; `first`/`second` are the per-row interventions
    at those two tokens. Returns the model's next-state distribution (n, 100), the product of the
    two digit distributions, and a sampled continuation (n, 2) drawn with `uniforms` (n, 2)."""
    n, p = tokens.shape
    tokens = tokens.to(device)
    ones = torch.ones(n, 1, dtype=torch.bool, device=device)
    _, past = model(tokens[:, : p - 2])
    with steering(model, first, "prompt", device) as fwd:
        _, past = fwd(tokens[:, p - 2: p - 1], past=past, mask=ones)
    with steering(model, second, "prompt", device) as fwd:
        logits1, past = fwd(tokens[:, p - 1:], past=past, mask=ones)
    past10 = [(k.repeat_interleave(10, 0), v.repeat_interleave(10, 0)) for k, v in past]
    digits = torch.arange(1, 11, device=device).repeat(n).unsqueeze(1)
    logits2, _ = model(digits, past=past10)
    l1 = logits1[:, -1].float().cpu()
    l2 = logits2[:, -1].float().cpu().view(n, 10, -1)
    p1 = torch.softmax(l1[:, 1:11].double(), -1)  # (n, 10): first digit
    p2 = torch.softmax(l2[..., 1:11].double(), -1)  # (n, d1, d2)
    dist = (p1.unsqueeze(2) * p2).reshape(n, 100)
    d1 = pick_token(l1, uniforms[:, 0], temperature, None)  # over the whole vocabulary, like generation
    row = (d1 - 1).clamp(0, 9)
    d2 = pick_token(l2[torch.arange(n), row], uniforms[:, 1], temperature, None)
    d2 = torch.where((d1 >= 1) & (d1 <= 10), d2, torch.full_like(d2, BOS))
    return dist, torch.stack([d1, d2], dim=1)


@torch.no_grad()
def fsm_state_steering(
    model: CodebookModel, fsm: TokFSM, device: torch.device | str = "cpu", pairs: int = 500,
    context_states: int = 8, seed: int = 0, num_seqs: int = 256, patch: str = "state",
    by_digit: bool = True, temperature: float = 1.0, batch_pairs: int = 128,
    choices: tuple[str, ...] = CHOICES,
) -> dict[str, Any]:
    """The state-steering table: per site choice, mean JSD to b's and a's next-state distributions
    and the share of generated transitions valid for b (and for a).

    patch: "state" forces b's codes at both tokens of the final state a, "last" only at its last."""
    if patch not in ("state", "last"):
        raise ValueError("patch must be 'state' or 'last'")
    if context_states < 1 or pairs < 1:
        raise ValueError("pairs and context_states must be >= 1")
    was_training = model.training
    model.eval()
    try:
        best = best_codes_per_state(model, fsm, device, num_seqs=num_seqs, by_digit=by_digit)
        gen = torch.Generator().manual_seed(seed)
        walks = fsm.sample_states(pairs, context_states, gen)
        a = walks[:, -1]
        s_count = fsm.spec.num_states
        b = (a + torch.randint(1, s_count, (pairs,), generator=gen)) % s_count
        digits = torch.stack([walks // 10, walks % 10], dim=2).reshape(pairs, -1) + 1
        tokens = torch.cat([torch.full((pairs, 1), BOS, dtype=torch.long), digits], dim=1)
        true_b, true_a = true_next_state(fsm, b), true_next_state(fsm, a)
        uniforms = sample_uniforms([seed * 1_000_003 + i for i in range(pairs)], 2)
        table = []
        with progress.track("state steering", len(choices), "site choices") as bar:
            for choice in choices:
                sites = choice_sites(model, choice)

                def rows(j: int, sites: list[Site] = sites) -> list[list[Intervention]]:
                    return [[Intervention(s, int(best[s.name].codes[int(bi), j])) for s in sites] for bi in b]

                first = rows(0) if patch == "state" else [[] for _ in range(pairs)]
                second = rows(1)
                dists, gens = [], []
                for lo in range(0, pairs, batch_pairs):
                    hi = min(pairs, lo + batch_pairs)
                    d, g = patched_next_state(model, tokens[lo:hi], first[lo:hi], second[lo:hi],
                                              uniforms[lo:hi], device, temperature)
                    dists.append(d)
                    gens.append(g)
                dist, new = torch.cat(dists), torch.cat(gens)
                raw = (new[:, 0] - 1) * 10 + (new[:, 1] - 1)
                ok = ((new >= 1) & (new <= 10)).all(1) & (raw < s_count)
                s1 = raw.clamp(0, s_count - 1)
                valid_b = fsm.adjacency[b, s1] & ok
                valid_a = fsm.adjacency[a, s1] & ok
                prec = [float(best[s.name].precision[b].mean()) for s in sites]
                table.append({
                    "sites": choice,
                    "patched_sites": len(sites),
                    "jsd_to_b": float(jsd_bits(dist, true_b).mean()),
                    "jsd_to_a": float(jsd_bits(dist, true_a).mean()),
                    "first_digit_jsd_to_b": float(jsd_bits(first_digit(dist), first_digit(true_b)).mean()),
                    "first_digit_jsd_to_a": float(jsd_bits(first_digit(dist), first_digit(true_a)).mean()),
                    "valid_for_b": float(valid_b.float().mean()),
                    "valid_for_a": float(valid_a.float().mean()),
                    "mean_code_precision": sum(prec) / len(prec) if prec else None,
                })
                bar.advance(1)
        base = next((r["jsd_to_b"] for r in table if r["sites"] == "none"), None)
        for r in table:
            r["jsd_to_b_vs_none"] = r["jsd_to_b"] / base if base else None
    finally:
        model.train(was_training)
    return {"pairs": pairs, "context_states": context_states, "patch": patch,
            "codes_by": "state and digit" if by_digit else "state", "seed": seed,
            "code_search_seqs": num_seqs, "temperature": temperature, "jsd_units": "bits", "table": table}
