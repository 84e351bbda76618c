"""Topic steering as the paper runs it (docs/steer.md), end to end on a tiny model through the real CLI:
the built-in model's shape from the command line, the context-use check, context codes by `find-codes
--window`, a head's whole code set into `intervene --one-site`, 200 new tokens, fluency beside the twins."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from cbtool.analysis.context_use import context_use
from cbtool.analysis.features import window_after
from cbtool.formats.checkpoint import load_checkpoint
from cbtool.steering.interventions import continuation_logprobs, generate_with_twins
from cbtool.steering.jobs import make_jobs, steer
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SEA = r"(?i)\b(sea|ship|storm)\b"


def _corpus(path: Path) -> Path:
    """Stories of two topics, one per line (documents), so topic words cluster in context."""
    rng = random.Random(0)
    words = {"sea": ["sea", "ship", "storm", "wave", "sailor"], "war": ["war", "battle", "sword", "drum", "army"]}
    filler = ["the", "and", "a", "then", "we", "saw", "came", "home", "old", "man", "in", "night"]
    lines = []
    for i in range(160):
        topic = words["sea" if i % 2 else "war"]
        lines.append(" ".join(rng.choice(topic) if rng.random() < 0.25 else rng.choice(filler) for _ in range(60)))
    path.write_text("\n\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def topic_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("topic")
    corpus = _corpus(root / "stories.txt")
    res = run_cli("train", "--preset", "tiny", "--corpus", corpus, "--layers", "1", "--heads", "4", "--d-model", "32",
                  "--sites", "attn-heads", "--k", "4", "--num-codes", "32", "--seq-len", "232", "--base-steps", "20",
                  "--steps", "5", "--run", root / "run", "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = run_cli("embed", "--run", root / "run", "--split", "train", "--device", "cpu")
    assert res.exit_code == 0, res.output
    return root


def test_shape_options_build_the_model(topic_run):
    meta = json.loads((topic_run / "run" / "checkpoint" / "cbtool.json").read_text())
    config = meta["training"]["config"]
    assert config["model"]["n_layer"] == 1 and config["model"]["n_head"] == 4 and config["model"]["d_model"] == 32
    assert config["model"]["block_size"] == 233  # --seq-len + 1
    ckpt = load_checkpoint(topic_run / "run" / "checkpoint", device="cpu")
    assert sorted(ckpt.model.sites) == [f"0.attn.h{h}" for h in range(4)]
    assert len(ckpt.model.base.layers) == 1


def test_window_after_by_hand():
    firsts = np.zeros(10, dtype=bool)
    firsts[[1, 6]] = True
    # documents [0, 5) and [5, 10): a match at 1 covers 2, 3 (window 2); at 6 covers 7, 8; never 5 (other doc)
    assert np.flatnonzero(window_after(firsts, np.array([0, 5, 10]), 2)).tolist() == [2, 3, 7, 8]
    firsts[4] = True  # the last token of its document covers nothing
    assert np.flatnonzero(window_after(firsts, np.array([0, 5, 10]), 3)).tolist() == [2, 3, 4, 7, 8, 9]


def test_window_feature_is_the_tokens_after_each_match(topic_run):
    store = topic_run / "run" / "codes"
    first = json.loads(run_cli("find-codes", store, "--regex", SEA, "--match-on", "first", "--json", "--top", "0",
                               "--examples", "0").stdout)
    doc = json.loads(run_cli("find-codes", store, "--regex", SEA, "--window", "8", "--sort", "precision",
                             "--min-count", "20", "--json", "--top", "0").stdout)
    assert doc["window"] == 8
    # every match is followed by up to 8 tokens of its document: more tokens than matches, fewer than 8x
    assert first["feature_tokens"] < doc["feature_tokens"] <= 8 * first["feature_tokens"]
    assert all(r["fires"] >= 20 for r in doc["rows"])
    precisions = [r["precision"] for r in doc["rows"]]
    assert precisions == sorted(precisions, reverse=True)


def test_one_site_forces_a_heads_whole_code_set_for_200_tokens(topic_run, tmp_path):
    run = topic_run / "run"
    found = tmp_path / "codes.jsonl"
    res = run_cli("find-codes", "--run", run, "--regex", SEA, "--window", "8", "--sort", "precision", "--top", "0",
                  "--jsonl")
    assert res.exit_code == 0, res.output
    found.write_text(res.stdout)
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    best_site = rows[0]["site"]
    expected = [r["code"] for r in rows if r["site"] == best_site][:4]
    res = run_cli("intervene", "--run", run, "--codes-from", found, "--pick", "4", "--one-site", "-n", "6",
                  "--max-new-tokens", "200", "--regex", SEA, "--fluency", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [iv["code"] for iv in doc["interventions"]] == expected
    assert all(iv["mode"] == "force" for iv in doc["interventions"])
    assert doc["max_new_tokens"] == 200 and doc["samples"] == 6
    assert set(doc["steered"]) >= {"rate", "ci95"} and set(doc["baseline"]) >= {"rate", "ci95"}
    flu = doc["fluency"]
    assert flu["steered"]["n"] == flu["baseline"]["n"] == 6
    assert math.isfinite(flu["steered"]["mean"]) and math.isfinite(flu["baseline"]["mean"])
    # each sample's fluency is its generated tokens' log-probability under the unsteered model, recomputed here
    ckpt = load_checkpoint(run / "checkpoint", device="cpu")
    codes = [iv["code"] for iv in doc["interventions"]]
    got = steer(ckpt, codes, ["the"], samples=2, max_new_tokens=30, seed=3, fluency=True, device="cpu")
    jobs, _ = make_jobs(ckpt, {"spec": None, "mode": "force", "strength": 1.0, "seed": 3, "samples": 2,
                               "codes": codes, "prompts_file": None, "prompt": ["the"]})
    steered, twins = generate_with_twins(ckpt.model, jobs, 30, device="cpu")
    prompts = [j.prompt for j in jobs]
    for label, ids in (("steered", steered), ("baseline", twins)):
        direct = continuation_logprobs(ckpt.model, prompts, ids)
        assert [r[f"{label}_logprob"] for r in got["rows"]] == pytest.approx(direct, abs=1e-4)
    # best-sites 2: two heads' code sets, 4 codes each, from the two best sites
    res = run_cli("intervene", "--run", run, "--codes-from", found, "--pick", "4", "--best-sites", "2", "-n", "1",
                  "--max-new-tokens", "4", "--json", "--device", "cpu")
    sites = [iv["code"].rpartition(":")[0] for iv in json.loads(res.stdout)["interventions"]]
    assert len(sites) == 8 and len(set(sites)) == 2 and sites[0] == best_site


def test_continuation_logprobs_by_hand(topic_run):
    ckpt = load_checkpoint(topic_run / "run" / "checkpoint", device="cpu")
    prompt, cont = [3, 5, 7], [11, 13]
    with torch.no_grad():
        logits, _ = ckpt.model(torch.tensor([prompt + cont]))
    logp = torch.log_softmax(logits[0].float(), -1)
    want = float((logp[2, 11] + logp[3, 13]) / 2)
    # alone and left-padded beside a longer row: the same value
    assert continuation_logprobs(ckpt.model, [prompt], [cont])[0] == pytest.approx(want, abs=1e-5)
    got = continuation_logprobs(ckpt.model, [prompt, [1] * 9], [cont, [2, 2, 2]])
    assert got[0] == pytest.approx(want, abs=1e-4)


def test_context_use_counts_and_gain(topic_run, tmp_path):
    topics = tmp_path / "topics.txt"
    topics.write_text("# two topics\nsea: (?i)\\b(sea|ship|storm)\\b\nwar: (?i)\\b(war|battle|sword)\\b\n")
    res = run_cli("eval", "--run", topic_run / "run", "--context-use", topics, "--context-window", "20", "--json",
                  "--blocks", "2", "--device", "cpu")
    assert res.exit_code == 0, res.output
    cu = json.loads(res.stdout)["context_use"]
    for label in ("on", "bypassed"):
        for r in cu[label]["topics"].values():
            assert r["with"] > 0 and r["without"] >= 0
            if r["gain"] is not None:
                assert r["gain"] == pytest.approx(r["logprob_with"] - r["logprob_without"])
    # recount by hand for one topic: matches (first tokens) at >= window with another match in the window
    ckpt = load_checkpoint(topic_run / "run" / "checkpoint", device="cpu")
    docs = list(ckpt.task.corpus(split="heldout").documents)
    ckpt.model.set_enabled(False)
    mine = context_use(ckpt.model, docs, {"sea": r"(?i)\b(sea|ship|storm)\b"}, 20, "cpu")
    ckpt.model.set_enabled(True)
    assert mine["topics"]["sea"] == cu["bypassed"]["topics"]["sea"]
    total = 0
    for d in docs:
        import re

        starts = [m.start() for m in re.finditer(r"(?i)\b(sea|ship|storm)\b", d.text)]
        firsts = [int(np.flatnonzero(d.spans[:, 1] > s)[0]) for s in starts]
        total += sum(f >= 20 for f in firsts)
    assert mine["topics"]["sea"]["with"] + mine["topics"]["sea"]["without"] == total


@pytest.mark.parametrize("args, needle", [
    (("find-codes", "--window", "0", "--regex", "sea"), "--window must be a positive"),
    (("find-codes", "--window", "100000", "--regex", "sea"), "reaches past every document"),
    (("find-codes", "--window", "5", "--labels", "x"), "--window N takes --regex"),
    (("intervene", "--one-site", "-n", "1"), "needs --codes-from"),
    (("intervene", "--codes-from", "CODES", "--pick", "5", "--one-site", "-n", "1"), "more codes than site"),
    (("intervene", "--codes-from", "CODES", "--one-site", "--per-site", "-n", "1"), "give one of them"),
    (("eval", "--context-use", "NOSEA"), "never occur"),
    (("eval", "--context-use", "BADLINE"), "expected 'NAME: REGEX'"),
    (("train", "--preset", "context", "--layers", "4"), "conflicts with it"),
    (("train", "--preset", "tiny", "--task", "text", "--heads", "3", "--d-model", "32"), "not a multiple of --heads"),
    (("train", "--base-model", "some-dir", "--layers", "2"), "has its own shape"),
])
def test_bad_input_exits_2(topic_run, tmp_path, args, needle):
    run = topic_run / "run"
    codes = tmp_path / "codes.jsonl"
    codes.write_text(run_cli("find-codes", "--run", run, "--regex", SEA, "--top", "0", "--jsonl").stdout)
    (tmp_path / "nosea.txt").write_text("unicorn: \\bunicorn\\b\n")
    (tmp_path / "bad.txt").write_text("just a regex\n")
    subst = {"CODES": codes, "NOSEA": tmp_path / "nosea.txt", "BADLINE": tmp_path / "bad.txt"}
    full = [subst.get(a, a) for a in args]
    needs_run = full[0] in ("find-codes", "intervene", "eval")
    res = run_cli(*full, *(("--run", run) if needs_run else ("--run", tmp_path / "r")))
    assert res.exit_code == 2, res.output
    assert needle in res.stderr and "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1
