"""TokFSM as docs/definitions.md defines it: 100 states, out-degree 10, 2 digits per state, BOS + digits."""

from __future__ import annotations

import torch

from cbtool.tasks.tokfsm import BOS, FSMSpec, TokFSM


def states_of(tokens: torch.Tensor) -> torch.Tensor:
    """(n, L) digit tokens (no BOS, even L) -> (n, L/2) states read two digits at a time."""
    pairs = tokens.reshape(tokens.shape[0], -1, 2) - 1
    return pairs[..., 0] * 10 + pairs[..., 1]


def test_graph_has_100_states_with_10_distinct_neighbours():
    fsm = TokFSM()
    assert fsm.neighbours.shape == (100, 10)
    assert fsm.neighbours.min() >= 0 and fsm.neighbours.max() < 100
    assert all(len(set(row.tolist())) == 10 for row in fsm.neighbours)
    assert torch.equal(fsm.adjacency.sum(1), torch.full((100,), 10))
    # the neighbour choice is spread over the states, not a fixed pattern
    assert fsm.adjacency.sum(0).max() < 30 and (fsm.adjacency.sum(0) > 0).sum() > 90


def test_graph_is_determined_by_its_seed():
    a, b, c = TokFSM(FSMSpec(seed=0)), TokFSM(FSMSpec(seed=0)), TokFSM(FSMSpec(seed=1))
    assert torch.equal(a.neighbours, b.neighbours)
    assert not torch.equal(a.adjacency, c.adjacency)


def test_sequences_are_bos_then_digit_pairs_with_state_labels():
    fsm = TokFSM()
    tokens, labels = fsm.batch(16, torch.Generator().manual_seed(0))
    assert tokens.shape == labels.shape == (16, 128)
    assert (tokens[:, 0] == BOS).all() and (labels[:, 0] == -1).all()
    digits = tokens[:, 1:]
    assert digits.min() >= 1 and digits.max() <= 10  # digit tokens only after BOS
    states = states_of(digits[:, :126])
    # both tokens of a state carry that state's label; the odd last digit is the start of a state
    assert torch.equal(labels[:, 1:127:2], states) and torch.equal(labels[:, 2:128:2], states)
    assert torch.equal((labels[:, 127] // 10) + 1, tokens[:, 127])
    # consecutive states are edges of the graph
    assert fsm.adjacency[states[:, :-1], states[:, 1:]].all()
    assert fsm.decode(tokens[0].tolist()) == "".join(str(int(t) - 1) for t in digits[0])


def test_transitions_are_uniform_over_neighbours():
    fsm = TokFSM()
    tokens, _ = fsm.batch(400, torch.Generator().manual_seed(1))
    states = states_of(tokens[:, 1:127])
    src, dst = states[:, :-1].reshape(-1), states[:, 1:].reshape(-1)
    slot = (fsm.neighbours[src] == dst.unsqueeze(1)).float().argmax(1)
    share = torch.bincount(slot, minlength=10).float() / slot.numel()
    assert (share - 0.1).abs().max() < 0.01  # 25,000 transitions: each neighbour ~10%


def test_transition_accuracy_of_true_and_corrupted_sequences():
    fsm = TokFSM()
    tokens, _ = fsm.batch(8, torch.Generator().manual_seed(2))
    digits = tokens[:, 1:127]
    valid, total = fsm.transition_accuracy(digits)
    assert total == 8 * 62 and valid == total
    bad = digits.clone()
    gen = torch.Generator().manual_seed(3)
    # replace every 4th state by a state that is not an out-neighbour of its predecessor
    for row in range(8):
        for s in range(2, 62, 4):
            prev = int(states_of(bad[row : row + 1])[0, s - 1])
            options = (~fsm.adjacency[prev]).nonzero().squeeze(1)
            new = int(options[torch.randint(0, len(options), (1,), generator=gen)])
            bad[row, 2 * s], bad[row, 2 * s + 1] = new // 10 + 1, new % 10 + 1
    v_bad, t_bad = fsm.transition_accuracy(bad)
    assert t_bad == total and v_bad <= total - 8 * 15  # at least the 15 broken edges per row
    assert v_bad / t_bad < 0.8
    # a non-digit token makes its state invalid
    with_bos = digits.clone()
    with_bos[:, 10] = BOS
    v_bos, _ = fsm.transition_accuracy(with_bos)
    assert v_bos == total - 2 * 8


def test_step_batch_is_a_pure_function_of_seed_and_step():
    fsm = TokFSM()
    a, b = fsm.step_batch(4, seed=5, step=7), fsm.step_batch(4, seed=5, step=7)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], fsm.step_batch(4, seed=5, step=8)[0])
    assert not torch.equal(a[0], fsm.step_batch(4, seed=6, step=7)[0])
