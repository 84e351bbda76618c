"""Error classes, not listed cases: generated inputs through the real CLI.

Every generated input must give exit 2 (or 0 where it is valid) with exactly one `cbtool: error:` line, no
traceback, and leave every pre-existing file byte-identical. Classes: metadata of the wrong shape in any
field of cbtool.json / manifest.json (cbtool/formats/schema.py), NaN / infinity / overflow in any numeric option
(cbtool/util/limits.py), JSON nested too deeply or holding lone surrogates (cbtool/util/strict_json.py), files that
are not regular files (a FIFO, /dev/zero), catastrophic regexes (cbtool/util/regexes.py), a full disk (a real
tmpfs), and a checkpoint directory that holds the user's own files or is a symlink, or is being written by
another `train` (cbtool/util/locks.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any, get_args

import pytest
import typer.main
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cbtool.cli import app
from cbtool.training.start import start_training
from tests.helpers import run_cli, snapshot

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
TINY = ("--preset", "tiny", "--base-steps", "2", "--steps", "2", "--kmeans-seqs", "4", "--device", "cpu")


def assert_refused(res, needle: str = "") -> None:
    """Exit 2, one `cbtool: error:` line (the only stderr line), no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.stdout[-1000:], res.stderr[-2000:])
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbtool: error: "), res.stderr
    assert "Traceback" not in res.output and "internal error" not in res.stderr
    assert needle in res.stderr, (needle, res.stderr)


def assert_one_error(res, needle: str) -> None:
    """Exit 2 after progress logs: the last stderr line is the one `cbtool: error:` line."""
    assert res.exit_code == 2, (res.exit_code, res.stderr[-2000:])
    lines = res.stderr.splitlines()
    assert lines[-1].startswith("cbtool: error: ") and sum("cbtool: error:" in ln for ln in lines) == 1
    assert "Traceback" not in res.output and "internal error" not in res.stderr and needle in res.stderr, res.stderr


@pytest.fixture(scope="module")
def fixtures_copy(tmp_path_factory) -> Path:
    """fixtures/ copied once (the store finds its checkpoint at ../tokfsm)."""
    root = tmp_path_factory.mktemp("fx") / "fixtures"
    shutil.copytree(FIXTURES, root)
    return root


# -- metadata of the wrong shape ------------------------------------------------------------------------


def _paths(doc: Any, at: tuple = ()) -> list[tuple]:
    """Every key path of a JSON document, inner nodes included."""
    out = [at] if at else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:2]):
            out += _paths(v, (*at, i))
    return out


PLACEHOLDER = "@@replacement@@"
# raw JSON text put in place of a value: every type, and what Python's json lets through or chokes on
RAW = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "9" * 40, "-" + "9" * 25, '"\\ud800"', "null",
                     "[" * 5000 + "]" * 5000, "[" * 70 + "]" * 70, "{}", "[]", '""', "true", "-1", "0"]),
    st.integers(-(2**70), 2**70).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(json.dumps),
    st.text(max_size=5).map(json.dumps),
    st.lists(st.one_of(st.integers(), st.text(max_size=2)), max_size=3).map(json.dumps),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2).map(json.dumps),
)


def _mutated(doc: dict, path: tuple, raw: str) -> str:
    doc = json.loads(json.dumps(doc))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = PLACEHOLDER
    return json.dumps(doc).replace(json.dumps(PLACEHOLDER), raw)


def _check_mutations(root: Path, meta: Path, commands: list[list[str]], data) -> None:
    original = meta.read_text()
    doc = json.loads(original)
    path = data.draw(st.sampled_from(_paths(doc)), label="path")
    raw = data.draw(RAW, label="value")
    meta.write_text(_mutated(doc, path, raw))
    try:
        before = snapshot(root)
        for args in commands:
            res = run_cli(*args)
            assert res.exit_code in (0, 2), (path, raw[:50], res.exit_code, res.stderr[-2000:])
            assert "Traceback" not in res.output and "internal error" not in res.stderr, (path, raw[:50])
            if res.exit_code == 2:
                assert_refused(res)
        assert snapshot(root) == before
    finally:
        meta.write_text(original)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_checkpoint_metadata_of_any_shape(fixtures_copy, data):
    ck = fixtures_copy / data.draw(st.sampled_from(["tokfsm", "text"]), label="kind")
    _check_mutations(fixtures_copy, ck / "cbtool.json", [["info", ck], ["info", ck, "--json"]], data)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_store_manifest_of_any_shape(fixtures_copy, data):
    store = fixtures_copy / "store"
    commands = [["info", store], ["dead-codes", store, "--json"]]
    _check_mutations(fixtures_copy, store / "manifest.json", commands, data)


# -- numbers in options ---------------------------------------------------------------------------------


def _numeric_options() -> list[tuple[str, str, type]]:
    """(command, flag, int or float) for every numeric option of every command, read from the CLI itself."""
    group = typer.main.get_command(app)
    out = []
    for name, cmd in group.commands.items():
        for p in cmd.params:
            ann = p.type_descriptor.annotation
            kinds = [t for t in (get_args(ann) or (ann,)) if t in (int, float)]
            flags = [o for o in p.opts if o.startswith("--")]
            if kinds and flags and p.param_type_name == "option":
                out.append((name, flags[0], kinds[0]))
    return out


NUMERIC = _numeric_options()
BAD = {float: ["nan", "inf", "-inf", "1e999", "-NaN"], int: [str(2**64), str(-(2**64)), "9" * 30]}


def test_numeric_options_are_found():
    flags = {(c, f) for c, f, _ in NUMERIC}
    assert {("intervene", "--temperature"), ("intervene", "--strength"), ("train", "--seed"),
            ("train", "--vocab-size"), ("eval", "--temperature")} <= flags
    assert len(NUMERIC) >= 40, len(NUMERIC)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(option=st.sampled_from(NUMERIC), data=st.data())
def test_no_nan_infinity_or_overflow_in_any_option(option, data, tmp_path_factory):
    command, flag, kind = option
    value = data.draw(st.sampled_from(BAD[kind]), label="value")
    extra = ["fixtures/store", "0.mlp:1"] if command == "show-code" else []
    res = run_cli(command, *extra, f"{flag}={value}")
    assert_refused(res)


@pytest.mark.parametrize("seed", ["-1", str(2**32), str(2**63 - 1)])
def test_seeds_out_of_range(seed):
    assert_refused(run_cli("eval", FIXTURES / "tokfsm", "--seed", seed), "--seed")


# -- JSON and text inputs -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=RAW, key=st.sampled_from(["prompt", "codes", "strength", "seed", "samples", "mode"]))
def test_spec_rows_of_any_shape(raw, key, tmp_path_factory):
    spec = tmp_path_factory.mktemp("spec") / "spec.jsonl"
    row = {"prompt": "12", "codes": ["0.mlp:1"], "samples": 1}
    spec.write_text(json.dumps({**row, key: PLACEHOLDER}).replace(json.dumps(PLACEHOLDER), raw) + "\n")
    res = run_cli("intervene", FIXTURES / "tokfsm", "--spec", spec, "--max-new-tokens", "2", "--device", "cpu")
    assert res.exit_code in (0, 2), (key, raw[:40], res.stderr[-2000:])
    assert "Traceback" not in res.output and "internal error" not in res.stderr
    if res.exit_code == 2:
        assert_refused(res)


def test_spec_samples_in_the_billions_refused_before_allocating(tmp_path):
    spec = tmp_path / "spec.jsonl"
    spec.write_text(json.dumps({"prompt": "12", "codes": ["0.mlp:1"], "samples": 10**9}) + "\n")
    assert_refused(run_cli("intervene", FIXTURES / "tokfsm", "--spec", spec), "samples")
    assert_refused(run_cli("intervene", FIXTURES / "tokfsm", "-c", "0.mlp:1", "-n", "9999999999"), "--samples")


def test_lone_surrogate_and_deep_json_in_a_jsonl_corpus(tmp_path):
    pytest.importorskip("tokenizers")
    bad = tmp_path / "surrogate.jsonl"
    bad.write_text('{"text": "ab\\ud800cd"}\n{"text": "hello"}\n')
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    for corpus, needle in ((bad, "surrogate"), (deep, "nested too deeply")):
        before = snapshot(tmp_path)
        assert_refused(run_cli("train", "--task", "text", "--corpus", corpus, "--out", tmp_path / "ck", *TINY), needle)
        assert_refused(run_cli("embed", FIXTURES / "text", "--corpus", corpus, "--out", tmp_path / "codes"), needle)
        assert snapshot(tmp_path) == before


@pytest.fixture
def alarm():
    """Fail instead of hanging: a command that blocks on a FIFO is interrupted after 60 s."""
    def timeout(*_):
        raise TimeoutError("the command hung")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_only_regular_files_are_read(tmp_path, alarm):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    fifo_jsonl = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo_jsonl)
    ck = FIXTURES / "tokfsm"
    assert_refused(run_cli("train", "--task", "text", "--corpus", fifo, "--out", tmp_path / "ck", *TINY),
                   "not a regular file")
    assert_refused(run_cli("intervene", ck, "-c", "0.mlp:1", "--prompts", fifo), "not a regular file")
    assert_refused(run_cli("intervene", ck, "-c", "0.mlp:1", "--prompts", "/dev/zero"), "not a regular file")
    assert_refused(run_cli("intervene", ck, "--spec", fifo_jsonl), "not a regular file")
    assert_refused(run_cli("report", ck, FIXTURES / "store", "--include", fifo, "--out", tmp_path / "r.html"),
                   "not a regular file")
    assert_refused(run_cli("find-codes", FIXTURES / "store", "--labels", fifo), "")


# -- regexes --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,needle", [
    ("(\\d|\\d)*\\D", "ran for over"),  # exponential backtracking on every TokFSM document (all digits)
    ("a{99999999999}", "invalid regex"),
    ("(" * 3000 + "a" + ")" * 3000, "invalid regex"),
    ("a" * 20_000, "limit"),
])
def test_bad_regexes_one_line(pattern, needle, monkeypatch):
    monkeypatch.setenv("CBTOOL_REGEX_TIMEOUT", "0.1")
    assert_refused(run_cli("find-codes", FIXTURES / "store", "--regex", pattern), needle)


# -- checkpoints: the user's files, symlinks, permissions, locks, a full disk ----------------------------


def test_train_keeps_the_users_files_and_follows_a_symlinked_out(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    old = os.umask(0o022)
    try:
        assert run_cli("train", "--out", link, *TINY).exit_code == 0
        (real / "NOTES.txt").write_text("my notes\n")
        (real / "plots").mkdir()
        (real / "plots" / "a.png").write_bytes(b"\x89PNG")
        first = (real / "model.safetensors").read_bytes()
        res = run_cli("train", "--out", link, "--overwrite", "--seed", "3", *TINY)
        assert res.exit_code == 0, res.output
    finally:
        os.umask(old)
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "NOTES.txt").read_text() == "my notes\n" and (real / "plots" / "a.png").read_bytes() == b"\x89PNG"
    assert (real / "model.safetensors").read_bytes() != first  # the checkpoint itself was replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]  # no stray links, temp dirs, locks
    assert (real.stat().st_mode & 0o777) == 0o755 and ((real / "cbtool.json").stat().st_mode & 0o777) == 0o644
    assert run_cli("info", link).exit_code == 0


def test_two_trains_on_one_out_cannot_both_succeed(tmp_path):
    out = tmp_path / "ck"
    first = start_training(out, "tiny", device="cpu", base_steps=2, steps=2, kmeans_seqs=4)  # holds the lock
    before = snapshot(tmp_path)
    assert_refused(run_cli("train", "--out", out, "--overwrite", *TINY), "being written by")
    assert snapshot(tmp_path) == before
    first.run()
    assert not list(tmp_path.glob(".*.lock"))
    assert run_cli("train", "--out", out, "--overwrite", *TINY).exit_code == 0  # released when it finished


def test_a_stale_train_lock_is_taken_over(tmp_path):
    proc = subprocess.Popen(["true"])
    proc.wait()  # a pid that is gone
    import socket

    (tmp_path / ".ck.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": proc.pid, "time": 0}))
    assert run_cli("train", "--out", tmp_path / "ck", *TINY).exit_code == 0
    assert not (tmp_path / ".ck.lock").exists()


@pytest.fixture
def full_disk(tmp_path):
    """A real 64 KiB tmpfs (root only)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_is_one_line_and_leaves_nothing(full_disk):
    res = run_cli("train", "--out", full_disk / "ck", *TINY)
    assert_one_error(res, "space")
    assert not list(full_disk.iterdir())
    res = run_cli("embed", FIXTURES / "tokfsm", "--out", full_disk / "codes", "--num-seqs", "400", "--device", "cpu")
    assert_one_error(res, "free there")  # refused before writing: the store would not fit (cbtool/util/budget.py)


# -- every command on every kind of checkpoint ----------------------------------------------------------


@pytest.mark.parametrize("kind", ["tokfsm", "text"])
def test_every_command_on_every_checkpoint_kind(kind, fixtures_copy, tmp_path):
    """(Pretrained bases: tests/model/test_hf.py test_commands_work_on_a_pretrained_base_checkpoint.)"""
    if kind == "text":
        pytest.importorskip("tokenizers")
    ck, codes = fixtures_copy / kind, tmp_path / "codes"
    dev = ("--device", "cpu")
    embed = ["--num-seqs", "4"] if kind == "tokfsm" else ["--max-tokens", "300"]
    for args in (["info", ck], ["info", ck, "--json"], ["eval", ck, "--samples", "8", "--blocks", "2", *dev],
                 ["embed", ck, "--out", codes, *embed, *dev], ["info", codes], ["dead-codes", codes, "--json"]):
        res = run_cli(*args)
        assert res.exit_code == 0, (args, res.output)
    code = json.loads(run_cli("dead-codes", codes, "--json").stdout)["sites"][0]["most_used"][0]["code"]
    for args in (["find-codes", codes, "--regex", "1", "--json"], ["show-code", codes, code],
                 ["intervene", ck, "--code", code, "-n", "2", "--max-new-tokens", "3", *dev],
                 ["report", ck, codes, "--out", tmp_path / "r.html"]):
        res = run_cli(*args)
        assert res.exit_code == 0, (args, res.output)
