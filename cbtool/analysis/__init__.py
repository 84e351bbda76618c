"""Analysis of a code store: features, scoring, search, neurons, usage, contexts and similar codes (docs/analyse.md)."""
