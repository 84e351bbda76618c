"""`cbtool intervene` through the real CLI on the tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_json_summary_and_determinism(tiny_checkpoint_master):
    args = ("intervene", tiny_checkpoint_master, "--code", "1:3", "--prompt", "3719", "-n", "5",
            "--max-new-tokens", "12", "--seed", "7", "--device", "cpu", "--json")
    doc = _json(run_cli(*args))
    assert doc["kind"] == "intervene" and doc["schema_version"] == 1
    assert doc["samples"] == 5
    assert doc["interventions"] == [{"code": "1.mlp:3", "mode": "force"}]  # bare layer = its MLP site
    assert [e["seed"] for e in doc["examples"]] == [7, 8, 9, 10, 11]
    assert all(len(e["steered"]) == 12 and len(e["baseline"]) == 12 for e in doc["examples"])
    assert _json(run_cli(*args)) == doc


def test_jsonl_rows_and_rich_view(tiny_checkpoint_master, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("37\n\n194455\n")
    res = run_cli("intervene", tiny_checkpoint_master, "--code", "0.mlp:5", "--mode", "add", "--strength",
                  "30", "--prompts", prompts, "-n", "3", "--max-new-tokens", "6", "--jsonl")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [(r["prompt"], r["sample"]) for r in rows] == [("37", 0), ("37", 1), ("37", 2),
                                                           ("194455", 0), ("194455", 1), ("194455", 2)]
    assert len({r["seed"] for r in rows}) == 6
    assert any(r["steered"] != r["baseline"] for r in rows)  # a strong add changes generations
    view = run_cli("intervene", tiny_checkpoint_master, "--code", "0.mlp:5", "--prompt", "37", "-n", "2",
                   "--max-new-tokens", "4")
    assert view.exit_code == 0 and "steered" in view.stdout and "baseline" in view.stdout


def test_spec_rows_carry_their_own_interventions(tiny_checkpoint_master, tmp_path):
    spec = tmp_path / "spec.jsonl"
    spec.write_text(
        json.dumps({"prompt": "37", "codes": ["0.mlp:5"], "mode": "add", "strength": 30, "seed": 11}) + "\n"
        + json.dumps({"prompt": "37", "codes": [], "seed": 11}) + "\n"
        + json.dumps({"prompt": "4", "codes": ["1.attn.h0:2"], "mode": "ablate"}) + "\n"
    )
    res = run_cli("intervene", tiny_checkpoint_master, "--spec", spec, "-n", "2", "--max-new-tokens", "10",
                  "--jsonl")
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["row"] for r in rows] == [1, 1, 2, 2, 3, 3]
    assert [r["seed"] for r in rows[:4]] == [11, 12, 11, 12]
    assert rows[4]["interventions"] == [{"code": "1.attn.h0:2", "mode": "ablate"}]
    # row 2 has no intervention: steered == its twin; and it equals row 1's baseline (same prompt/seed)
    assert all(r["steered"] == r["baseline"] for r in rows[2:4])
    assert [r["baseline"] for r in rows[:2]] == [r["baseline"] for r in rows[2:4]]
    assert any(r["steered"] != r["baseline"] for r in rows[:2])


def test_regex_rates_and_require_gain(tiny_checkpoint_master):
    base = ("intervene", tiny_checkpoint_master, "--code", "1.mlp:3", "-n", "6", "--max-new-tokens", "4")
    doc = _json(run_cli(*base, "--regex", "[0-9]", "--json"))
    assert doc["steered"]["matches"] == doc["steered"]["samples"] == 6  # every digit string matches
    assert doc["steered"]["rate"] == 1.0 and doc["gain"] == 0.0
    lo, hi = doc["steered"]["ci95"]
    assert 0.5 < lo < 1.0 and hi == 1.0
    failed = run_cli(*base, "--regex", "[0-9]", "--require-gain", "0.1")
    assert failed.exit_code == 1 and "--require-gain" in failed.stderr
    assert run_cli(*base, "--regex", "[0-9]", "--require-gain", "0").exit_code == 0
    jl = run_cli(*base, "--regex", "^5", "--jsonl")
    rows = [json.loads(line) for line in jl.stdout.splitlines()]
    assert all(r["steered_match"] == r["steered"].startswith("5") for r in rows)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--code", "9.mlp:1"), "unknown site"),
        (("--code", "1.mlp:64"), "out of range"),
        (("--code", "1.mlp:1", "--code", "1.mlp:2"), "k=1"),
        (("--code", "1.mlp:1", "--mode", "boost"), "--mode"),
        (("--code", "1.mlp:1", "--positions", "middle"), "--positions"),
        (("--code", "1.mlp:1", "--prompt", "12a"), "digit"),
        (("--code", "1.mlp:1", "--regex", "("), "invalid regex"),
        (("--code", "1.mlp:1", "--require-gain", "0.1"), "needs --regex"),
        (("--prompt", "12"), "no intervention"),
        (("--code", "1.mlp:1", "--max-new-tokens", "500"), "context"),
    ],
)
def test_bad_input_exits_2(tiny_checkpoint_master, args, needle):
    res = run_cli("intervene", tiny_checkpoint_master, *args)
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1


def test_bad_files_exit_2(tiny_checkpoint_master, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    res = run_cli("intervene", tiny_checkpoint_master, "--code", "1.mlp:1", "--prompts", empty)
    assert res.exit_code == 2 and "empty" in res.stderr
    spec = tmp_path / "bad.jsonl"
    for line, needle in [('{"prompt": "1"}\n{"prompt": 3}', "row 2"),
                         ('{"prompt": "1"}\n\nnot json', "row 3"),
                         ('{"prompt": "1", "codes": ["1.mlp:999"]}', "row 1"),
                         ('{"prompt": "1", "mode": "zap"}', "row 1"), ('{"prompt": "1", "sede": 3}', "sede")]:
        spec.write_text(line)
        res = run_cli("intervene", tiny_checkpoint_master, "--spec", spec)
        assert res.exit_code == 2, (line, res.output)
        assert needle in res.stderr, (line, res.stderr)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_exits_2(tiny_checkpoint_master):
    res = run_cli("intervene", tiny_checkpoint_master, "--code", "1.mlp:1", "--device", "cuda")
    assert res.exit_code == 2 and "CUDA" in res.stderr


def test_fsm_eval_steering_json(tiny_checkpoint_master):
    doc = _json(run_cli("intervene", tiny_checkpoint_master, "--fsm-eval", "--fsm-mode", "steering", "--pairs", "10",
                        "--code-seqs", "8", "--json"))
    assert doc["kind"] == "intervene-fsm" and doc["pairs"] == 10
    assert [r["sites"] for r in doc["table"]] == ["none", "attention", "mlp", "all"]
    view = run_cli("intervene", tiny_checkpoint_master, "--fsm-eval", "--fsm-mode", "steering", "--pairs", "5",
                   "--code-seqs", "4")
    assert view.exit_code == 0, view.output
    assert "attention" in view.stdout and "mlp" in view.stdout
    assert run_cli("intervene", tiny_checkpoint_master, "--fsm-eval", "--code", "1:1").exit_code == 2
