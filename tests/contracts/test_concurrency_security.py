"""Concurrent writers and readers of one store, and what loading may never do: execute code
from files, follow metadata paths out of the checkpoint/store directory, or reach the network."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import cbtool
from cbtool.errors import UserError
from cbtool.formats.store import Store
from cbtool.util.files import sha256_file
from tests.helpers import run_cli

CLI = [sys.executable, "-m", "cbtool"]
EMBED = ["--num-seqs", "24", "--shard-tokens", "256", "--batch-size", "2", "--device", "cpu"]


def _store_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(store).parts)}


@pytest.fixture(scope="module")
def reference(tiny_checkpoint_master, tmp_path_factory) -> dict[str, bytes]:
    out = tmp_path_factory.mktemp("conc-ref") / "codes"
    res = run_cli("embed", tiny_checkpoint_master, "--out", out, *EMBED)
    assert res.exit_code == 0, res.output
    return _store_files(out)


def test_two_workers_equal_one_process_and_readers_never_see_corruption(reference, tiny_checkpoint_master,
                                                                        tmp_path):
    out = tmp_path / "codes"
    procs = [subprocess.Popen([*CLI, "embed", str(tiny_checkpoint_master), "--out", str(out), *EMBED,
                               "--worker", f"{i}/2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    seen = {"refused": 0, "complete": 0}
    try:
        while any(p.poll() is None for p in procs):  # a reader during the writes
            try:
                store = Store(out)
            except UserError as e:
                assert re.search(r"does not exist|incomplete|not a code store", str(e)), e
                seen["refused"] += 1
            else:
                assert _store_files(out) == reference  # complete means every byte is final
                seen["complete"] += 1
                assert store.num_tokens == 24 * 128
            time.sleep(0.01)
    finally:
        errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert seen["refused"] > 0
    assert _store_files(out) == reference  # the same bytes as one process
    assert not list(out.glob(".*")) and not list(out.glob("*.lock"))


def test_second_writer_of_a_held_shard_is_refused(tiny_checkpoint_master, tmp_path):
    out = tmp_path / "codes"
    # a store with its plan written, then a live process holds shard 0
    res = run_cli("embed", tiny_checkpoint_master, "--out", out, *EMBED, "--worker", "1/2")
    assert res.exit_code == 0, res.output
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time, json\n"
        "from cbtool.formats.store import read_manifest\n"
        "from cbtool.formats.store_writer import StoreWriter\n"
        f"w = StoreWriter({str(out)!r}, read_manifest({str(out)!r}))\n"
        "with w.claim(0):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(120)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _store_files(out)
        second = subprocess.run([*CLI, "embed", str(tiny_checkpoint_master), "--out", str(out), *EMBED],
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert second.stderr.startswith("cbtool: error: ") and second.stderr.count("\n") == 1, second.stderr
        assert f"pid {holder.pid}" in second.stderr and "Traceback" not in second.stderr
        assert _store_files(out) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing its claim: the next writer takes the stale lock over
    assert (out / "shard-000000.lock").exists()
    res = run_cli("embed", tiny_checkpoint_master, "--out", out, *EMBED)
    assert res.exit_code == 0, res.output
    assert Store(out).num_tokens == 24 * 128 and not list(out.glob("*.lock"))


# -- no code execution, no path escapes, no network -----------------------------------------------------

def test_package_never_unpickles():
    root = Path(cbtool.__file__).parent
    offenders = []
    for f in sorted(root.rglob("*.py")):
        text = f.read_text(encoding="utf-8")
        for pattern in (r"\btorch\.load\(", r"^\s*(import|from) (c?pickle|dill|cloudpickle|marshal|shelve)\b",
                        r"\bpickle\.(loads?|Unpickler)\b", r"allow_pickle\s*=\s*True", r"(?<![.\w])(eval|exec)\(",
                        r"trust_remote_code\s*=\s*True", r"\bjoblib\.load", r"weights_only\s*=\s*False"):
            for m in re.finditer(pattern, text, flags=re.M):
                line = text[: m.start()].count("\n") + 1
                offenders.append(f"{f.relative_to(root)}:{line}: {m.group(0)}")
        for m in re.finditer(r"np\.load\(([^)]*)\)", text):  # every np.load refuses pickles explicitly
            if "allow_pickle=False" not in m.group(1):
                offenders.append(f"{f.relative_to(root)}: np.load without allow_pickle=False")
    assert not offenders, offenders


def test_pickled_arrays_in_a_store_are_never_loaded(tmp_path, monkeypatch, reference, tiny_checkpoint_master):
    """An object array (which would need pickle) in place of a label file or a store array: exit 2, and
    the pickle payload never runs."""
    marker = tmp_path / "pwned"
    payload = np.array([_Evil(str(marker))] * 3, dtype=object)
    np.save(tmp_path / "labels.npy", payload, allow_pickle=True)
    out = tmp_path / "codes"
    out.mkdir()
    for name, data in reference.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    r = run_cli("find-codes", out, "--labels", tmp_path / "labels.npy")
    assert r.exit_code == 2 and "pickle" in r.stderr
    for meta in out.glob("shard-*/shard.json"):  # an old-style store without file hashes
        doc = json.loads(meta.read_text())
        doc.pop("files")
        meta.write_text(json.dumps(doc))
    np.save(out / "shard-000000" / "labels.state.npy", payload, allow_pickle=True)
    r = run_cli("find-codes", out, "--labels", "state")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_checkpoint_file_names_cannot_leave_the_directory(tiny_checkpoint, tmp_path, where):
    """Even with a correct sha256, a file entry outside the checkpoint is refused."""
    outside = tmp_path / "outside.safetensors"
    shutil.copy(tiny_checkpoint / "codebooks.safetensors", outside)
    name = "../outside.safetensors" if where == "parent" else str(outside)
    meta = json.loads((tiny_checkpoint / "cbtool.json").read_text())
    meta["files"][name] = sha256_file(outside)
    (tiny_checkpoint / "cbtool.json").write_text(json.dumps(meta))
    for args in (("info", tiny_checkpoint), ("eval", tiny_checkpoint, "--device", "cpu", "--samples", 1)):
        r = run_cli(*args)
        assert r.exit_code == 2 and "outside" in r.stderr, (args, r.output)


@pytest.mark.parametrize("field", ["site", "label"])
def test_store_names_cannot_leave_the_directory(reference, tmp_path, field):
    """A site or label name in manifest.json that would read a file outside the shard: refused, even
    when such a file exists and the shard has no file hashes to catch it."""
    out = tmp_path / "codes"
    for name, data in reference.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    for meta in out.glob("shard-*/shard.json"):
        doc = json.loads(meta.read_text())
        doc.pop("files")
        meta.write_text(json.dumps(doc))
    evil = "/../../elsewhere"  # codes./../../elsewhere.npy: a readable array two levels up
    (out / "elsewhere.npy").write_bytes((out / "shard-000000" / "codes.0.mlp.npy").read_bytes())
    (out / "shard-000000" / "codes.").mkdir()
    (out / "shard-000000" / "labels.").mkdir()
    man = json.loads((out / "manifest.json").read_text())
    if field == "site":
        man["sites"][2]["name"] = evil
    else:
        man["labels"] = [evil]
    (out / "manifest.json").write_text(json.dumps(man))
    for args in (("find-codes", out, "--labels", "state"), ("dead-codes", out), ("show-code", out, "0.mlp:1")):
        r = run_cli(*args)
        assert r.exit_code == 2 and "outside" in r.stderr, (args, r.output)


@pytest.fixture
def no_network(monkeypatch):
    """Record and refuse every attempt to open a network connection."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # nothing may rely on these being set
        monkeypatch.delenv(var, raising=False)
    return attempts


@pytest.mark.parametrize("base", ["gpt2", "openai-community/gpt2", "https://huggingface.co/gpt2", "{tmp}/missing",
                                  "{tmp}/empty-dir", "{tmp}/corpus.txt"])
def test_base_model_never_reaches_the_network(no_network, tmp_path, monkeypatch, base):
    monkeypatch.chdir(tmp_path)  # so that a hub-like name is not a local directory
    (tmp_path / "corpus.txt").write_text("to be or not to be, that is the question\n" * 50)
    (tmp_path / "empty-dir").mkdir()
    r = run_cli("train", "--base-model", base.replace("{tmp}", str(tmp_path)), "--corpus", tmp_path / "corpus.txt",
                "--preset", "tiny", "--out", tmp_path / "ck", "--device", "cpu")
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("cbtool: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert no_network == []
    assert not (tmp_path / "ck").exists()
