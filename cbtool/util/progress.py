"""Progress of long steps: a live bar on a terminal, otherwise a plain line on stderr at least every
`heartbeat_seconds()` (30 s; `CBTOOL_PROGRESS_SECONDS` changes it), each with the phase, the count done,
a smoothed rate, the elapsed time and an ETA.

Library code reports through `track(...)` wherever it may run for more than a few seconds (k-means
insertion, evaluation, state patching, batched generation, loading a pretrained base); nothing is shown
until a front end calls `enable(console)` (the CLI does, with its stderr console), so library callers
stay quiet unless they ask for it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from cbtool.util.limits import env_seconds

SMOOTHING_SECONDS = 10.0  # time constant of the rate's exponential moving average

_state: dict[str, object] = {"console": None}
_lock = threading.Lock()
_active: list[Tracker] = []
_live: dict[str, object] = {}  # the rich Progress (terminal) or the heartbeat thread, while trackers run


def heartbeat_seconds() -> float:
    return max(0.05, env_seconds("CBTOOL_PROGRESS_SECONDS", 30.0))


def enable(console: Console | None) -> None:
    """Show progress on `console` (None: show nothing, the default)."""
    _state["console"] = console


def live() -> bool:
    """Whether a live bar is on screen now (then plain log lines would only disturb it)."""
    return isinstance(_live.get("bar"), Progress)


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Tracker:
    """One phase's progress: `advance(n, **fields)`; `fields` (e.g. a smoothed loss) are shown after the rate."""

    def __init__(self, phase: str, total: float | None, unit: str, done: float = 0) -> None:
        self.phase, self.total, self.unit = phase, total, unit
        self.done = self.start_done = done
        self.t0 = self.last_line = time.perf_counter()
        self.rate: float | None = None
        self.fields: dict[str, str] = {}
        self._mark = (self.t0, done)
        self.task_id: object = None

    def advance(self, n: float = 1, phase: str | None = None, **fields: str) -> None:
        now = time.perf_counter()
        self.done += n
        if phase is not None:
            self.phase = phase
        self.fields.update(fields)
        t, d = self._mark
        if now > t:
            inst = (self.done - d) / (now - t)
            w = 1.0 - math.exp(-(now - t) / SMOOTHING_SECONDS)
            self.rate = inst if self.rate is None else self.rate + w * (inst - self.rate)
            self._mark = (now, self.done)
        _refresh(self)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self) -> float:
        if self.total is None or not self.rate:
            return math.nan
        return max(0.0, self.total - self.done) / self.rate

    def describe(self) -> str:
        """`kmeans: 3/20 sites, 0.8 sites/s, elapsed 4s, ETA 21s, ...` (no markup)."""
        count = f"{_num(self.done)}/{_num(self.total)}" if self.total is not None else _num(self.done)
        parts = [f"{self.phase}: {count} {self.unit}"]
        if self.rate is not None:
            parts.append(rate(self.rate, self.unit))
        parts += [f"{k} {v}" for k, v in self.fields.items()]
        parts.append(f"elapsed {duration(self.elapsed)}")
        if self.total is not None:
            parts.append(f"ETA {duration(self.eta())}")
        return ", ".join(parts)

    def log_line(self) -> None:
        """Print `describe()` now as a plain line (only when progress is enabled and not live on a terminal)."""
        console = _state["console"]
        if isinstance(console, Console) and not isinstance(_live.get("bar"), Progress):
            console.print(self.describe(), markup=False, highlight=False, soft_wrap=True)
        self.last_line = time.perf_counter()


def rate(per_second: float, unit: str) -> str:
    """`12 steps/s`, `1.5 steps/s`; below one a second, the time per item: `3.4 s/codebook`."""
    if 0 < per_second < 1:
        one = unit[:-1] if unit.endswith("s") and not unit.endswith("ss") else unit
        return f"{duration(1 / per_second) if per_second < 1 / 60 else f'{1 / per_second:.1f} s'}/{one}"
    return f"{_num(per_second, rate=True)} {unit}/s"


def _num(x: float | None, rate: bool = False) -> str:
    if x is None:
        return "?"
    if rate and x < 10:
        return f"{x:.2f}" if x < 1 else f"{x:.1f}"
    return f"{x:,.0f}"


@contextmanager
def track(phase: str, total: float | None = None, unit: str = "steps", done: float = 0) -> Iterator[Tracker]:
    """A tracker for one phase, shown while the block runs (see the module docstring)."""
    tracker = Tracker(phase, total, unit, done)
    console = _state["console"]
    if not isinstance(console, Console):
        yield tracker
        return
    with _lock:
        _active.append(tracker)
        if not _live:
            _start(console)
        bar = _live.get("bar")
        if isinstance(bar, Progress):
            tracker.task_id = bar.add_task(tracker.describe(), total=total, completed=done)
    try:
        yield tracker
    finally:
        with _lock:
            _active.remove(tracker)
            bar = _live.get("bar")
            if isinstance(bar, Progress) and tracker.task_id is not None:
                bar.remove_task(tracker.task_id)  # type: ignore[arg-type]
            if not _active:
                _stop()


def _start(console: Console) -> None:
    if console.is_terminal:
        bar = Progress(TextColumn("{task.description}", markup=False), BarColumn(), console=console,
                       transient=True, refresh_per_second=4)
        bar.start()
        _live["bar"] = bar
        return
    stop = threading.Event()
    every = heartbeat_seconds()  # read here: a bad $CBTOOL_PROGRESS_SECONDS is one error line, not a thread's

    def beat() -> None:
        while not stop.wait(min(every, 1.0)):
            with _lock:
                due = [t for t in _active if time.perf_counter() - t.last_line >= every]
            for t in due:
                t.log_line()

    thread = threading.Thread(target=beat, name="cbtool-progress", daemon=True)
    _live.update(stop=stop, thread=thread)
    thread.start()


def _stop() -> None:
    bar = _live.get("bar")
    if isinstance(bar, Progress):
        bar.stop()
    stop = _live.get("stop")
    if isinstance(stop, threading.Event):
        stop.set()
    _live.clear()


def _refresh(tracker: Tracker) -> None:
    bar = _live.get("bar")
    if isinstance(bar, Progress) and tracker.task_id is not None:
        bar.update(tracker.task_id, description=tracker.describe(), completed=tracker.done)  # type: ignore[arg-type]
