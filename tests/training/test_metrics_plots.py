"""The training metrics log (metrics.jsonl in the checkpoint) and `--plot` on eval, dead-codes, find-codes,
intervene, through the real CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from rich.console import Console

from cbtool.tasks.tokfsm import FSMSpec, TokFSM
from cbtool.training.config import apply_preset
from cbtool.training.metrics_log import FILE, fsm_valid_rate, read_metrics
from cbtool.training.trainer import Trainer
from cbtool.util.files import sha256_file
from tests.helpers import assert_same_training, run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only contend


def test_metrics_log_is_written_hashed_and_pointed_to(tiny_checkpoint):
    meta = json.loads((tiny_checkpoint / "cbtool.json").read_text())
    assert meta["files"][FILE] == sha256_file(tiny_checkpoint / FILE)
    rows = read_metrics(tiny_checkpoint)
    cfg = meta["training"]["config"]
    total = cfg["base_steps"] + cfg["steps"]
    assert [r["step"] for r in rows] == sorted({*range(10, total + 1, 10), total})
    assert [r["phase"] for r in rows] == ["base" if r["step"] <= cfg["base_steps"] else "codebook" for r in rows]
    sites = meta["codebooks"]
    names = [n for c in sites for n in c["sites"]]
    for r in rows:
        assert r["loss"] > 0 and 0 <= r["accuracy"] <= 1 and 0 <= r["fsm_valid"] <= 1
        assert r["tokens_per_s"] > 0 and r["lr"] > 0
        if r["phase"] == "codebook":
            assert list(r["sites"]) == names and r["mse"] > 0
            for s in r["sites"].values():
                assert s["live"] + s["dead"] == cfg["num_codes"] and s["live"] > 0 and s["mse"] > 0
        else:
            assert "sites" not in r and r["mse"] is None

    ev = json.loads(run_cli("eval", tiny_checkpoint, "--json", "--samples", "8", "--device", "cpu").stdout)
    info = json.loads(run_cli("info", tiny_checkpoint, "--json").stdout)
    for doc in (ev, info):
        assert doc["metrics_log"]["path"] == str(tiny_checkpoint / FILE)
        assert doc["metrics_log"]["rows"] == len(rows) and doc["metrics_log"]["last"] == rows[-1]
    assert f"metrics log {tiny_checkpoint / FILE}" in run_cli("info", tiny_checkpoint).stdout

    with open(tiny_checkpoint / FILE, "a", encoding="utf-8") as f:  # the log is hashed like the weights
        f.write('{"step": 999}\n')
    res = run_cli("eval", tiny_checkpoint, "--samples", "8")
    assert res.exit_code == 2 and "metrics.jsonl does not match its sha256" in res.stderr


def _valid_by_hand(fsm: TokFSM, seq: list[int], pred: list[int]) -> list[bool]:
    """The definition, one prediction at a time: does the predicted digit continue the real prefix validly?"""
    out = []
    for i, p in enumerate(pred):
        digits = [t - 1 for t in seq[1 : i + 1]]  # the real digits before the predicted one
        d = p - 1
        if not 0 <= d <= 9:
            out.append(False)
            continue
        done = len(digits) // 2
        prev = digits[2 * done - 2] * 10 + digits[2 * done - 1] if done else None
        nbrs = set(range(fsm.spec.num_states)) if prev is None else set(fsm.neighbours[prev].tolist())
        if len(digits) % 2 == 0:  # a first digit: some allowed next state starts with it
            out.append(any(s // 10 == d for s in nbrs))
        else:
            out.append(digits[-1] * 10 + d in nbrs)
    return out


def test_fsm_valid_rate_matches_its_definition():
    fsm = TokFSM(FSMSpec(num_states=60, out_degree=5, seq_len=12, seed=4))
    tokens, _ = fsm.step_batch(16, 0, 0)
    g = torch.Generator().manual_seed(1)
    pred = torch.randint(0, 11, (16, 11), generator=g)
    expect = [v for s, p in zip(tokens.tolist(), pred.tolist(), strict=True) for v in _valid_by_hand(fsm, s, p)]
    assert fsm_valid_rate(fsm, tokens, pred) == pytest.approx(sum(expect) / len(expect))
    assert 0 < sum(expect) < len(expect)
    assert fsm_valid_rate(fsm, tokens, tokens[:, 1:]) == 1.0  # the real continuation is always valid
    assert fsm_valid_rate(fsm, tokens, torch.zeros_like(pred)) == 0.0  # BOS is never a valid next token


class _Stop(Exception):
    pass


def test_metrics_log_resumes_exactly_mid_window(tmp_path):
    """Rows every 7 steps, checkpoints every 10: the window's live-code counts travel in train_state."""
    full, part = tmp_path / "full", tmp_path / "part"
    args = ("--preset", "tiny", "--seed", "3", "--checkpoint-every", "10", "--log-every", "7", "--device", "cpu")
    assert run_cli("train", "--out", full, *args).exit_code == 0
    cfg = apply_preset("tiny")
    cfg.seed, cfg.checkpoint_every, cfg.log_every = 3, 10, 7

    def stop(step: int) -> None:
        if step == 40:
            raise _Stop

    with pytest.raises(_Stop):
        Trainer(cfg, part, torch.device("cpu"), Console(stderr=True, quiet=True)).run(on_checkpoint=stop)
    assert [r["step"] for r in read_metrics(part)] == [7, 14, 21, 28, 35]
    assert run_cli("train", "--resume", "--out", part, "--device", "cpu").exit_code == 0
    assert_same_training(full, part)
    assert [r["step"] for r in read_metrics(part)] == [7, 14, 21, 28, 35, 42, 49, 50]


@pytest.fixture(scope="module")
def store(tiny_checkpoint_master, tmp_path_factory):
    out = tmp_path_factory.mktemp("plots") / "codes"
    res = run_cli("embed", tiny_checkpoint_master, "--out", out, "--num-seqs", "32", "--device", "cpu")
    assert res.exit_code == 0, res.output
    return out


PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_are_written_as_png_or_svg(tiny_checkpoint_master, store, tmp_path):
    cases = [
        ("eval", tiny_checkpoint_master, "--samples", "8", "--device", "cpu"),
        ("dead-codes", store),
        ("find-codes", store, "--regex", "4", "--sites", "*.mlp"),
        ("find-codes", store, "--labels", "state", "--json"),
        ("intervene", tiny_checkpoint_master, "--code", "1.mlp:3", "--prompt", "12", "-n", "8", "--regex", "^[1-4]",
         "--max-new-tokens", "4", "--device", "cpu"),
    ]
    for i, (cmd, *rest) in enumerate(cases):
        for suffix in (".png", ".svg"):
            path = tmp_path / f"{i}{suffix}"
            res = run_cli(cmd, *rest, "--plot", path)
            assert res.exit_code == 0, (cmd, res.output)
            data = path.read_bytes()
            assert data.startswith(PNG) if suffix == ".png" else b"<svg" in data[:2000], cmd
    svg = (tmp_path / "1.svg").read_text()
    assert "1.mlp" in svg and "code rank" in svg  # dead-codes: one curve per site, labelled
    # --plot leaves stdout to the result
    assert json.loads(run_cli(*cases[3], "--plot", tmp_path / "x.png").stdout)["kind"] == "find-codes"


def test_plot_bad_input_exit_2(tiny_checkpoint_master, store, tmp_path, monkeypatch):
    res = run_cli("dead-codes", store, "--plot", tmp_path / "usage.pdf")
    assert res.exit_code == 2 and "must end in .png or .svg" in res.stderr
    res = run_cli("dead-codes", store, "--plot", tmp_path / "missing" / "usage.png")
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = run_cli("intervene", tiny_checkpoint_master, "--code", "1.mlp:3", "--plot", tmp_path / "r.png")
    assert res.exit_code == 2 and "give --regex" in res.stderr
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the [plot] extra were not installed
    res = run_cli("dead-codes", store, "--plot", tmp_path / "usage.png")
    assert res.exit_code == 2 and "pip install matplotlib" in res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "usage.png").exists()


def test_eval_plot_only_draws_from_the_log(tiny_checkpoint_master, tmp_path):
    """`eval --plot F --plot-only`: the same curves from metrics.jsonl and the evaluation recorded at the end of
    training, in a fresh interpreter that never imports torch (no model is run)."""
    import subprocess

    path = tmp_path / "curves.svg"
    code = ("import sys; from cbtool.cli import main; sys.argv = ['cbtool', 'eval', sys.argv[1], '--plot', "
            "sys.argv[2], '--plot-only']\ntry:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    res = subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint_master), str(path)], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    svg = path.read_text()
    results = json.loads((tiny_checkpoint_master / "cbtool.json").read_text())["training"]["results"]
    assert f"{results['on']['loss']:.4f}" in svg and f"{results['bypassed']['loss']:.4f}" in svg
    for args, needle in ((("--plot-only",), "give the file"),
                         (("--plot", tmp_path / "a.png", "--plot-only", "--json"), "--json needs an evaluation"),
                         (("--plot", tmp_path / "a.png", "--plot-only", "--sites", "*.mlp"), "--sites")):
        res = run_cli("eval", tiny_checkpoint_master, *args)
        assert res.exit_code == 2 and needle in res.output, res.output
    res = run_cli("eval", tmp_path, "--plot", tmp_path / "b.png", "--plot-only")
    assert res.exit_code == 2 and "not a cbtool checkpoint" in res.output, res.output
