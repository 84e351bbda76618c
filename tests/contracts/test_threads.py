"""Thread policy (docs/cli.md "Threads"): --threads / CBTOOL_THREADS (a number or auto) parsed strictly and
applied to torch and the BLAS pools before torch is imported; by default the libraries' own count (results do
not depend on the load) with OpenMP threads that sleep when they wait on a busy machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cbtool.errors import UserError
from cbtool.util import threads

ROOT = Path(__file__).resolve().parents[2]
STORE = str(ROOT / "fixtures" / "store")


def cbtool(*args: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("CBTOOL_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    return subprocess.run([sys.executable, "-m", "cbtool", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**clean, **env}, timeout=300)


@pytest.mark.parametrize("args, env, says", [
    (["--threads", "0"], {}, "--threads must be auto or a whole number of threads from 1 to 4096, got '0'"),
    (["--threads", "x"], {}, "--threads must be auto or a whole number"),
    ([], {"CBTOOL_THREADS": "two"}, "CBTOOL_THREADS must be auto or a whole number of threads from 1 to 4096, "
                                    "got 'two'"),
    ([], {"CBTOOL_THREADS": "1.5"}, "CBTOOL_THREADS must be auto or a whole number"),
    ([], {"CBTOOL_THREADS": "99999"}, "CBTOOL_THREADS must be auto or a whole number"),
])
def test_bad_thread_counts_are_one_line_and_exit_2(args, env, says):
    proc = cbtool(*args, "info", STORE, **env)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr


def test_parse_and_the_idle_cores():
    assert threads.parse(" 3 ", "--threads") == 3
    assert threads.parse("Auto", "--threads") == "auto"
    with pytest.raises(UserError):
        threads.parse("-1", "--threads")
    assert threads.idle_cores(cpus=2, load=0) == 2  # quiet: every core, as before
    assert threads.idle_cores(cpus=2, load=1) == 1
    assert threads.idle_cores(cpus=2, load=7) == 1  # never fewer than one
    assert threads.idle_cores(cpus=16, load=2, ranks=2) == 7  # the other rank is not someone else's load
    assert threads.idle_cores(cpus=8, load=0.4) == 8


PROBE = ("import sys; sys.argv = ['cbtool', *sys.argv[1:]]\n"
         "from cbtool.util import threads\n"
         "threads.restore = lambda: None  # keep what the command set, to look at it after\n"
         "from cbtool.cli import main\n"
         "try:\n    main()\nexcept SystemExit:\n    pass\n"
         "import os, torch\n"
         "print('PROBE', torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'), file=sys.stderr)\n")


@pytest.mark.parametrize("args, env, n", [
    (["--threads", "1"], {}, 1),
    ([], {"CBTOOL_THREADS": "1"}, 1),
    ([], {"OMP_NUM_THREADS": "1"}, 1),  # the user's own setting is kept
    ([], {}, threads.usable_cpus()),  # the default: every core, whatever the load
    (["--threads", "auto"], {}, None),  # the idle cores: between 1 and every core
])
def test_the_count_reaches_torch(args, env, n):
    clean = {k: v for k, v in os.environ.items() if k not in ("CBTOOL_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    proc = subprocess.run([sys.executable, "-c", PROBE, *args, "info", STORE], capture_output=True, text=True,
                          cwd=ROOT, env={**clean, **env}, timeout=300)
    line = [x for x in proc.stderr.splitlines() if x.startswith("PROBE")][0]
    got = int(line.split()[1])
    assert got == n if n is not None else 1 <= got <= threads.usable_cpus(), proc.stderr
    if got < threads.usable_cpus() and (args or "CBTOOL_THREADS" in env):
        assert line.split()[2] == "PASSIVE"  # fewer threads than cores: OpenMP threads sleep when they wait
