"""Explanations: symbolic hypotheses per code, character classes, literal matching and the TokFSM automaton
(docs/explain.md)."""
