"""CLI start-up: wall time of `cbtool --help`, `dead-codes` and `find-codes` on a small store, fresh processes.

Each command runs `--runs` times in a new interpreter (`python -m cbtool ...`, output to /dev/null), the commands
interleaved round by round so that a change in load hits all of them; the table gives min and median wall
seconds and whether torch was imported (one more run with `-X importtime`, its log read from stderr).
Also `python -c pass` and `python -c "import torch"` as the floor and the cost torch would add. The load
average is printed beside the figures: on a busy machine read the min. Target (docs/cli.md "Start-up"):
<= 0.5 s on a quiet machine. `--store DIR` times another store (default: the committed fixtures/store).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.5


def commands(store: str) -> dict[str, list[str]]:
    py = sys.executable
    return {
        "python -c pass": [py, "-c", "pass"],
        "python -c 'import torch'": [py, "-c", "import torch"],
        "cbtool --help": [py, "-m", "cbtool", "--help"],
        "cbtool dead-codes STORE": [py, "-m", "cbtool", "dead-codes", store],
        "cbtool find-codes STORE --labels state": [py, "-m", "cbtool", "find-codes", store, "--labels", "state"],
    }


def once(argv: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "COLUMNS": "120"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return wall


def imports_torch(argv: list[str]) -> bool:
    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "120"})
    return any(line.rpartition("|")[2].strip() == "torch" for line in proc.stderr.splitlines())


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks startup", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="fresh processes per command (default 7)")
    ap.add_argument("--store", default=str(ROOT / "fixtures" / "store"), help="the store to read")
    args = ap.parse_args(argv)
    cmds = commands(args.store)
    times: dict[str, list[float]] = {name: [] for name in cmds}
    torch = {name: imports_torch(cmd) for name, cmd in cmds.items()}
    load0 = os.getloadavg()
    for _ in range(args.runs):
        for name, cmd in cmds.items():
            times[name].append(once(cmd))
    load1 = os.getloadavg()
    print(f"load average (1 min) {load0[0]:.2f} before, {load1[0]:.2f} after; {os.cpu_count()} CPUs; "
          f"{args.runs} runs each; python {sys.version.split()[0]}")
    print(f"{'command':42s} {'min s':>7s} {'median s':>9s}  torch")
    worst = 0.0
    for name, ts in times.items():
        print(f"{name:42s} {min(ts):7.3f} {statistics.median(ts):9.3f}  {'yes' if torch[name] else 'no'}")
        if name.startswith("cbtool"):
            worst = max(worst, min(ts))
    print(f"slowest cbtool command (min): {worst:.3f} s; target <= {TARGET_S} s on a quiet machine")
    return 0
