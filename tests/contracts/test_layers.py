"""The package's layers, read from its imports with `ast` (module-level, function-level and TYPE_CHECKING imports,
and `importlib.import_module("cbtool...")` with a literal name).

From the bottom up:

    errors, version                              importable by every module
    util                                         the ground: files, locks, JSON, regexes, signals, progress, ranks
    model                                        codebooks, sites, the transformer, Hugging Face bases, devices
    tasks                                        the Task protocol and documents, TokFSM, text, corpora, evaluation
    formats                                      checkpoints, code stores, schemas, sha256 records, store links
    training | embedding | analysis | steering   peers: none imports another
    explanations                                 uses analysis (features, contexts)
    report                                       uses explanations, analysis, training's metrics log
    api                                          the Python API
    commands                                     the CLI's commands
    cli                                          the Typer app
    __init__, __main__                           the top

A module may import its own folder (or, at the package root, itself) and any lower layer, never a higher layer
or a peer of its own layer. A new folder or root module must be placed here before it can pass.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import cbtool

PACKAGE = Path(cbtool.__file__).resolve().parent

LAYERS: list[tuple[str, ...]] = [
    ("errors", "version"),
    ("util",),
    ("model",),
    ("tasks",),
    ("formats",),
    ("training", "embedding", "analysis", "steering"),
    ("explanations",),
    ("report",),
    ("api",),
    ("commands",),
    ("cli",),
    ("__init__", "__main__"),
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """The layer unit of a dotted module name: its folder under cbtool, or the root module's own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, cbtool module) for every import of cbtool in `source`, the module `module`."""
    out: list[tuple[int, str]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target == "cbtool":  # `from cbtool import x`: the submodule x where there is one, else the package
                for a in node.names:
                    sub = PACKAGE / a.name
                    is_module = sub.is_dir() or sub.with_suffix(".py").is_file()
                    out.append((node.lineno, f"cbtool.{a.name}" if is_module else "cbtool"))
            else:
                out.append((node.lineno, target))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name == "import_module" and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return [(line, t) for line, t in out if t == "cbtool" or t.startswith("cbtool.")]


def violations(modules: dict[str, str], packages: frozenset[str] = frozenset()) -> list[str]:
    """Every import of `modules` (dotted name -> source) that goes up or sideways in LAYERS."""
    found = []
    for module, source in sorted(modules.items()):
        unit = unit_of(module)
        if unit not in RANK:
            found.append(f"{module}: {unit!r} is in no layer of tests/contracts/test_layers.py")
            continue
        for line, target in imported(module, source, module in packages):
            other = unit_of(target)
            if other == unit:
                continue
            if other not in RANK:
                found.append(f"{module}:{line}: imports {target}, which is in no layer")
            elif RANK[other] >= RANK[unit]:
                how = "a peer" if RANK[other] == RANK[unit] else "a higher layer"
                found.append(f"{module}:{line}: imports {target} ({other}, {how} of {unit})")
    return found


def package_sources() -> tuple[dict[str, str], frozenset[str]]:
    modules, packages = {}, set()
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            packages.add(".".join(parts))
        modules[".".join(parts)] = f.read_text(encoding="utf-8")
    return modules, frozenset(packages)


def test_no_module_imports_a_higher_layer_or_a_peer():
    modules, packages = package_sources()
    assert len(modules) > 50  # the whole package was read
    assert violations(modules, packages) == []


def test_the_checker_reports_upward_and_sideways_imports():
    bad = {
        "cbtool.util.files": "from cbtool.formats.store import Store\n",  # module level, upward
        "cbtool.model.sites": "def f():\n    import cbtool.report.build\n",  # function level
        "cbtool.tasks.text": "import importlib\nm = importlib.import_module('cbtool.training.trainer')\n",
        "cbtool.analysis.search": "from cbtool.steering import jobs\n",  # a peer
        "cbtool.errors": "from cbtool import util\n",  # errors is the very bottom
        "cbtool.formats.store": "from cbtool import find_codes\n",  # the package's lazy API is the top
        "cbtool.newstage.x": "",  # a folder in no layer
    }
    found = violations(bad)
    for module in bad:
        assert any(v.startswith(module) for v in found), (module, found)
    good = {
        "cbtool.report.build": "from cbtool.explanations import explainer\nfrom cbtool.report.html import render\n",
        "cbtool.analysis.search": "from . import features\nfrom ..formats.store import Store\n",
        "cbtool.cli": "from cbtool.errors import UserError\nfrom cbtool.version import __version__\n",
        "cbtool.__init__": "import importlib\nimportlib.import_module('cbtool.api')\n",
    }
    assert violations(good) == []


def test_every_submodule_imports_and_every_public_name_resolves():
    """Importing every submodule first must not hide a public function behind a subpackage or module of the same
    name (`cbtool.explain` is a function; the folder is `explanations`)."""
    for info in pkgutil.walk_packages(cbtool.__path__, "cbtool."):
        if not info.name.endswith("__main__"):  # that one runs the CLI
            importlib.import_module(info.name)
    for name in cbtool.__all__:
        value = getattr(cbtool, name)
        assert value is not None, name
        assert not isinstance(value, type(cbtool)), f"cbtool.{name} is a module"
    for name in ("explain", "steer", "embed", "find_codes", "train_model", "dead_codes", "code_contexts",
                 "open_store", "load_checkpoint", "load_codebooks", "recover_automaton"):
        assert callable(getattr(cbtool, name)) and not isinstance(getattr(cbtool, name), type(cbtool)), name
