"""TokFSM, the paper's finite-state-machine data (DESIGN.md "Definitions").

100 states, each with 10 distinct out-neighbours drawn uniformly from a seeded generator, uniform
transition probabilities. A state is written as two digit tokens; a sequence is BOS + digits;
each token's label is the state it belongs to (BOS: -1). Batches are a pure function of
(seed, step), so training resumes on exactly the data it would have seen.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

BOS = 0
VOCAB_SIZE = 11  # BOS + digits 0-9 (token = digit + 1)


@dataclass(frozen=True)
class FSMSpec:
    num_states: int = 100
    out_degree: int = 10
    seq_len: int = 128  # BOS + 127 digits
    seed: int = 0  # the FSM's own seed (its graph), independent of the training seed

    def to_dict(self) -> dict:
        return {"name": "tokfsm", **asdict(self)}


class TokFSM:
    def __init__(self, spec: FSMSpec = FSMSpec()) -> None:
        if spec.num_states > 100 or spec.out_degree > spec.num_states:
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
