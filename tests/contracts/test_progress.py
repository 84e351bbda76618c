"""Progress lines (cbtool/util/progress.py): one tracker per phase, whose total is the phase's as the header
says, a finished phase never reprinted while the next runs, and rates in units that read."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from cbtool.util import progress


def test_rates_below_one_per_second_read_as_time_per_item():
    assert progress.rate(12.3, "steps") == "12 steps/s"
    assert progress.rate(1.5, "steps") == "1.5 steps/s"
    assert progress.rate(0.25, "codebooks") == "4.0 s/codebook"
    assert progress.rate(0.5, "site choices") == "2.0 s/site choice"
    assert progress.rate(1 / 150, "codebooks") == "2m30s/codebook"
    t = progress.Tracker("k-means insertion", 4, "codebooks", done=1)
    t.rate = 0.2
    assert "1/4 codebooks, 5.0 s/codebook" in t.describe()


def test_training_prints_each_phase_with_its_own_total_and_stops_it(tmp_path):
    env = {**os.environ, "CBTOOL_PROGRESS_SECONDS": "0.05", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cbtool", "train", "--preset", "tiny", "--out", str(tmp_path / "c")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    base, steps = (int(x) for x in re.search(r"(\d+) base \+ (\d+) codebook steps", proc.stderr).groups())
    totals = {"base": base, "codebook": steps}
    seen = []
    for line in lines:
        m = re.match(r"(base|codebook|k-means insertion): (\d+)/(\d+) ", line)
        if m:
            phase, done, total = m.group(1), int(m.group(2)), int(m.group(3))
            if phase in totals:
                assert total == totals[phase], line
                assert done <= total, line
            if not seen or seen[-1] != phase:
                seen.append(phase)
    assert seen == ["base", "k-means insertion", "codebook"], seen  # each phase's lines once, in order
    assert f"base: {base}/{base} steps" in proc.stderr and f"codebook: {steps}/{steps} steps" in proc.stderr
