"""The checkpoint format: validation refuses every kind of damage with exit 2 and one line."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_cli


def _edit_meta(ckpt, fn):
    p = ckpt / "cbtool.json"
    meta = json.loads(p.read_text())
    fn(meta)
    p.write_text(json.dumps(meta))


def _flip_byte(path, offset_from_end=10):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {
    "missing-dir": lambda c: __import__("shutil").rmtree(c),
    "file-not-dir": lambda c: (__import__("shutil").rmtree(c), c.write_text("x")),
    "no-meta": lambda c: (c / "cbtool.json").unlink(),
    "meta-not-json": lambda c: (c / "cbtool.json").write_text("{not json"),
    "meta-not-utf8": lambda c: (c / "cbtool.json").write_bytes(b"\xff\xfe\x00"),
    "wrong-format": lambda c: _edit_meta(c, lambda m: m.update(format="other")),
    "future-version": lambda c: _edit_meta(c, lambda m: m.update(format_version=99)),
    "missing-codebooks-key": lambda c: _edit_meta(c, lambda m: m.pop("codebooks")),
    "codebooks-wrong-type": lambda c: _edit_meta(c, lambda m: m.update(codebooks="x")),
    "wrong-shape": lambda c: _edit_meta(c, lambda m: m["codebooks"][1].update(num_codes=65)),
    "bad-k": lambda c: _edit_meta(c, lambda m: m["codebooks"][0].update(k="one")),
    "wrong-hash": lambda c: _edit_meta(c, lambda m: m["files"].update({"model.safetensors": "0" * 64})),
    "path-escape": lambda c: _edit_meta(c, lambda m: m["files"].update({"../x": "0" * 64})),
    "bad-model-config": lambda c: _edit_meta(c, lambda m: m["model"]["config"].update(n_head=3)),
    "truncated-codebooks": lambda c: (c / "codebooks.safetensors").write_bytes(
        (c / "codebooks.safetensors").read_bytes()[:100]),
    "bitflip-model": lambda c: _flip_byte(c / "model.safetensors"),
    "missing-model-file": lambda c: (c / "model.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["info", "eval"])
def test_damaged_checkpoint_exit_2(tiny_checkpoint, damage, command):
    DAMAGE[damage](tiny_checkpoint)
    res = run_cli(command, tiny_checkpoint, "--device", "cpu") if command == "eval" else run_cli(
        command, tiny_checkpoint)
    assert res.exit_code == 2, (res.stdout, res.stderr)
    assert res.stderr.startswith("cbtool: error: ") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("damage", ["missing-dir", "meta-not-json", "wrong-shape", "wrong-hash", "truncated-codebooks",
                                    "bitflip-model"])  # a sample of every kind of damage but a bad model config
def test_damaged_checkpoint_refused_by_load_codebooks(tiny_checkpoint, damage):
    """`cbtool.load_codebooks` (code vectors without the model) refuses the same damage as a full load."""
    import cbtool

    DAMAGE[damage](tiny_checkpoint)
    with pytest.raises(cbtool.UserError):
        cbtool.load_codebooks(tiny_checkpoint)


def test_consistent_edit_with_rehash_still_refused_by_shape(tiny_checkpoint):
    """Changing a codebook size in cbtool.json is caught by the tensor shape check."""
    _edit_meta(tiny_checkpoint, lambda m: m["codebooks"][1].update(dim=31))
    res = run_cli("info", tiny_checkpoint)
    assert res.exit_code == 2 and "shape" in res.stderr


def test_failed_write_keeps_existing_checkpoint(tiny_checkpoint, monkeypatch):
    """A write error (disk full) while saving over a checkpoint: exit 2, the old one intact."""
    import cbtool.formats.checkpoint as ck

    real = ck.save_file

    def full_disk(tensors, path, *a, **kw):
        if path.endswith("model.safetensors"):
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **kw)

    monkeypatch.setattr(ck, "save_file", full_disk)
    before = {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir()}
    res = run_cli("train", "--preset", "tiny", "--steps", "1", "--base-steps", "1", "--out", tiny_checkpoint,
                  "--overwrite")
    assert res.exit_code == 2 and "No space left" in res.stderr
    assert {p.name: p.read_bytes() for p in tiny_checkpoint.iterdir()} == before
    assert [p.name for p in tiny_checkpoint.parent.iterdir()] == [tiny_checkpoint.name]


def test_existing_checkpoint_needs_overwrite(tiny_checkpoint):
    before = (tiny_checkpoint / "cbtool.json").read_bytes()
    res = run_cli("train", "--preset", "tiny", "--steps", "1", "--base-steps", "1", "--out", tiny_checkpoint)
    assert res.exit_code == 2 and "--overwrite" in res.stderr
    assert (tiny_checkpoint / "cbtool.json").read_bytes() == before


def test_refuses_to_overwrite_a_non_checkpoint_directory(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("do not lose me")
    res = run_cli("train", "--preset", "tiny", "--steps", "1", "--base-steps", "1", "--out", target)
    assert res.exit_code == 2 and "not a cbtool checkpoint" in res.stderr
    assert (target / "thesis.tex").read_text() == "do not lose me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]
