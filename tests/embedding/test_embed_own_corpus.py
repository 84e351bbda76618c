"""`cbtool embed CK` of a text checkpoint's own corpus is sized to the run: at most 16 x the tokens it trained on
(at least 65,536), said on stderr; `--max-tokens` and `--split` choose otherwise (cbtool/commands/embed.py)."""

from __future__ import annotations

import json

import pytest

from cbtool.formats.store import Store
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    corpus = root / "corpus.txt"
    words = ["ship", "sea", "king", "night", "gold", "war", "crown", "storm", "fire", "ghost"]
    corpus.write_text("\n".join(" ".join(words[(i * 7 + j * 3) % 10] + str((i + j) % 97) for j in range(12))
                                for i in range(9000)), encoding="utf-8")
    ck = root / "ck"
    res = run_cli("train", "--task", "text", "--preset", "tiny", "--corpus", corpus, "--out", ck, "--device", "cpu")
    assert res.exit_code == 0, res.output
    return root, ck


def test_own_corpus_is_capped_and_says_so(run):
    root, ck = run
    res = run_cli("embed", ck, "--out", root / "codes", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    assert "embedding the first 65,536 of the corpus's" in res.stderr
    assert json.loads(res.stdout)["tokens"] <= 65_536
    assert Store(root / "codes").num_tokens <= 65_536


def test_max_tokens_and_split_are_not_capped(run):
    root, ck = run
    res = run_cli("embed", ck, "--out", root / "more", "--max-tokens", "70000", "--device", "cpu", "--json")
    assert res.exit_code == 0 and "embedding the first" not in res.stderr, res.output
    assert 65_536 < json.loads(res.stdout)["tokens"] <= 70_000
    res = run_cli("embed", ck, "--out", root / "held", "--split", "heldout", "--device", "cpu", "--json")
    assert res.exit_code == 0 and "embedding the first" not in res.stderr, res.output
