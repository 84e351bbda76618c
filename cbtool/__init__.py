"""cbtool: train, store, search and steer codebook features (arXiv 2310.17230).

The public API is what `__all__` lists (docs/api.md). Names are imported on first use, so
`import cbtool` stays cheap and the command line starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from cbtool.version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "load_checkpoint": "cbtool.checkpoint",
    "load_codebooks": "cbtool.checkpoint",
    "Checkpoint": "cbtool.checkpoint",
    "train_model": "cbtool.api",
    "TrainConfig": "cbtool.train",
    "PRESETS": "cbtool.train",
    "embed": "cbtool.api",
    "open_store": "cbtool.store",
    "Store": "cbtool.store",
    "find_codes": "cbtool.search",
    "dead_codes": "cbtool.usage",
    "code_contexts": "cbtool.contexts",
    "explain": "cbtool.explanations",
    "recover_automaton": "cbtool.automaton",
    "steer": "cbtool.steer_jobs",
    "Task": "cbtool.task",
    "TokFSM": "cbtool.tokfsm",
    "TextTask": "cbtool.text",
    "Document": "cbtool.corpus",
    "UserError": "cbtool.errors",
    "CheckFailed": "cbtool.errors",
}
__all__ = [
    "__version__", "load_checkpoint", "load_codebooks", "Checkpoint", "train_model", "TrainConfig", "PRESETS",
    "embed", "open_store", "Store", "find_codes", "dead_codes", "code_contexts", "explain", "recover_automaton",
    "steer", "Task", "TokFSM", "TextTask", "Document",
    "UserError", "CheckFailed",
]

if TYPE_CHECKING:
    from cbtool.api import embed, train_model
    from cbtool.automaton import recover_automaton
    from cbtool.checkpoint import Checkpoint, load_checkpoint, load_codebooks
    from cbtool.contexts import code_contexts
    from cbtool.corpus import Document
    from cbtool.errors import CheckFailed, UserError
    from cbtool.explanations import explain
    from cbtool.search import find_codes
    from cbtool.steer_jobs import steer
    from cbtool.store import Store, open_store
    from cbtool.task import Task
    from cbtool.text import TextTask
    from cbtool.tokfsm import TokFSM
    from cbtool.train import PRESETS, TrainConfig


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cbtool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
