"""Said, not ignored: a text checkpoint's corpus hash (eval and embed warn when the corpus changed) and
symlinks that would lead out of a code store (refused, exit 2)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from cbtool.tasks import corpora
from tests.helpers import run_cli

pytest.importorskip("tokenizers", reason="the `text` extra (tokenizers) is not installed")

LINE = "Café — naïve text; thee, thy, thine. In January the king spoke of March and of May.\n"


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("cbtool: warning:")]


def test_text_checkpoint_records_its_corpus_hash_and_eval_embed_warn_when_it_changed(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text(LINE * 60, encoding="utf-8")
    (corpus / "sub" / "b.txt").write_text(LINE.upper() * 60, encoding="utf-8")
    ck = tmp_path / "ck"
    res = run_cli("train", "--corpus", corpus, "--preset", "tiny", "--steps", "2", "--out", ck, "--device", "cpu")
    assert res.exit_code == 0, res.output
    meta_file = ck / "cbtool.json"
    recorded = json.loads(meta_file.read_text())["task"]["corpus_sha256"]
    assert recorded == corpora.corpus_sha256(str(corpus)) and len(recorded) == 64

    def eval_() -> list[str]:
        r = run_cli("eval", ck, "--blocks", "2", "--device", "cpu", "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["kind"] == "eval"
        return _warnings(r.stderr)

    assert eval_() == []  # unchanged: no warning
    with open(corpus / "sub" / "b.txt", "a", encoding="utf-8") as f:
        f.write("One line more.\n")
    lines = eval_()
    assert len(lines) == 1 and str(corpus) in lines[0] and "changed" in lines[0], lines
    # embed without --corpus re-reads the training corpus: the same one line, and it still runs
    r = run_cli("embed", ck, "--out", tmp_path / "codes", "--device", "cpu", "--json")
    assert r.exit_code == 0, r.output
    assert len(_warnings(r.stderr)) == 1 and (tmp_path / "codes" / "manifest.json").is_file()
    # a resumed run reads the corpus again: the same line; it records the corpus it read then
    r = run_cli("train", "--resume", "--out", ck, "--steps", "3", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert len(_warnings(r.stderr)) == 1
    assert json.loads(meta_file.read_text())["task"]["corpus_sha256"] == corpora.corpus_sha256(str(corpus))
    assert eval_() == []
    # a checkpoint from before the field: nothing to compare, no warning
    meta = json.loads(meta_file.read_text())
    del meta["task"]["corpus_sha256"]
    meta_file.write_text(json.dumps(meta))
    assert eval_() == []


def test_corpus_hash_follows_names_and_bytes(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("one", encoding="utf-8")
    first = corpora.corpus_sha256(str(tmp_path / "c"))
    os.rename(tmp_path / "c" / "a.txt", tmp_path / "c" / "b.txt")
    assert corpora.corpus_sha256(str(tmp_path / "c")) != first
    os.rename(tmp_path / "c" / "b.txt", tmp_path / "c" / "a.txt")
    assert corpora.corpus_sha256(str(tmp_path / "c")) == first
    (tmp_path / "c" / "notes.md").write_text("not read by the text task", encoding="utf-8")
    assert corpora.corpus_sha256(str(tmp_path / "c")) == first  # only the files the task reads count


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


def test_store_symlinks_that_lead_outside_are_refused(tiny_checkpoint, tmp_path):
    store = tmp_path / "codes"
    res = run_cli("embed", tiny_checkpoint, "--out", store, "--num-seqs", 20, "--shard-tokens", 500,
                  "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    shard = store / "shard-000000"
    find = ("find-codes", store, "--labels", "state", "--json")
    # a link that stays inside the store is fine
    (store / "kept").mkdir()
    shutil.move(shard / "tokens.npy", store / "kept" / "tokens.npy")
    (shard / "tokens.npy").symlink_to(Path("..") / "kept" / "tokens.npy")
    assert run_cli(*find).exit_code == 0
    # the same bytes outside the store: refused before anything is read or written
    outside = tmp_path / "elsewhere.npy"
    shutil.copy(store / "kept" / "tokens.npy", outside)
    (shard / "tokens.npy").unlink()
    (shard / "tokens.npy").symlink_to(outside)
    before = _snapshot(tmp_path)
    res = run_cli(*find)
    assert res.exit_code == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cbtool: error:") and "shard-000000/tokens.npy" in lines[0]
    assert "outside the store" in lines[0] and "Traceback" not in res.output
    assert _snapshot(tmp_path) == before
    # a whole shard directory linked out of the store: refused too, for readers and a resuming writer
    (shard / "tokens.npy").unlink()
    shutil.move(store / "kept" / "tokens.npy", shard / "tokens.npy")
    shutil.move(shard, tmp_path / "shard-copy")
    shard.symlink_to(tmp_path / "shard-copy", target_is_directory=True)
    for args in (find, ("embed", tiny_checkpoint, "--out", store, "--num-seqs", 20, "--shard-tokens", 500,
                        "--device", "cpu")):
        res = run_cli(*args)
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
        assert "shard-000000 is a symlink" in res.stderr
