"""embed stops each forward once the selected sites' codebooks have run: the same codes, fewer layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbtool.embedding import plan_embed
from cbtool.formats.checkpoint import load_checkpoint
from cbtool.formats.store import Store

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def test_embed_skips_the_layers_after_its_sites_with_the_same_codes(tmp_path):
    ckpt = load_checkpoint(FIXTURES / "tokfsm", device="cpu")
    model = ckpt.model
    last = model.locator.n_layer - 1
    calls = {"last attention": 0}

    def count(_module, _args, _output):
        calls["last attention"] += 1

    handle = model.locator.attention(last).register_forward_hook(count)
    try:
        plan_embed(ckpt, tmp_path / "all", num_seqs=32, batch_size=8).run()
        full_calls = calls["last attention"]
        calls["last attention"] = 0
        plan_embed(ckpt, tmp_path / "first", num_seqs=32, batch_size=8, sites="0.*").run()
    finally:
        handle.remove()
    assert full_calls == 4 and calls["last attention"] == 0  # 4 batches; with 0.* none reached the last layer
    everything, first = Store(tmp_path / "all"), Store(tmp_path / "first")
    assert first.manifest["sites"] and all(e["name"].startswith("0.") for e in first.manifest["sites"])
    for e in first.manifest["sites"]:
        assert np.array_equal(first.codes(0, e["name"]), everything.codes(0, e["name"]))
