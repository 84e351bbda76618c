"""Two gloo ranks on the CPU, started the way torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
the results equal one process (docs/scaling.md); bad launches stop every rank with one line.

Training at the same global batch is compared within a tolerance, not bit for bit: the two ranks average two
half-batch gradients where one process takes the mean over the whole batch, so the same float numbers are
added in another order. Measured after the 12 steps below: 8e-6 on any weight without revival, 1.2e-4 with a
revival every 3 steps (revived codes are copies of token activations, which differ by rounding, and move fast
in their first steps). Everything discrete (data slices, k-means, the firing counts that decide revival, the
revival sample) is the same, so the weights stay within TOLERANCE while no near-tie flips a selection.
Resuming after a rank is killed is compared bit for bit with the uninterrupted two-rank run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import run_cli

TOLERANCE = 1e-3  # max |difference| of any weight, 2 ranks vs 1 process (weights are O(1)); see above
TRAIN_JOB = """
import os, signal, sys
from cbtool.util import distributed
from cbtool.cli import _fail
from cbtool.errors import UserError
from cbtool.training.trainer import Trainer
from cbtool.training.start import start_training
die_at = int(sys.argv[5]) if len(sys.argv) > 5 else 0
if die_at:  # this rank is SIGKILLed once step `die_at`'s checkpoint is written
    save = Trainer.save
    def save_then_die(self, results):
        save(self, results)
        if self.step == die_at:
            os.kill(os.getpid(), signal.SIGKILL)
    Trainer.save = save_then_die
try:
    distributed.init()
    t = start_training(sys.argv[1], "tiny", resume=sys.argv[2] == "resume", overwrite=True, device="cpu",
                       checkpoint_every=int(sys.argv[3]), dead_window=int(sys.argv[4]), base_steps=0, steps=12,
                       log_every=3, seed=3)
    t.run()
except UserError as e:  # as `cbtool train` ends (cbtool/cli.py): one line, exit 2
    _fail(str(e), 2)
"""
SEARCH_JOB = """
import json, sys
from cbtool import code_contexts, dead_codes, find_codes, open_store
from cbtool.util import distributed
distributed.init()
store = open_store(sys.argv[1])
docs = [find_codes(store, labels="state"), find_codes(store, regex="4[0-9]", top=0),
        find_codes(store, labels="state", label="7"), dead_codes(store),
        code_contexts(store, sys.argv[2], examples=5)]
if distributed.world().is_main:
    print(json.dumps(docs))
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], ranks: int = 2, per_rank: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
    """`ranks` processes of `python ARGS` (+ per-rank extra arguments) with torchrun's environment."""
    port = _port()
    procs = []
    for r in range(ranks):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(r),
               "LOCAL_RANK": str(r), "WORLD_SIZE": str(ranks), "CBTOOL_DIST_TIMEOUT": "600", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, *args, *(per_rank or {}).get(r, [])], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 1200) -> list[tuple[int, str, str]]:
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outs, strict=True)]


def train(out: Path, ranks: int, dead_window: int, checkpoint_every: int = 0, resume: bool = False) -> None:
    args = ["-c", TRAIN_JOB, str(out), "resume" if resume else "new", str(checkpoint_every), str(dead_window)]
    if ranks == 1:
        subprocess.run([sys.executable, *args], check=True, capture_output=True, timeout=1200,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        return
    for rc, _, err in finish(launch(args, ranks)):
        assert rc == 0, err


def weights(ck: Path) -> dict[str, torch.Tensor]:
    return {f"{name}:{k}": v for name in ("model.safetensors", "codebooks.safetensors")
            for k, v in load_file(str(ck / name)).items()}


def metrics(ck: Path) -> list[dict]:
    return [json.loads(line) for line in (ck / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """1 process and 2 ranks: codebooks and model trained together from k-means at step 0, dead codes revived
    every 3 steps. (With a plain phase first, k-means clusters activations that differ by rounding and may
    cluster them differently: a discrete change, not a rounding error.)"""
    root = tmp_path_factory.mktemp("ddp")
    for ranks in (1, 2):
        train(root / f"ranks{ranks}", ranks, 3)
    return root


def test_two_ranks_train_like_one_process(runs):
    one, two = weights(runs / "ranks1"), weights(runs / "ranks2")
    assert one.keys() == two.keys()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < TOLERANCE, worst
    rows1, rows2 = metrics(runs / "ranks1"), metrics(runs / "ranks2")
    assert [r["step"] for r in rows1] == [r["step"] for r in rows2] and any(r["revived"] for r in rows1)
    for a, b in zip(rows1, rows2, strict=True):  # the same codes fired on the whole batch, the same revived
        assert abs(a["loss"] - b["loss"]) < 1e-4 and a["revived"] == b["revived"]
        assert {s: v["live"] for s, v in a["sites"].items()} == {s: v["live"] for s, v in b["sites"].items()}


def test_resume_after_a_rank_is_killed(runs):
    """Rank 1 is SIGKILLed right after the step-3 checkpoint: a fixed moment, not a race with rank 0 (which,
    on a quiet machine, could finish all 12 steps, or even write its final checkpoint, before a kill sent from
    outside lands). Rank 0, having written the step-3 checkpoint, finds its peer gone in the step-4 all-reduce
    and stops with one line (exit 2); `--resume` on 2 ranks then ends bit for bit where the uninterrupted
    run ended."""
    out = runs / "killed"
    (rc0, _, err0), (rc1, _, _) = finish(launch(["-c", TRAIN_JOB, str(out), "new", "3", "3"], per_rank={1: ["3"]}))
    assert rc1 == -signal.SIGKILL
    assert rc0 == 2 and one_error(err0, "rank 0/2: another rank failed or stopped"), err0
    meta = json.loads((out / "cbtool.json").read_text())
    assert meta["training"]["step"] == 3 and not meta["training"]["finished"]
    train(out, 2, 3, checkpoint_every=3, resume=True)
    ref, got = weights(runs / "ranks2"), weights(out)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def one_error(err: str, text: str) -> bool:
    """stderr holds exactly one cbtool error line, containing `text`, and no traceback."""
    lines = [ln for ln in err.splitlines() if ln.startswith("cbtool: error:")]
    return len(lines) == 1 and text in lines[0] and "Traceback" not in err


def _cli(*args: str, ranks: int = 2, per_rank: dict[int, list[str]] | None = None) -> list[tuple[int, str, str]]:
    return finish(launch(["-m", "cbtool", *args], ranks, per_rank))


def test_bad_launches_stop_every_rank_with_one_line(tmp_path):
    for rc, _, err in _cli("train", "--preset", "tiny", "--batch-size", "3", "--out", str(tmp_path / "a")):
        assert rc == 2 and one_error(err, "--batch-size 3 is not divisible by the 2 ranks"), err
    results = _cli("train", "--preset", "tiny", "--out", str(tmp_path / "b"), per_rank={1: ["--seed", "5"]})
    for rc, _, err in results:
        assert rc == 2 and one_error(err, "ranks disagree on the training options"), err
    for rc, _, err in _cli("eval", str(tmp_path)):
        assert rc == 2 and one_error(err, "does not run under torchrun"), err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_embed_and_search_on_two_ranks_equal_one_process(runs, tmp_path):
    ck = runs / "ranks1"
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--num-seqs", "40", "--shard-tokens", "1000", "--device", "cpu"]
    res = run_cli("embed", ck, "--out", one, *common)
    assert res.exit_code == 0, res.output
    for rc, _, err in _cli("embed", str(ck), "--out", str(two), *common):
        assert rc == 0, err
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert len([f for f in files if f.name == "shard.json"]) >= 4  # shards split over both ranks
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files), "stores differ"

    import cbtool

    store = cbtool.open_store(one)
    code = cbtool.find_codes(store, labels="state")["rows"][0]["code"]
    ref = json.loads(subprocess.run([sys.executable, "-c", SEARCH_JOB, str(one), code], check=True, text=True,
                                    capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}).stdout)
    (rc0, out0, err0), (rc1, out1, _) = finish(launch(["-c", SEARCH_JOB, str(one), code]))
    assert rc0 == rc1 == 0, err0
    assert json.loads(out0) == ref and out1 == ""
    assert ref[4]["examples"] and ref[1]["rows"]


def test_every_distributed_command_refuses_ranks_with_different_arguments(tmp_path):
    """find-codes, dead-codes and show-code agree on their arguments like train and embed (cbtool/cli.py
    `_agree_ranks`): every rank refuses with one line before reading anything, instead of merging two jobs."""
    store = str(tmp_path / "codes")  # never opened: the ranks disagree first
    for args, rank1 in ((["find-codes", store, "--labels", "state"], ["--top", "3"]),
                        (["dead-codes", store], ["--json"]),
                        (["show-code", "0.mlp:5", store], ["--examples", "2"])):
        for rc, out, err in _cli(*args, per_rank={1: rank1}):
            assert rc == 2 and one_error(err, f"ranks disagree on the {args[0]} arguments"), err
            assert out == ""


def test_sae_embed_on_two_ranks_equals_one_process(runs, tmp_path):
    """`embed --sae` under torchrun: rank R writes worker R/N's shards; the store equals one process's."""
    from safetensors.torch import save_file

    ck = runs / "ranks1"
    d_model = int(json.loads((ck / "cbtool.json").read_text())["model"]["config"]["d_model"])
    sae = tmp_path / "sae"
    sae.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"W_enc": torch.randn(d_model, 24, generator=g), "b_enc": torch.zeros(24),
               "W_dec": torch.randn(24, d_model, generator=g), "b_dec": torch.zeros(d_model)},
              str(sae / "sae_weights.safetensors"))
    (sae / "cfg.json").write_text(json.dumps({"d_in": d_model, "d_sae": 24, "architecture": "topk", "k": 3,
                                              "metadata": {"hook_name": "blocks.1.hook_resid_post"}}))
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--sae", str(sae), "--base-model", str(ck), "--num-seqs", "40", "--shard-tokens", "1000",
              "--device", "cpu"]
    res = run_cli("embed", *common, "--out", one)
    assert res.exit_code == 0, res.output
    for rc, _, err in _cli("embed", *common, "--out", str(two)):
        assert rc == 0, err
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert len([f for f in files if f.name == "shard.json"]) >= 4
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert all((one / f).read_bytes() == (two / f).read_bytes() for f in files), "stores differ"
    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m2["complete"] and m1["tokens"] == m2["tokens"] and m1["shards"] == m2["shards"]
