"""JSONL is split on "\\n" only (cbtool/util/strict_json.py `lines`): U+2028, U+2029, U+0085, \\x0b, \\x0c,
\\x1c-\\x1e, which `str.splitlines()` also splits at and JSON strings may hold unescaped, stay inside their
record, in every reader of line-per-record files."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from cbtool.model.refs import codes_from_results
from cbtool.tasks.corpora import _read_jsonl
from cbtool.training.metrics_log import read_metrics
from cbtool.util import strict_json

SEPARATORS = "\u2028\u2029\u0085\x0b\x0c\x1c\x1d\x1e"
texts = st.text(st.sampled_from([*SEPARATORS, "a", "é", " ", "\r"]), min_size=1, max_size=12)


def _jsonl(rows: list[dict], crlf: bool = False) -> str:
    end = "\r\n" if crlf else "\n"
    return "".join(json.dumps(r, ensure_ascii=False) + end for r in rows)


@settings(max_examples=150, deadline=None)
@given(st.lists(texts, min_size=1, max_size=5), st.booleans())
def test_every_jsonl_reader_keeps_separators_inside_records(tmp_path_factory, values, crlf):
    d = tmp_path_factory.mktemp("jsonl")
    text = _jsonl([{"text": v} for v in values], crlf)
    assert [strict_json.loads(x, "t")["text"] for x in strict_json.lines(text)] == values

    corpus = d / "c.jsonl"
    corpus.write_text(text, encoding="utf-8", newline="")
    assert [s.text for s in _read_jsonl(corpus, "text")] == values

    metrics = d / "metrics.jsonl"
    metrics.write_text(_jsonl([{"step": i, "note": v} for i, v in enumerate(values)], crlf), encoding="utf-8",
                       newline="")
    assert [r["note"] for r in read_metrics(metrics)] == values

    rows = _jsonl([{"code": f"0.mlp:{i}", "note": v} for i, v in enumerate(values)], crlf)
    assert codes_from_results(rows, "rows", len(values)) == [f"0.mlp:{i}" for i in range(len(values))]


def test_lines_matches_splitlines_on_plain_text():
    for text in ("", "a", "a\n", "a\nb", "a\r\nb\r\n", "\n", "a\n\nb\n"):
        assert strict_json.lines(text) == text.splitlines()
