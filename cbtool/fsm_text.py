"""TokFSM text for people: digits grouped into their two-digit states, and the share of valid transitions in
generated text (`cbtool show-code`, `cbtool intervene`). The raw digit strings stay as they are in JSON
output and for `--regex`."""

from __future__ import annotations

from cbtool.tokfsm import TokFSM


def group_states(digits: str, first: int = 0) -> str:
    """`digits` with a space before every state: `first` is the index of digits[0] among the sequence's digits
    (BOS not counted), so state i is digits 2i and 2i+1. `group_states("37190", 1)` -> `"3 71 90"`."""
    out = []
    for i, ch in enumerate(digits):
        if i and (first + i) % 2 == 0:
            out.append(" ")
        out.append(ch)
    return "".join(out)


def group_context(left: str, token: str, right: str, position: int) -> tuple[str, str, str]:
    """A show-code context (`left` + `token` + `right` of a TokFSM document, the token at `position` in the
    document, BOS at 0) with its states separated by spaces; a leading `<bos>` in `left` is kept."""
    bos = ""
    if left.startswith("<bos>"):
        bos, left = "<bos> ", left[len("<bos>"):]
    q = position - 1  # the firing token's digit index
    g_left = group_states(left, q - len(left))
    if left and q % 2 == 0:
        g_left += " "
    g_right = group_states(right, q + 1)
    if right and (q + 1) % 2 == 0:
        g_right = " " + g_right
    return bos + g_left, token, g_right


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
