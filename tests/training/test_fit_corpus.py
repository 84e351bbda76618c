"""The text default fitted to a small corpus (cbtool/training/config.py `fit_to_corpus`): codebook sizes bounded
by the training tokens, steps by passes over them, said in the log; options given are kept; the plays keep the
documented default."""

from __future__ import annotations

import json

from cbtool.training.config import TEXT_PRESETS, fit_to_corpus, make_config
from tests.helpers import run_cli

FOUR_LAYERS = [(layer, comp) for layer in range(4) for comp in ("attn_heads", "mlp")]


def fitted(tokens: int, **options):
    cfg = make_config("default", corpus="x.txt", **options)
    note = fit_to_corpus(cfg, tokens, FOUR_LAYERS, 4)
    return cfg, note


def test_the_plays_keep_the_default():
    cfg, note = fitted(3_200_000)  # the plays' training tokens at vocab 2048
    preset = TEXT_PRESETS["default"]
    assert note is None
    assert (cfg.num_codes, cfg.site_codes, cfg.base_steps, cfg.steps) == (
        preset["num_codes"], preset["site_codes"], preset["base_steps"], preset["steps"])


def test_a_small_corpus_gets_fewer_codes_and_steps():
    cfg, note = fitted(15_000)
    assert (cfg.num_codes, cfg.site_codes) == (64, "")  # 15,000 / 128 = 117 -> 64 at every site
    assert (cfg.base_steps, cfg.steps) == (100, 50)
    assert "15,000 training tokens" in note and "C=64" in note and "100 base + 50 codebook steps" in note
    cfg, note = fitted(1_000_000)  # 7,812 codes' worth -> 4,096: the MLPs shrink to the heads' 4,096
    assert (cfg.num_codes, cfg.site_codes) == (4096, "") and "C=4,096" in note
    cfg, _ = fitted(1_500_000)  # 11,718 -> 8,192 at the MLPs, the heads keep 4,096
    assert (cfg.num_codes, cfg.site_codes) == (4096, ",".join(f"{i}.mlp=8192" for i in range(4)))
    assert cfg.base_steps == 1200  # 8 passes over 1M tokens is more than 1,200 steps of 16 x 128


def test_options_given_are_kept():
    cfg, note = fitted(15_000, num_codes=512)
    assert cfg.num_codes == 512 and (cfg.base_steps, cfg.steps) == (100, 50)
    cfg, _ = fitted(15_000, steps=20)
    assert (cfg.base_steps, cfg.steps, cfg.num_codes) == (1200, 20, 64)
    cfg, note = fitted(15_000, base_steps=300, site_codes="mlp=128")
    assert note is None and (cfg.base_steps, cfg.site_codes) == (300, "mlp=128")
    assert make_config("tiny", corpus="x.txt").fit_corpus == ""  # only the text default fits itself


def test_train_on_a_small_corpus_says_so(tmp_path):
    corpus = tmp_path / "small.txt"
    corpus.write_text(" ".join(f"line {i} of a small corpus about ships and the sea." for i in range(900)),
                      encoding="utf-8")
    out = tmp_path / "ck"
    res = run_cli("train", "--corpus", corpus, "--out", out, "--device", "cpu", "--layers", "1", "--heads", "2",
                  "--d-model", "16", "--d-mlp", "32", "--vocab-size", "300", "--batch-size", "4", "--kmeans-seqs", "4")
    assert res.exit_code == 0, res.output
    assert "the text default fitted to" in res.output and "C=64" in res.output
    cfg = json.loads((out / "cbtool.json").read_text())["training"]["config"]
    assert cfg["num_codes"] == 64 and cfg["site_codes"] == "" and cfg["base_steps"] >= 100
    assert [c["num_codes"] for c in json.loads((out / "cbtool.json").read_text())["codebooks"]] == [64, 64]
