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
    "load_checkpoint": "cbtool.formats.checkpoint",
    "load_codebooks": "cbtool.formats.checkpoint",
    "Checkpoint": "cbtool.formats.checkpoint",
    "train_model": "cbtool.api",
    "TrainConfig": "cbtool.training.config",
    "PRESETS": "cbtool.training.config",
    "embed": "cbtool.api",
    "open_store": "cbtool.formats.store",
    "Store": "cbtool.formats.store",
    "find_codes": "cbtool.analysis.search",
    "dead_codes": "cbtool.analysis.usage",
    "code_contexts": "cbtool.analysis.contexts",
    "explain": "cbtool.explanations.explainer",
    "recover_automaton": "cbtool.explanations.automaton",
    "steer": "cbtool.steering.jobs",
    "Task": "cbtool.tasks.base",
    "TokFSM": "cbtool.tasks.tokfsm",
    "TextTask": "cbtool.tasks.text",
    "Document": "cbtool.tasks.base",
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
    from cbtool.analysis.contexts import code_contexts
    from cbtool.analysis.search import find_codes
    from cbtool.api import embed, train_model
    from cbtool.errors import CheckFailed, UserError
    from cbtool.explanations.automaton import recover_automaton
    from cbtool.explanations.explainer import explain
    from cbtool.formats.checkpoint import Checkpoint, load_checkpoint, load_codebooks
    from cbtool.formats.store import Store, open_store
    from cbtool.steering.jobs import steer
    from cbtool.tasks.base import Document, Task
    from cbtool.tasks.text import TextTask
    from cbtool.tasks.tokfsm import TokFSM
    from cbtool.training.config import PRESETS, TrainConfig


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cbtool' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
