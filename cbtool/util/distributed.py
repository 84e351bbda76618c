"""Several processes, one result: torch.distributed as `torchrun` starts it (docs/scaling.md).

`torchrun --nproc-per-node N -m cbtool COMMAND ...` starts N copies of a command with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in their environment; `init` joins them into one process group
(gloo for CPU tensors, NCCL for CUDA tensors when CUDA is present). Without those variables everything
here is a no-op on a world of one, so the same code runs in one process.

The rules every command follows:
- every rank runs the same arguments: `agree` compares a hash of them on all ranks (exit 2 on every
  rank when they differ);
- work is split by index (`World.shards`, `World.rows`) and the partial results are summed exactly
  (`all_reduce_*` on integers, or float sums whose order is fixed);
- only rank 0 writes files and prints results; errors print one line on every rank (`tag`);
- a failed collective (a peer died) is a `RankFailure`: one line, exit 2, nothing half-written.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import select
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from cbtool.errors import UserError, first_line
from cbtool.util.limits import env_int, env_seconds

MAX_WORLD = 2**20  # ranks of one job
WAIT_NOTE_S = 5.0  # joining the other ranks: say so when it takes longer than this
TIMEOUT_ENV = "CBTOOL_DIST_TIMEOUT"  # seconds a collective may wait for the other ranks (default 1800)
T = TypeVar("T")

if TYPE_CHECKING:
    import torch


def _dist():  # torch.distributed, imported only when ranks meet: one process never imports torch here
    import torch.distributed as dist

    return dist


class RankFailure(UserError):
    """Another rank died or stopped: this rank stops too, with one line (exit 2)."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shards(self, n: int) -> range:
        """This rank's share of n shards: every size-th index, starting at the rank."""
        return range(self.rank, n, self.size)

    def owns(self, index: int) -> bool:
        return index % self.size == self.rank

    def rows(self, n: int) -> slice:
        """This rank's contiguous slice of n rows (n must be divisible by size: `check_divides`)."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


_world = World()


def world() -> World:
    """The current world: set by `init`, else one process."""
    return _world


def requested_size() -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun)."""
    return env_int("WORLD_SIZE", 1, low=1, high=MAX_WORLD)


def init() -> World:
    """Join the process group torchrun describes in the environment (once per process). A world of one
    when WORLD_SIZE is unset or 1."""
    global _world
    if _world.active:
        return _world
    size = requested_size()
    if size <= 1:
        return _world
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UserError(f"WORLD_SIZE={size} but {', '.join(missing)} is not set: launch with torchrun")
    rank = env_int("RANK", 0, low=0, high=MAX_WORLD)
    if rank >= size:  # a stale environment: no peer would ever come
        raise UserError(f"$RANK={rank} but $WORLD_SIZE={size}: a rank must be below the world size")
    local_rank = env_int("LOCAL_RANK", 0, low=0, high=MAX_WORLD)
    timeout = timedelta(seconds=env_seconds(TIMEOUT_ENV, 1800.0))
    import torch

    dist = _dist()
    backend = "gloo"
    if torch.cuda.is_available():  # CPU tensors (counts, hashes) still travel by gloo
        torch.cuda.set_device(local_rank)
        backend = "cpu:gloo,cuda:nccl"
    note = (f"cbtool: rank {rank}/{size}: waiting for the other ranks at {os.environ['MASTER_ADDR']}:"
            f"{os.environ['MASTER_PORT']} (up to {timeout.total_seconds():g} s, ${TIMEOUT_ENV}; Ctrl-C stops)\n")
    try:
        _interruptible(lambda: dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout), note)
    except (RuntimeError, ValueError) as e:
        raise UserError(f"cannot join the process group of {size} ranks: {first_line(e)}") from None
    _world = World(rank, size)
    signal.signal(signal.SIGTERM, _stopped)
    atexit.register(_leave)
    return _world


def _interruptible(wait: Callable[[], None], note: str) -> None:
    """Run `wait` (a blocking call inside torch that Python signal handlers cannot interrupt), printing `note`
    on stderr when it takes more than WAIT_NOTE_S; SIGINT or SIGTERM meanwhile ends the process at once with
    one line and exit 130 / 143 (the C-level handler still writes the signal's number to the wake-up fd,
    which a thread watches)."""
    if threading.current_thread() is not threading.main_thread():
        wait()
        return
    r, w = os.pipe()
    os.set_blocking(w, False)
    done = threading.Event()

    def watch() -> None:
        if not select.select([r], [], [], WAIT_NOTE_S)[0] and not done.is_set():
            os.write(2, note.encode())
        while True:
            data = os.read(r, 1)
            if done.is_set() or not data:
                return
            if data[0] in (signal.SIGINT, signal.SIGTERM):
                name = signal.Signals(data[0]).name
                os.write(2, f"cbtool: interrupted by {name} while waiting for the other ranks\n".encode())
                os._exit(128 + data[0])

    try:
        previous = signal.set_wakeup_fd(w)
    except ValueError:  # pragma: no cover - not the main thread of the main interpreter
        os.close(r)
        os.close(w)
        wait()
        return
    watcher = threading.Thread(target=watch, name="cbtool-rank-wait", daemon=True)
    watcher.start()
    try:
        wait()
    finally:
        signal.set_wakeup_fd(previous)
        done.set()
        os.write(w, b"\0")
        watcher.join(timeout=5)
        os.close(w)
        os.close(r)


def _leave() -> None:
    """At a normal exit: meet the other ranks (briefly), then close the group. Left to the interpreter's
    teardown, gloo could meet a peer that had already gone and abort the process (rc -6) after its work was
    done. A rank that fails leaves with os._exit (cbtool/cli.py) and never gets here."""
    dist = _dist()
    if not dist.is_initialized():
        return
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=60))
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving anyway; the work and its output are complete
        pass


def _stopped(signum: int, frame: Any) -> None:
    raise RankFailure("stopped by SIGTERM (torchrun stops every rank when one fails)")


def tag() -> str:
    """'rank R/N: ' under torchrun (error lines say which rank printed them), else ''."""
    return f"rank {_world.rank}/{_world.size}: " if _world.active else ""


@contextmanager
def _collective(what: str) -> Iterator[None]:
    dist = _dist()
    try:
        yield
    except (RuntimeError, dist.DistError) as e:  # gloo/NCCL: a peer closed its connection or timed out
        raise RankFailure(f"another rank failed or stopped during {what} ({first_line(e)}); "
                          f"nothing more was written") from None


# -- collectives: each returns its input unchanged in a world of one -------------------------------
def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks: sum or max."""
    if _world.active:
        dist = _dist()
        with _collective("an all-reduce"):
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def all_reduce_np(a: np.ndarray) -> np.ndarray:
    """The sum of an integer or float array over all ranks (exact for integers)."""
    if not _world.active:
        return a
    import torch

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64 if a.dtype.kind in "iub" else np.float64))
    return all_reduce(t.clone()).numpy().astype(a.dtype, copy=False)


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In place: every rank gets rank `src`'s values."""
    if _world.active:
        with _collective("a broadcast"):
            _dist().broadcast(t, src)
    return t


def barrier() -> None:
    if _world.active:
        with _collective("a barrier"):
            _dist().barrier()


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's tensor concatenated along dim 0 in rank order (the sizes may differ)."""
    if not _world.active:
        return t
    import torch

    n = all_gather_equal(torch.tensor([t.shape[0]], device=t.device))
    sizes = [int(x) for x in n.view(-1)]
    pad = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=t.device)
    pad[: t.shape[0]] = t
    parts = all_gather_equal(pad)
    return torch.cat([parts[r, : sizes[r]] for r in range(_world.size)])


def all_gather_equal(t: torch.Tensor) -> torch.Tensor:
    """(size, *t.shape): every rank's tensor of the same shape, stacked in rank order."""
    if not _world.active:
        return t.unsqueeze(0)
    import torch

    out = [torch.empty_like(t) for _ in range(_world.size)]
    with _collective("an all-gather"):
        _dist().all_gather(out, t.contiguous())
    return torch.stack(out)


def gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-able value, in rank order (sent as UTF-8 bytes: no pickle)."""
    if not _world.active:
        return [obj]
    import torch

    data = torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)
    sizes = [int(x) for x in all_gather_equal(torch.tensor([data.numel()])).view(-1)]
    pad = torch.zeros(max(sizes), dtype=torch.uint8)
    pad[: data.numel()] = data
    parts = all_gather_equal(pad)
    return [json.loads(bytes(parts[r, : sizes[r]].numpy()).decode("utf-8")) for r in range(_world.size)]


# -- rules ---------------------------------------------------------------------------------------
def agree(arguments: Any, what: str = "the command's arguments") -> None:
    """Refuse on every rank (exit 2) unless all ranks were given the same `arguments` (any JSON-able value;
    compared by a sha256 of its JSON)."""
    if not _world.active:
        return
    import torch

    digest = hashlib.sha256(json.dumps(arguments, sort_keys=True, default=str).encode("utf-8")).digest()
    hashes = all_gather_equal(torch.frombuffer(bytearray(digest), dtype=torch.uint8))
    differ = [r for r in range(_world.size) if not torch.equal(hashes[r], hashes[0])]
    if differ:
        raise UserError(f"ranks disagree on {what}: rank(s) {', '.join(map(str, differ))} differ from rank 0; "
                        f"launch every rank with the same arguments")


def check_divides(n: int, what: str) -> None:
    """Refuse (exit 2, the same line on every rank) when `n` does not split evenly over the ranks."""
    if n % _world.size:
        raise UserError(f"{what} {n} is not divisible by the {_world.size} ranks (WORLD_SIZE); "
                        f"choose a multiple of {_world.size}")


def main_first(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0, then on the other ranks once rank 0 has finished (e.g. creating a directory
    that the others then open)."""
    if _world.is_main:
        value = fn()
        barrier()
        return value
    barrier()
    return fn()
