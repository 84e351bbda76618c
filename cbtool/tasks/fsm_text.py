"""TokFSM digit strings grouped into states for display, without torch (show-code prints them; tokfsm.py
re-exports these)."""

from __future__ import annotations


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
