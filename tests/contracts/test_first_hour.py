"""What a newcomer sees in the first hour: progress lines, readable logs and help, consistent summaries,
TokFSM output grouped into states, small finished checkpoints, run directories that can be copied."""

from __future__ import annotations

import io
import json
import re
import shutil
import time
from pathlib import Path

import click
import typer
from rich.console import Console
from safetensors.torch import load_file

from cbtool.cli import app
from cbtool.model.sites import CodebookModel
from cbtool.tasks.tokfsm import FSMSpec, TokFSM, group_context, group_states, valid_transitions
from cbtool.util import progress
from tests.helpers import run_cli

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def test_progress_prints_a_plain_line_at_least_every_interval(monkeypatch):
    monkeypatch.setenv("CBTOOL_PROGRESS_SECONDS", "0.1")
    buf = io.StringIO()
    progress.enable(Console(file=buf, force_terminal=False, width=200))
    try:
        with progress.track("k-means insertion", 4, "codebooks") as bar:
            bar.advance(1)
            time.sleep(0.6)  # a silent step: the heartbeat still reports
            bar.advance(1)
    finally:
        progress.enable(None)
    lines = [line for line in buf.getvalue().splitlines() if line]
    assert len(lines) >= 2, lines
    assert re.match(r"k-means insertion: 1/4 codebooks, [\d.,]+ codebooks/s, elapsed \d+s, ETA \d+s", lines[0])


def test_progress_is_silent_unless_enabled(capsys, monkeypatch):
    monkeypatch.setenv("CBTOOL_PROGRESS_SECONDS", "0.05")
    assert run_cli("info", FIXTURES / "tokfsm").exit_code == 0  # the CLI enables progress only while it runs
    with progress.track("eval", 2, "parts") as bar:
        time.sleep(0.3)
        bar.advance(2)
    assert bar.done == 2 and capsys.readouterr().err == ""


def test_training_log_keeps_its_phase_and_smooths(tmp_path, monkeypatch):
    monkeypatch.setenv("CBTOOL_PROGRESS_SECONDS", "3600")  # only the every-100-steps lines
    out = tmp_path / "ck"
    res = run_cli("train", "--preset", "tiny", "--base-steps", 100, "--steps", 10, "--out", out, "--device", "cpu",
                  "--checkpoint-every", 0)
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith(("base:", "codebook:"))]
    # each phase counts its own steps, as the header says ("100 base + 10 codebook steps")
    assert lines[0].startswith("base: 100/100 steps") and lines[-1].startswith("codebook: 10/10 steps")
    for key in ("loss", "acc", "tok/s", "elapsed", "ETA"):
        assert f" {key} " in lines[-1]
    assert f"-> {out}" in res.stderr.splitlines()[0]  # the header on one line, however long the path
    # a finished checkpoint keeps no optimizer moments
    state = load_file(str(out / "train_state.safetensors"))
    assert "trainer.step" in state and not any(k.startswith("opt.") for k in state)


def test_help_shows_defaults_and_every_option_has_help():
    res = run_cli("train", "--help")
    assert res.exit_code == 0
    text = " ".join(res.stdout.split())
    assert "<bool>" not in text and "(default: 900)" in text and "(default: 0.mlp=4000)" in text
    group = typer.main.get_command(app)
    missing = [f"{name} {p.name}" for name, cmd in group.commands.items() for p in cmd.params
               if isinstance(p, click.Option) and not p.help]
    assert not missing


def test_label_table_top_and_consistent_summary():
    res = run_cli("find-codes", FIXTURES / "store", "--labels", "state", "--top", 3, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert len(doc["rows"]) == 3
    f1 = [r["f1"] for r in doc["rows"]]
    assert f1 == sorted(f1, reverse=True)
    good = doc["summary"]["values_with_precision_0.9"]
    assert good >= max(site["values_with_precision_0.9"] for site in doc["per_site"].values())
    assert good >= doc["summary"]["best_codes_with_precision_0.9"]
    table = run_cli("find-codes", FIXTURES / "store", "--labels", "state", "--top", 3)
    assert "3 of " in table.stdout and "precision" in table.stdout and "preci…" not in table.stdout


def test_tokfsm_digits_are_grouped_into_states():
    assert group_states("37190", 1) == "3 71 90"
    assert group_context("<bos>45", "1", "57", 3) == ("<bos> 45 ", "1", "5 7")
    usage = json.loads(run_cli("dead-codes", FIXTURES / "store", "--sites", "1.mlp", "--json").stdout)
    res = run_cli("show-code", FIXTURES / "store", usage["sites"][0]["most_used"][0]["code"], "--examples", 2,
                  "--context", 6)
    assert res.exit_code == 0, res.output
    assert re.search(r"\d\d \d", res.stdout)


def test_valid_transitions_count_generated_states():
    fsm = TokFSM(FSMSpec())
    a, b = 12, int(fsm.neighbours[12][0])
    bad = next(s for s in range(100) if not fsm.adjacency[b, s])
    got = valid_transitions(fsm, [f"{a:02d}{b:02d}{bad:02d}"], [2])
    assert got == {"transitions": 2, "valid": 1, "rate": 0.5}


def test_intervene_reports_valid_transitions_and_code_meaning(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "tokfsm", run / "checkpoint")
    assert run_cli("embed", "--run", run, "--num-seqs", 4).exit_code == 0
    res = run_cli("intervene", "--run", run, "--code", "1.mlp:3", "--prompt", "3719", "-n", 2,
                  "--max-new-tokens", 6)
    assert res.exit_code == 0, res.output
    assert "1.mlp:3: " in res.stdout and "valid FSM transitions" in res.stdout
    assert "37 19" in res.stdout


def test_a_copied_run_directory_finds_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "tokfsm", run / "checkpoint")
    assert run_cli("embed", "--run", run, "--num-seqs", 2).exit_code == 0
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    shutil.rmtree(run)
    res = run_cli("info", moved / "codes", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["checkpoint_status"] == "unchanged"
    res = run_cli("dead-codes", "--run", moved)
    assert res.exit_code == 0 and "not available" not in res.stderr


def test_info_prints_fields_not_dicts():
    res = run_cli("info", FIXTURES / "tokfsm")
    assert res.exit_code == 0
    task = next(line for line in res.stdout.splitlines() if line.startswith("task"))
    assert "{" not in task and "num_states=100" in task


def test_embed_reports_progress_in_a_log(tmp_path, monkeypatch):
    monkeypatch.setenv("CBTOOL_PROGRESS_SECONDS", "0.05")
    forward = CodebookModel.forward

    def slow_forward(self, *args, **kwargs):  # a batch that takes longer than the heartbeat, as on a real model
        time.sleep(0.1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(CodebookModel, "forward", slow_forward)
    res = run_cli("embed", FIXTURES / "tokfsm", "--num-seqs", 64, "--batch-size", 8, "--out", tmp_path / "codes",
                  "--device", "cpu")
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("embedding:")]
    assert lines, res.stderr  # a plain line, not a terminal bar: stderr is not a terminal here
    assert re.match(r"embedding: [\d,]+/4,096 tokens, [\d,.]+ tokens/s", lines[-1]) and "elapsed" in lines[-1]
