"""`train --resume` with options (cbtool/training/resume.py): every stored option given with a different value is
refused (exit 2, one line naming it, the checkpoint untouched) but for those that may change, which are
applied and announced; options equal to the stored run's are accepted."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from cbtool.training.config import SHAPE_OPTIONS, TrainConfig, cli_fields
from cbtool.training.resume import MAY_CHANGE
from cbtool.training.start import start_training
from tests.helpers import run_cli


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory) -> Path:
    """A tiny run stopped after its checkpoint at step 8 of 12 (6 plain steps, then codebooks)."""
    out = tmp_path_factory.mktemp("resume") / "ck"
    trainer = start_training(out, "tiny", device="cpu", base_steps=6, steps=6, checkpoint_every=4, seed=5)

    def stop(step: int) -> None:
        if step == 8:
            raise _Stop

    with pytest.raises(_Stop):
        trainer.run(on_checkpoint=stop)
    return out


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(p.name.encode() + (p.read_bytes() if p.is_file() else b""))
    return h.hexdigest()


def _different(value: object) -> object:
    """A value of the same kind that differs from `value`."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 if value else 0.5
    return "elsewhere" if value is None else f"{value}x"


def _option(field, value: object) -> list[object]:
    flag = field.metadata["flag"] or "--" + field.name.replace("_", "-")
    if isinstance(value, bool):
        on, _, off = flag.partition("/")
        return [on if value else off]
    return [flag, value]


def _stored(out: Path) -> dict:
    return json.loads((out / "cbtool.json").read_text())["training"]


@pytest.mark.parametrize("field", [f for f in cli_fields() if f.name not in MAY_CHANGE], ids=lambda f: f.name)
def test_every_stored_option_that_differs_is_refused(field, unfinished):
    before = _digest(unfinished)
    config = _stored(unfinished)["config"]
    value = _different(config["model"][field.name] if field.name in SHAPE_OPTIONS else config[field.name])
    res = run_cli("train", "--resume", "--out", unfinished, "--device", "cpu", *_option(field, value))
    errors = [line for line in res.stderr.splitlines() if line.startswith("cbtool: error:")]
    assert res.exit_code == 2 and len(errors) == 1 and "Traceback" not in res.stderr, res.stderr
    flag = (field.metadata["flag"] or "--" + field.name.replace("_", "-")).partition("/")[0]
    assert f"conflict with it: {flag} " in errors[0] and "--steps" in errors[0]  # it says what may change
    assert _digest(unfinished) == before


def test_conflicts_are_named_together_and_preset_is_compared(unfinished):
    res = run_cli("train", "--resume", "--out", unfinished, "--preset", "default", "--num-codes", 32, "--lr", 0.5,
                  "--sites", "mlp")
    line = res.stderr.strip()
    assert res.exit_code == 2 and len(line.splitlines()) == 1
    for named in ("--preset default (the run's: tiny)", "--num-codes 32 (the run's: 64)", "--lr 0.5", "--sites mlp"):
        assert named in line


def test_equal_options_and_changeable_ones_are_applied(unfinished, tmp_path):
    out = tmp_path / "ck"
    out.mkdir()
    for p in unfinished.iterdir():
        (out / p.name).write_bytes(p.read_bytes())
    stored = _stored(out)["config"]
    res = run_cli("train", "--resume", "--out", out, "--device", "cpu", "--preset", "tiny", "--num-codes",
                  stored["num_codes"], "--lr", stored["lr"], "--seed", stored["seed"], "--steps", 8,
                  "--checkpoint-every", 0, "--log-every", 2)
    assert res.exit_code == 0, res.stderr
    for note in ("resume: --steps 6 -> 8", "resume: --checkpoint-every 4 -> 0", "resume: --log-every"):
        assert note in res.stderr
    training = _stored(out)
    assert training["step"] == training["total_steps"] == 14 and training["finished"]
    assert "resuming" in res.stderr and "at step 8/14" in res.stderr
    assert TrainConfig.from_dict(training["config"]).steps == 8 and training["preset"] == "tiny"


def test_steps_that_end_before_the_current_step_are_refused(unfinished):
    res = run_cli("train", "--resume", "--out", unfinished, "--device", "cpu", "--steps", 1)
    assert res.exit_code == 2 and "--steps 1 ends at step 7, but the run is already at step 8; give at least 2" \
        in res.stderr
    res = run_cli("train", "--resume", "--out", unfinished, "--device", "cpu", "--steps", 2)
    assert res.exit_code == 2 and "already finished (8 steps)" in res.stderr


def test_a_larger_steps_continues_a_finished_run_and_says_its_moments_restart(tmp_path):
    out = tmp_path / "ck"
    start_training(out, "tiny", device="cpu", base_steps=2, steps=2, kmeans_seqs=4).run()  # drops the moments
    res = run_cli("train", "--resume", "--out", out, "--device", "cpu")
    assert res.exit_code == 2 and "already finished (4 steps); nothing to resume (a larger --steps" in res.stderr
    res = run_cli("train", "--resume", "--out", out, "--device", "cpu", "--steps", 3)
    assert res.exit_code == 0, res.stderr
    assert "resume: --steps 2 -> 3" in res.stderr and "no optimizer moments" in res.stderr
    training = _stored(out)
    assert training["step"] == 5 and training["finished"] and training["results"]["on"]
