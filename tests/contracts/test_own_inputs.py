"""No command writes over one of its own inputs (cbtool/util/files.py `refuse_overwriting_inputs`), and what
cbtool writes follows the umask (checkpoint files included: the safetensors writer alone makes them 0600)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import run_cli, snapshot


@pytest.fixture(scope="module")
def inputs(tiny_checkpoint_master, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own-inputs")
    shutil.copytree(tiny_checkpoint_master, root / "ck")
    res = run_cli("embed", root / "ck", "--out", root / "codes", "--num-seqs", 8, "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = run_cli("find-codes", root / "codes", "--labels", "state", "--json")
    assert res.exit_code == 0, res.output
    (root / "find.json").write_text(res.stdout)
    return root


def _links(w: Path) -> None:
    (w / "link.json").symlink_to(w / "find.json")
    os.link(w / "find.json", w / "hard.json")


REPORT_OUTS = {
    "checkpoint-meta": "ck/cbtool.json",
    "checkpoint-weights": "ck/model.safetensors",
    "inside-checkpoint": "ck/report.html",
    "store-manifest": "codes/manifest.json",
    "inside-store": "codes/report.html",
    "the-include": "find.json",
    "symlink-to-include": "link.json",
    "hard-link-to-include": "hard.json",
    "via-dotdot": "codes/../find.json",
}


@pytest.mark.parametrize("out", REPORT_OUTS.values(), ids=REPORT_OUTS.keys())
def test_report_never_writes_over_an_input(inputs, tmp_path, out):
    w = tmp_path / "w"
    shutil.copytree(inputs, w)
    _links(w)
    before = snapshot(w)
    res = run_cli("report", w / "ck", w / "codes", "--include", w / "find.json", "--out", w / out)
    assert res.exit_code == 2, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbtool: error: --out ") and "Traceback" not in res.output
    assert snapshot(w) == before


def test_report_elsewhere_still_written(inputs, tmp_path):
    res = run_cli("report", inputs / "ck", inputs / "codes", "--out", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r.html").stat().st_size > 0


@pytest.mark.parametrize("out", ["ck", "."], ids=["the-checkpoint", "holds-the-checkpoint"])
def test_embed_never_writes_over_its_checkpoint(inputs, tmp_path, out):
    w = tmp_path / "w"
    shutil.copytree(inputs, w)
    before = snapshot(w)
    res = run_cli("embed", w / "ck", "--out", w / out, "--overwrite", "--num-seqs", 8, "--device", "cpu")
    assert res.exit_code == 2 and "--out" in res.stderr and res.stderr.count("\n") == 1, res.output
    assert snapshot(w) == before


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_checkpoint_files_follow_the_umask(tmp_path, umask):
    out = tmp_path / "ck"
    res = subprocess.run([sys.executable, "-m", "cbtool", "train", "--preset", "tiny", "--steps", "2", "--out",
                          str(out), "--device", "cpu", "--keep-optimizer"], capture_output=True, text=True,
                         timeout=600, preexec_fn=lambda: os.umask(umask),
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    files = [p for p in out.iterdir() if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, (p.name, oct(p.stat().st_mode))
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("where", ["file", "inside-folder"])
@pytest.mark.parametrize("command", ["train", "embed"])
def test_corpus_path_that_is_not_utf8_refused_up_front(tmp_path, where, command):
    """A corpus name the file system allows but JSON cannot record: refused before anything is written."""
    root = os.fsencode(tmp_path)
    bad = root + b"/caf\xe9.txt" if where == "file" else root + b"/corpus"
    if where == "inside-folder":
        os.mkdir(bad)
        with open(bad + b"/caf\xe9.txt", "w") as f:
            f.write("some text to train on\n" * 50)
    else:
        with open(bad, "w") as f:
            f.write("some text to train on\n" * 50)
    out = tmp_path / "out"
    args = (["train", "--task", "text", "--preset", "tiny", "--steps", "1", "--device", "cpu"] if command == "train"
            else ["embed", str(Path(__file__).parents[2] / "fixtures" / "text"), "--device", "cpu"])
    res = subprocess.run([sys.executable.encode(), b"-m", b"cbtool", *[a.encode() for a in args], b"--corpus", bad,
                          b"--out", os.fsencode(out)], capture_output=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = res.stderr.decode("utf-8")  # the error line itself is valid UTF-8: the name is shown escaped
    assert res.returncode == 2, err
    assert err.count("\n") == 1 and "not valid UTF-8" in err and "caf\\xe9" in err, err
    assert not out.exists()
