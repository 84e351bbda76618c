"""How many threads a command computes with (docs/cli.md "Threads").

By default every usable core, as torch and the BLAS libraries choose by themselves: the thread count changes
the rounding of float sums, so a default that followed the load would make two runs of one `train` (or a run
and its `--resume`) differ. What changes with the load is how idle threads wait: on a busy machine (threads
of other processes runnable now) OMP_WAIT_POLICY is PASSIVE unless the user set it, so OpenMP threads that
wait for a core others hold sleep instead of spinning and taking time from everyone. On a quiet machine
nothing changes.

`--threads N` (before the command) or `CBTOOL_THREADS=N` sets the number; `auto` takes the cores that are
not busy: the usable CPUs (`os.sched_getaffinity`) less the threads runnable right now besides this one
(/proc/loadavg's 4th field, the median of 3 reads 1 ms apart; the 1-minute load average where there is no
/proc, which lags a minute behind the machine), at least 1, shared by the ranks of this machine under
torchrun (LOCAL_WORLD_SIZE). A number or `auto` is applied before torch is imported (read-only commands
never import it): OMP_NUM_THREADS and MKL_NUM_THREADS, which torch's and scikit-learn's OpenMP pools read
when they load, the BLAS pools already loaded (numpy's) through threadpoolctl, and torch.set_num_threads
when torch is already in the process. Without either, a thread count the user set (OMP_NUM_THREADS, or
torch.set_num_threads in a process that runs commands in-process) is left as it is.
"""

from __future__ import annotations

import os
import sys
import time

from cbtool.errors import UserError

ENV = "CBTOOL_THREADS"
MAX_THREADS = 4096

_chosen: dict[str, object] = {}


def parse(text: str, source: str) -> int | str:
    """`auto` or a thread count, a whole number 1..4096 (`source` names where it came from, for the error)."""
    value = text.strip()
    if value.lower() == "auto":
        return "auto"
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_THREADS:
        raise UserError(f"{source} must be auto or a whole number of threads from 1 to {MAX_THREADS}, got {text!r}")
    return int(value)


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def busy() -> float:
    """Threads runnable now besides this one (see the module docstring); 0 when unknown."""
    try:
        reads = []
        for i in range(3):
            if i:
                time.sleep(0.001)
            with open("/proc/loadavg", encoding="ascii") as f:
                reads.append(int(f.read().split()[3].split("/")[0]) - 1)
        return float(max(0, sorted(reads)[1]))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def idle_cores(cpus: int | None = None, load: float | None = None, ranks: int = 1) -> int:
    """The cores not `busy()` (CPUs less the load, rounded), shared by `ranks`; at least 1."""
    cpus = usable_cpus() if cpus is None else cpus
    load = busy() if load is None else load
    load = max(0.0, load - (ranks - 1))  # the other ranks of this job are not someone else's load
    free = min(cpus, max(1, int(cpus - load + 0.5)))
    return max(1, free // max(1, ranks))


def _local_ranks() -> int:
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def choose(option: str | None) -> tuple[int | None, str]:
    """(threads, why): --threads, else CBTOOL_THREADS (a number, or `auto`: the idle cores); (None, "default")
    leaves the count to the libraries."""
    if option is not None:
        value, why = parse(str(option), "--threads"), "--threads"
    elif os.environ.get(ENV, "").strip():  # set and empty counts as unset, as for CBTOOL_RUN
        value, why = parse(os.environ[ENV], ENV), ENV
    else:
        return None, "default"
    if value == "auto":
        return idle_cores(ranks=_local_ranks()), f"{why} auto"
    return int(value), why


def configure(option: str | None = None) -> int | None:
    """Apply --threads / CBTOOL_THREADS and the waiting policy (see the module docstring); the count, or None
    when the libraries choose it."""
    n, why = choose(option)
    restore()  # a second command in the same process starts from the user's settings
    _chosen["env"] = {var: os.environ.get(var) for var in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    cpus = usable_cpus()
    if (n is not None and n < cpus) or busy() > 0:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _chosen.update(threads=n, why=why)
    if n is None:
        return None
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        _chosen["torch"] = torch.get_num_threads()
        torch.set_num_threads(n)
    try:  # numpy's BLAS pool was sized to every core when numpy loaded
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - scikit-learn brings it
        pass
    else:
        _chosen["limits"] = threadpool_limits(limits=n)
    return n


def restore() -> None:
    """Undo `configure` (the CLI calls it when a command ends, for callers that run several in one process)."""
    env = _chosen.pop("env", None)
    if isinstance(env, dict):
        for var, value in env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
    limits = _chosen.pop("limits", None)
    if limits is not None:
        limits.restore_original_limits()  # type: ignore[attr-defined]
    before = _chosen.pop("torch", None)
    torch = sys.modules.get("torch")
    if isinstance(before, int) and torch is not None:
        torch.set_num_threads(before)
    _chosen.pop("threads", None)
    _chosen.pop("why", None)


def chosen() -> tuple[int | None, str] | None:
    """The (threads, why) that `configure` applied in this process, if it ran."""
    if "why" not in _chosen:
        return None
    return _chosen["threads"], str(_chosen["why"])  # type: ignore[return-value]
