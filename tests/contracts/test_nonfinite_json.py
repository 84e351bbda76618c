"""No NaN or Infinity literal is ever written (cbtool/util/strict_json.py `dumps`): a diverged run stops with one
line and leaves its last checkpoint readable; a metric that is not a finite number is stored as null and
`info` reads it back."""

from __future__ import annotations

import json
import math

from cbtool.formats.checkpoint import load_checkpoint
from cbtool.training.start import start_training
from cbtool.util.strict_json import loads
from tests.helpers import run_cli


def test_a_diverged_run_stops_with_one_line_and_its_checkpoint_reads_back(tmp_path):
    out = tmp_path / "ck"
    res = run_cli("train", "--preset", "tiny", "--device", "cpu", "--out", out, "--lr", "1e30",
                  "--checkpoint-every", 1)
    errors = [line for line in res.stderr.splitlines() if line.startswith("cbtool: error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    assert "training diverged; try a lower --lr" in errors[0]
    saved = int(errors[0].split("the last checkpoint, step ")[1].split(",")[0])
    assert load_checkpoint(out).meta["training"]["step"] == saved >= 1
    info = run_cli("info", out, "--json")
    assert info.exit_code == 0 and loads(info.stdout, "info --json")["training"]["step"] == saved
    assert not list(tmp_path.glob(".*lock"))


def test_non_finite_metrics_are_written_as_null_and_read_back(tmp_path):
    out = tmp_path / "ck"
    trainer = start_training(out, "tiny", device="cpu", base_steps=2, steps=2, kmeans_seqs=4)
    results = trainer.run()
    results["on"] = {**results["on"], "loss": math.nan}  # as a diverged evaluation would report them
    results["bypassed"] = {**results["bypassed"], "loss": math.inf}
    results["final_train_loss"] = -math.inf
    trainer.save(results)
    text = (out / "cbtool.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    stored = loads(text, "cbtool.json")["training"]["results"]
    assert stored["on"]["loss"] is None and stored["bypassed"]["loss"] is None and stored["final_train_loss"] is None
    assert stored["on"]["transition_accuracy"] == results["on"]["transition_accuracy"]
    info = run_cli("info", out, "--json")
    assert info.exit_code == 0, info.stderr
    assert loads(info.stdout, "info --json")["training"]["results"]["on"]["loss"] is None
    shown = run_cli("info", out)
    assert shown.exit_code == 0 and "loss (nats/token) n/a" in shown.stdout, shown.stderr
    json.loads(run_cli("eval", out, "--json", "--samples", 8).stdout)  # eval's document is JSON too
