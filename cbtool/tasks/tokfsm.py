"""TokFSM, the paper's finite-state-machine data (docs/definitions.md), as a `Task` (cbtool/tasks/base.py).

100 states, each with 10 distinct out-neighbours drawn uniformly from a seeded generator, uniform
transition probabilities. A state is written as two digit tokens; a sequence is BOS + digits;
each token's label is the state it belongs to (BOS: -1). Batches are a pure function of
(seed, step), so training resumes on exactly the data it would have seen.

Three disjoint streams of sequences: training (`step_batch(n, seed, step)`), evaluation
(`EVAL_SEED`), and analysis (`embed`: `HELD_OUT_SEED + --seed`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cbtool.errors import UserError
from cbtool.model.generate import sample
from cbtool.model.sites import CodebookModel
from cbtool.tasks.base import Corpus, Document
from cbtool.tasks.evaluate import mean_loss, on_vs_bypassed
from cbtool.tasks.fsm_text import group_context, group_states  # noqa: F401 - re-exported
from cbtool.util.limits import MAX_FSM_STATES, MAX_SEQ_LEN

BOS = 0
VOCAB_SIZE = 11  # BOS + digits 0-9 (token = digit + 1)
EVAL_SEED = 987_654_321  # held-out evaluation stream, disjoint from any training seed's stream
# Analysis sequences come from seeds (HELD_OUT_SEED + --seed) * 100_003 + batch: far from any
# training stream (seed * 1_000_003 + step * 7919 + 12345 for small seeds) and from eval's.
HELD_OUT_SEED = 2**40


@dataclass(frozen=True)
class FSMSpec:
    num_states: int = 100
    out_degree: int = 10
    seq_len: int = 128  # BOS + 127 digits
    seed: int = 0  # the FSM's own seed (its graph), independent of the training seed

    def to_dict(self) -> dict:
        return {"name": "tokfsm", **asdict(self)}


class TokFSM:
    """The FSM (its graph and sampler) and the `Task` that trains and evaluates on it."""

    name = "tokfsm"
    metrics = {"loss": ("loss (nats/token)", ".4f"), "transition_accuracy": ("transition accuracy", ".3f"),
               "greedy_accuracy": ("greedy accuracy", ".3f"),
               "first_transition_accuracy": ("first transition", ".3f")}

    def __init__(self, spec: FSMSpec = FSMSpec()) -> None:
        if spec.num_states > MAX_FSM_STATES or spec.out_degree > spec.num_states:
            raise ValueError("TokFSM needs <= 100 states (2 digits) and out_degree <= num_states")
        self.spec = spec
        g = torch.Generator().manual_seed(spec.seed)
        self.neighbours = torch.stack(
            [torch.randperm(spec.num_states, generator=g)[: spec.out_degree] for _ in range(spec.num_states)]
        )  # (S, out_degree)
        adj = torch.zeros(spec.num_states, spec.num_states, dtype=torch.bool)
        adj[torch.arange(spec.num_states).unsqueeze(1), self.neighbours] = True
        self.adjacency = adj

    vocab_size = VOCAB_SIZE

    def sample_states(self, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
        """(n, length) state walks starting from a uniform state."""
        states = torch.empty(n, length, dtype=torch.long)
        states[:, 0] = torch.randint(0, self.spec.num_states, (n,), generator=generator)
        choice = torch.randint(0, self.spec.out_degree, (n, length), generator=generator)
        for t in range(1, length):
            states[:, t] = self.neighbours[states[:, t - 1], choice[:, t]]
        return states

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n sequences: tokens (n, seq_len) and state labels (n, seq_len), BOS labelled -1."""
        digits = self.spec.seq_len - 1
        states = self.sample_states(n, (digits + 1) // 2, generator)
        tokens = torch.stack([states // 10, states % 10], dim=2).reshape(n, -1)[:, :digits] + 1
        labels = states.repeat_interleave(2, dim=1)[:, :digits]
        bos = torch.full((n, 1), BOS, dtype=torch.long)
        return torch.cat([bos, tokens], 1), torch.cat([torch.full((n, 1), -1), labels], 1)

    def step_batch(self, n: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(n, torch.Generator().manual_seed(_mix(seed, step)))

    @classmethod
    def from_meta(cls, meta: dict[str, Any], where: Path) -> TokFSM:
        """The TokFSM of a checkpoint's cbtool.json (its "task" entry), checked field by field."""
        task = meta["task"]
        fields = {k: task[k] for k in ("num_states", "out_degree", "seq_len", "seed") if k in task}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in fields.values()) or min(
            [fields.get("num_states", 1), fields.get("out_degree", 1), fields.get("seq_len", 2) - 1]
        ) < 1 or fields.get("seq_len", 2) > MAX_SEQ_LEN:
            raise UserError(f"malformed TokFSM task in cbtool.json: {task}")
        try:
            return cls(FSMSpec(**fields))
        except ValueError as e:
            raise UserError(f"malformed TokFSM task in cbtool.json: {e}") from None

    # -- the Task interface (cbtool/tasks/base.py) ----------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.spec.seq_len

    @property
    def train_tokens(self) -> int | None:
        return None  # sequences are generated: unlimited

    def train_batch(self, n: int, seed: int, step: int) -> torch.Tensor:
        return self.step_batch(n, seed, step)[0]

    def evaluate(self, model: CodebookModel, device: torch.device | str, *, samples: int = 512, seed: int = 0,
                 temperature: float = 1.0, blocks: int = 256) -> dict[str, Any]:
        """Loss and transition accuracy with codebooks on and bypassed (`blocks` does not apply)."""
        return evaluate_fsm(model, self, device, num_samples=samples, seed=seed, temperature=temperature)

    def eval_setting(self, result: dict[str, Any]) -> str:
        return f"{result['samples']} samples, T={result['temperature']}"

    def encode(self, text: str) -> list[int]:
        """A digit string (whitespace ignored) -> BOS + one token per digit."""
        digits = "".join(text.split())
        if digits and not (digits.isascii() and digits.isdigit()):
            raise UserError(f"TokFSM prompts are digit strings (e.g. 3719), got {text!r}")
        return [BOS] + [int(c) + 1 for c in digits]

    def corpus(self, path: Path | None = None, text_field: str = "text", num_seqs: int = 2048,
               seed: int = 0, split: str = "all") -> Corpus:
        """`num_seqs` fresh sequences of the analysis stream `seed`, labelled with their states (always
        held out: `split` applies to text checkpoints only)."""
        if split != "all":
            raise UserError("--split applies to text checkpoints; TokFSM stores are always fresh held-out sequences")
        if path is not None:
            if not Path(path).exists():
                raise UserError(f"corpus {path} does not exist")
            raise UserError("text corpora need a checkpoint with a text tokenizer")
        if num_seqs < 1:
            raise UserError(f"empty corpus: --num-seqs must be >= 1, got {num_seqs}")
        spec = {"kind": "tokfsm", **self.spec.to_dict(), "num_seqs": num_seqs, "seed": seed,
                "stream": "held-out", "held_out_seed": HELD_OUT_SEED + seed}
        return Corpus(spec, fsm_documents(self, num_seqs, HELD_OUT_SEED + seed), ["state"],
                      self.token_strings(), num_seqs * self.spec.seq_len)

    def summary(self) -> str:
        s = self.spec
        return f"TokFSM: {s.num_states} states, out-degree {s.out_degree}, sequences of {s.seq_len} tokens"

    def task_meta(self) -> dict[str, Any]:
        return self.spec.to_dict()

    def tokenizer_meta(self) -> dict[str, Any]:
        return {"kind": "tokfsm", "vocab_size": self.vocab_size}

    def files(self) -> dict[str, bytes]:
        return {}

    def transition_accuracy(self, tokens: torch.Tensor) -> tuple[int, int]:
        """Valid and total transitions in digit sequences (n, L), no BOS; returns (valid, total).

        Digits are paired from the start; a pair containing a non-digit token is an invalid state,
        and every transition into or out of it counts as invalid."""
        n, length = tokens.shape
        pairs = tokens[:, : length - length % 2].reshape(n, -1, 2)
        ok = (pairs >= 1).all(-1) & (pairs <= 10).all(-1)
        states = ((pairs[..., 0] - 1) * 10 + (pairs[..., 1] - 1)).clamp(0, 99)
        ok = ok & (states < self.spec.num_states)
        states = states.clamp(max=self.spec.num_states - 1)
        valid = self.adjacency[states[:, :-1], states[:, 1:]] & ok[:, :-1] & ok[:, 1:]
        return int(valid.sum()), valid.numel()

    @staticmethod
    def decode(tokens: list[int]) -> str:
        return "".join("" if t == BOS else str(t - 1) if 1 <= t <= 10 else "?" for t in tokens)

    @staticmethod
    def token_strings() -> list[str]:
        return ["<bos>"] + [str(d) for d in range(10)]


def _mix(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 12345) % (2**63)


# -- documents ----------------------------------------------------------------------------------------
def fsm_document(tokens: np.ndarray, labels: np.ndarray | None = None) -> Document:
    """A TokFSM sequence: text = its digits; BOS covers no characters."""
    tokens = np.asarray(tokens, dtype=np.int64)
    is_digit = (tokens >= 1) & (tokens <= 10)
    ends = np.cumsum(is_digit)
    starts = ends - is_digit
    text = TokFSM.decode(tokens.tolist())
    spans = np.stack([starts, ends], axis=1).astype(np.int64)
    spans[tokens == BOS] = [0, 0]
    return Document(tokens, text, spans, None if labels is None else np.asarray(labels, dtype=np.int64))


def fsm_documents(fsm: TokFSM, num_seqs: int, seed: int, batch: int = 256) -> Iterator[Document]:
    """`num_seqs` fresh TokFSM sequences from a seed (use a held-out seed for analysis)."""
    for i, lo in enumerate(range(0, num_seqs, batch)):
        toks, labels = fsm.batch(min(batch, num_seqs - lo), torch.Generator().manual_seed(seed * 100_003 + i))
        for t, lab in zip(toks.numpy(), labels.numpy(), strict=True):
            yield fsm_document(t, lab)


# -- evaluation ---------------------------------------------------------------------------------------
def fsm_batches(fsm: TokFSM, num_seqs: int, batch_size: int = 64, first_step: int = 0) -> Iterator[torch.Tensor]:
    """Held-out TokFSM sequences (the EVAL_SEED stream) in batches of token ids."""
    for i, lo in enumerate(range(0, num_seqs, batch_size)):
        yield fsm.step_batch(min(batch_size, num_seqs - lo), EVAL_SEED, first_step + i)[0]


@torch.no_grad()
def fsm_accuracy(
    model: CodebookModel, fsm: TokFSM, num_samples: int, device, seed: int = 0,
    digits: int = 64, temperature: float = 1.0, batch_size: int = 256,
) -> float:
    """Share of sampled state transitions that are edges of the FSM (generation from BOS)."""
    digits = min(digits, fsm.spec.seq_len - 1)
    gen = torch.Generator().manual_seed(seed)
    valid = total = 0
    for lo in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - lo)
        prompt = torch.full((n, 1), BOS, dtype=torch.long, device=device)
        out = sample(model, prompt, digits, gen, temperature=temperature)
        v, t = fsm.transition_accuracy(out)
        valid, total = valid + v, total + t
    return valid / max(total, 1)


@torch.no_grad()
def next_state_distribution(model: CodebookModel, prompts: torch.Tensor, device) -> torch.Tensor:
    """Inputs (n, P) ending in a state's two digits -> (n, 100) the model's distribution over the next
    two-digit state: P(d1) at the last position times P(d2 | d1) (each renormalised over the digits)."""
    n = prompts.shape[0]
    logits1, past = model(prompts.to(device))
    past10 = [(k.repeat_interleave(10, 0), v.repeat_interleave(10, 0)) for k, v in past]
    digits = torch.arange(1, 11, device=device).repeat(n).unsqueeze(1)
    logits2, _ = model(digits, past=past10)
    p1 = torch.softmax(logits1[:, -1, 1:11].double().cpu(), -1)
    p2 = torch.softmax(logits2[:, -1, 1:11].double().cpu(), -1).view(n, 10, 10)
    return (p1.unsqueeze(2) * p2).reshape(n, 100)


@torch.no_grad()
def first_transition_accuracy(model: CodebookModel, fsm: TokFSM, device) -> float:
    """The paper's first-transition accuracy (its authors' TokFSM tutorial): for every state s, the
    input `BOS s`; the model's `out_degree` most likely next states; the share of them that are
    edges of s; averaged over the states. Deterministic (no sampling)."""
    s = fsm.spec.num_states
    states = torch.arange(s)
    prompts = torch.cat([torch.full((s, 1), BOS), states.view(-1, 1) // 10 + 1, states.view(-1, 1) % 10 + 1], 1)
    dist = next_state_distribution(model, prompts, device)[:, :s]
    top = dist.topk(fsm.spec.out_degree, dim=-1).indices
    return float(fsm.adjacency[states.view(-1, 1), top].double().mean())


def evaluate_fsm(
    model: CodebookModel, fsm: TokFSM, device, num_samples: int = 512, num_seqs: int = 256,
    seed: int = 0, temperature: float = 1.0,
) -> dict[str, Any]:
    """The 'modest degradation' figure: loss, transition and first-transition accuracy, codebooks on and
    bypassed."""

    def measure() -> dict[str, Any]:
        return {
            "loss": mean_loss(model, fsm_batches(fsm, num_seqs), device),
            "transition_accuracy": fsm_accuracy(model, fsm, num_samples, device, seed, temperature=temperature),
            "greedy_accuracy": fsm_accuracy(model, fsm, min(num_samples, 64), device, seed, temperature=0.0),
            "first_transition_accuracy": first_transition_accuracy(model, fsm, device),
        }

    result = on_vs_bypassed(model, measure, fsm_batches(fsm, num_seqs, first_step=10**6), device)
    result["samples"] = num_samples
    result["temperature"] = temperature
    return result


# TokFSM text for people: digits grouped into their two-digit states, and the share of valid transitions in
# generated text (`cbtool show-code`, `cbtool intervene`). The raw digit strings stay as they are in JSON
# output and for `--regex`.

def valid_transitions(fsm: TokFSM, texts: list[str], prompt_digits: list[int]) -> dict[str, float | int]:
    """Over TokFSM digit strings (each a prompt of `prompt_digits` digits + generated digits), the transitions
    into a state holding a generated digit and the share of them that are edges of the FSM (a pair with a
    non-digit is an invalid state)."""
    valid = total = 0
    n_states = fsm.spec.num_states
    for text, start in zip(texts, prompt_digits, strict=True):
        states = [int(p) if p.isdigit() else None for p in (text[i:i + 2] for i in range(0, len(text) - 1, 2))]
        for i in range(1, len(states)):
            if 2 * i + 1 >= start:  # state i holds a generated digit
                total += 1
                a, b = states[i - 1], states[i]
                valid += int(a is not None and b is not None and a < n_states and b < n_states
                             and bool(fsm.adjacency[a, b]))
    return {"transitions": total, "valid": valid, "rate": valid / total if total else float("nan")}
