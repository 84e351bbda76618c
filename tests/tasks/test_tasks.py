"""One task type: info, eval, embed, show-code and intervene behave the same on TokFSM and text checkpoints
(pretrained bases: tests/model/test_hf.py), and every training option is declared once (TrainConfig)."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from cbtool.formats.checkpoint import load_checkpoint
from cbtool.tasks.base import Task
from cbtool.tasks.text import TextTask
from cbtool.tasks.tokfsm import TokFSM
from cbtool.training.config import TrainConfig, cli_fields, make_config
from tests.helpers import run_cli

pytest.importorskip("tokenizers", reason="the `text` extra (tokenizers) is not installed")

TEXT = ("In January the snow lay deep; in February the rivers froze. Thou art fair, and thy voice is sweet. "
        "The king spoke to his lords, and they answered him with one voice.\n") * 40


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint_master, tmp_path_factory) -> dict[str, tuple]:
    """A TokFSM and a text checkpoint, each with the corpus its store is embedded from."""
    d = tmp_path_factory.mktemp("tasks")
    corpus = d / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    text = d / "text"
    res = run_cli("train", "--corpus", corpus, "--preset", "tiny", "--base-steps", "10", "--steps", "4",
                  "--sites", "1.mlp", "--out", text, "--device", "cpu")
    assert res.exit_code == 0, res.output
    return {"tokfsm": (tiny_checkpoint_master, ["--num-seqs", "8"], "1"),
            "text": (text, [], "January")}


@pytest.mark.parametrize("kind", ["tokfsm", "text"])
def test_checkpoint_task_is_a_task(checkpoints, kind):
    ck = load_checkpoint(checkpoints[kind][0])
    assert isinstance(ck.task, Task) and ck.task.name == kind
    assert isinstance(ck.task, TokFSM if kind == "tokfsm" else TextTask)
    assert ck.task.vocab_size <= ck.model.base.config.vocab_size
    ids = ck.task.encode(checkpoints[kind][2])
    assert ids and ck.task.decode(ids).endswith(checkpoints[kind][2])
    assert ck.meta["task"]["name"] == kind and ck.meta["tokenizer"] == ck.task.tokenizer_meta()


@pytest.mark.parametrize("kind", ["tokfsm", "text"])
def test_commands_work_the_same_on_every_task(checkpoints, kind, tmp_path):
    ck, embed_args, prompt = checkpoints[kind]
    res = run_cli("info", ck)
    assert res.exit_code == 0, res.output  # text checkpoints used to crash here on transition_accuracy
    metrics = load_checkpoint(ck).task.metrics
    first = next(iter(metrics.values()))[0]
    assert f"codebooks on       {first}" in res.stdout
    res = run_cli("eval", ck, "--json", "--device", "cpu", "--samples", "8", "--blocks", "2")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert set(doc["on"]) == set(metrics) and set(doc["bypassed"]) == set(metrics)
    res = run_cli("eval", ck, "--device", "cpu", "--samples", "8", "--blocks", "2")
    assert res.exit_code == 0 and "codebooks bypassed" in res.stdout and "share of codes" in res.stdout
    store = tmp_path / "codes"
    res = run_cli("embed", ck, "--out", store, "--device", "cpu", "--max-tokens", "512", "--json", *embed_args)
    assert res.exit_code == 0, res.output  # text: with no --corpus, the corpus it was trained on
    emb = json.loads(res.stdout)
    assert emb["complete"] and 0 < emb["tokens"] <= 512
    res = run_cli("info", store, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["checkpoint_status"] == "unchanged"
    site = emb["sites"][-1]
    counts = json.loads(run_cli("dead-codes", store, "--sites", site, "--json").stdout)["sites"][0]
    ref = counts["most_used"][0]["code"]
    res = run_cli("show-code", store, ref, "--json", "--examples", "2")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["fires"] == counts["most_used"][0]["fires"]
    res = run_cli("intervene", ck, "--code", ref, "--prompt", prompt, "-n", "2", "--max-new-tokens", "3",
                  "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    steer = json.loads(res.stdout)
    assert steer["samples"] == 2 and all(ex["prompt"] == prompt for ex in steer["examples"])


def test_fsm_eval_needs_a_tokfsm_checkpoint(checkpoints):
    res = run_cli("intervene", checkpoints["text"][0], "--fsm-eval", "--pairs", "2", "--device", "cpu")
    assert res.exit_code == 2 and "TokFSM" in res.stderr


def test_every_cli_training_option_is_a_documented_config_field():
    help_text = run_cli("train", "--help").stdout
    assert all(f.metadata["help"] for f in fields(TrainConfig))  # every setting is documented
    for f in cli_fields():
        flag = (f.metadata["flag"] or "--" + f.name.replace("_", "-")).split("/")[0]
        assert flag in help_text, flag
    cfg = make_config("tiny", num_codes=7, train_base=True, seed=None)
    assert (cfg.num_codes, cfg.train_base, cfg.seed, cfg.task) == (7, True, 0, "tokfsm")
    assert make_config("tiny", corpus="x.txt").task == "text"
    with pytest.raises(Exception, match="unknown training option"):
        make_config("tiny", num_kodes=7)


def test_cli_option_reaches_the_checkpoint_config(tmp_path):
    out = tmp_path / "ck"
    res = run_cli("train", "--preset", "tiny", "--base-steps", "3", "--steps", "2", "--num-codes", "9",
                  "--codebook-lr", "0.004", "--freeze-base", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "cbtool.json").read_text())["training"]["config"]
    assert (cfg["num_codes"], cfg["codebook_lr"], cfg["train_base"], cfg["base_steps"]) == (9, 0.004, False, 3)
