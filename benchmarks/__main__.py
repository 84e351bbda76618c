"""Dispatcher: `python -m benchmarks` lists the benchmarks; `python -m benchmarks NAME [ARGS]` runs one.

A benchmark is any module benchmarks/NAME.py that defines `main(argv: list[str]) -> int | None`.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> dict[str, str]:
    """Benchmark name -> first line of its docstring."""
    here = Path(__file__).parent
    out = {}
    for info in pkgutil.iter_modules([str(here)]):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"benchmarks.{info.name}")
        if callable(getattr(mod, "main", None)):
            out[info.name] = (mod.__doc__ or "").strip().splitlines()[0] if mod.__doc__ else ""
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    names = available()
    if not argv or argv[0] in ("-h", "--help", "list"):
        print("usage: python -m benchmarks NAME [OPTIONS]   (python -m benchmarks NAME --help)\n")
        print("available benchmarks:")
        for name, doc in sorted(names.items()):
            print(f"  {name:<12} {doc}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in names:
        print(f"unknown benchmark {name!r}; available: {', '.join(sorted(names))}", file=sys.stderr)
        return 2
    result = importlib.import_module(f"benchmarks.{name}").main(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
