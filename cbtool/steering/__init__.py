"""Steering: interventions on codes, steering jobs, TokFSM steering and state patching (docs/steer.md)."""
