"""Busy machine: a short k-means and a tiny `train` beside N busy processes vs alone, against the fair share.

Two workloads, each in a fresh process: scikit-learn's MiniBatchKMeans (k-means++ seeding, the TokFSM
default's k-means) on unit-normalised random activations, and `cbtool train --preset tiny`. Each runs under
three thread policies (docs/cli.md "Threads"): `default` is cbtool's (every core; OMP_WAIT_POLICY PASSIVE
when other threads are runnable), `auto` is `--threads auto` (the idle cores, PASSIVE), `earlier` is the
behaviour before the policy (every core, OpenMP's own spin-then-sleep waiting). Beside N processes
that spin on one core each (`--busy 0,2,4`), the wall time is compared with the same workload alone; the
fair slowdown is what a fair scheduler would give a job that had min(cores, threads) cores alone and a
(N+1)-th of the machine now: max(1, min(cores, threads) x (N + 1) / cores). ratio = slowdown / fair (<= 1:
no worse than its share); vs earlier: the policy's wall time over the earlier behaviour's in the same cell.
Times are the min of `--repeats`; the load average is printed beside them (on a machine others already load,
"alone" is not quiet: read the vs-earlier column).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

KMEANS = """
import sys
from cbtool.util import threads
threads.configure(None)
import numpy as np
from sklearn.cluster import MiniBatchKMeans
rng = np.random.default_rng(0)
x = rng.standard_normal((20000, 64)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
MiniBatchKMeans(n_clusters=128, batch_size=4096, n_init=1, max_iter=20, random_state=0).fit(x)
"""


def _spin(stop) -> None:  # one busy core
    while not stop.is_set():
        for _ in range(100_000):
            pass


def _env(policy: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "CBTOOL_THREADS")}
    if policy == "earlier":
        env["OMP_WAIT_POLICY"] = ""  # set, so cbtool leaves it; empty, so OpenMP uses its own default
    elif policy == "auto":
        env["CBTOOL_THREADS"] = "auto"
    return env


def _run(workload: str, policy: str, out: Path) -> float:
    if workload == "kmeans":
        argv = [sys.executable, "-c", KMEANS]
    else:
        argv = [sys.executable, "-m", "cbtool", "train", "--preset", "tiny", "--out", str(out), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=_env(policy), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{workload} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks contention", description=__doc__.splitlines()[0])
    ap.add_argument("--busy", default="0,2", help="numbers of busy processes, comma-separated (default 0,2)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per cell; the min is kept (default 2)")
    ap.add_argument("--workloads", default="kmeans,train", help="kmeans, train or both (default)")
    args = ap.parse_args(argv)
    counts = sorted({int(x) for x in args.busy.split(",")} | {0})
    workloads = args.workloads.split(",")
    cores = os.cpu_count() or 1
    policies = ("default", "auto", "earlier")
    times: dict[tuple[str, str, int], float] = {}
    print(f"{cores} CPUs; load average before {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            stop = mp.Event()
            spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(n)]
            for p in spinners:
                p.start()
            time.sleep(0.5 if n else 0)
            try:
                for _ in range(args.repeats):  # policies interleaved: a change of load hits both
                    for w in workloads:
                        for pol in policies:
                            t = _run(w, pol, Path(tmp) / "ckpt")
                            times[(w, pol, n)] = min(times.get((w, pol, n), float("inf")), t)
            finally:
                stop.set()
                for p in spinners:
                    p.join()
    print(f"load average after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'workload':8s} {'policy':10s} {'busy':>4s} {'wall s':>7s} {'slowdown':>8s} {'fair':>5s} {'ratio':>5s} "
          f"{'vs earlier':>10s}")
    for w in workloads:
        for pol in policies:
            alone = times[(w, pol, 0)]
            threads = cores  # every policy uses every core on a quiet machine
            for n in counts:
                t = times[(w, pol, n)]
                fair = max(1.0, min(cores, threads) * (n + 1) / cores)
                vs = t / times[(w, "earlier", n)]
                print(f"{w:8s} {pol:10s} {n:4d} {t:7.2f} {t / alone:8.2f} {fair:5.2f} {t / alone / fair:5.2f} "
                      f"{vs:10.2f}")
    return 0
