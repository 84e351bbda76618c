"""The committed fixtures (fixtures/make_fixtures.py) keep loading: files written by an earlier cbtool are
read by this one (a format change needs a version bump and a migration, docs/formats.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cbtool.formats.checkpoint import FORMAT_VERSION, load_checkpoint
from cbtool.formats.store import FORMAT_VERSION as STORE_VERSION
from cbtool.formats.store import open_store
from cbtool.tasks.text import TextTask
from cbtool.tasks.tokfsm import TokFSM
from tests.helpers import run_cli

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def test_fixtures_are_small():
    total = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert total < 1024 * 1024


@pytest.mark.parametrize("name,task", [("tokfsm", TokFSM), ("text", TextTask)])
def test_fixture_checkpoints_load(name, task):
    pytest.importorskip("tokenizers")
    ck = load_checkpoint(FIXTURES / name, with_train_state=True)
    assert ck.meta["format_version"] == FORMAT_VERSION and isinstance(ck.task, task)
    assert ck.train_state is not None and ck.meta["training"]["finished"]
    res = run_cli("info", FIXTURES / name, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["sha256"] == ck.sha256


def test_text_fixture_evaluates_with_its_relative_corpus():
    pytest.importorskip("tokenizers")
    ck = load_checkpoint(FIXTURES / "text")
    assert ck.meta["task"]["corpus"] == "../corpus.txt"  # relative to the checkpoint directory
    recorded = ck.meta["training"]["results"]["on"]["loss"]
    res = run_cli("eval", FIXTURES / "text", "--json", "--device", "cpu", "--blocks", "256")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["on"]["loss"] == pytest.approx(recorded, rel=1e-5)


def test_fixture_store_opens_and_answers():
    store = open_store(FIXTURES / "store")
    assert store.manifest["format_version"] == STORE_VERSION
    assert store.checkpoint_path.resolve() == (FIXTURES / "tokfsm").resolve()  # relative to the store
    assert store.num_tokens == 8 * 64 and store.label_names == ["state"]
    res = run_cli("info", FIXTURES / "store", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["checkpoint_status"] == "unchanged"
    res = run_cli("find-codes", FIXTURES / "store", "--labels", "state", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["summary"]["values_with_code"] > 0
