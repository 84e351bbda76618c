"""The public Python API (docs/api.md): its names, the page's own code run as written, and examples/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_all_names_resolve_and_train_model_is_not_shadowed():
    import cbtool.training.config  # noqa: F401 - the submodule must not hide the API function

    for name in cbtool.__all__:
        assert getattr(cbtool, name) is not None, name
    assert callable(cbtool.train_model) and cbtool.train_model.__module__ == "cbtool.api"
    for name in ("load_checkpoint", "train_model", "embed", "open_store", "find_codes", "dead_codes",
                 "code_contexts", "steer"):
        assert name in cbtool.__all__ and name in (ROOT / "docs" / "api.md").read_text()


def test_api_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/api.md's code blocks, in order, in one session started at a repository root."""
    pytest.importorskip("tokenizers")
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures")
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "api.md").read_text(), flags=re.S)
    assert len(blocks) >= 3
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102 - the page's own examples
    printed = capsys.readouterr().out
    assert "transition accuracy, codebooks on:" in printed and "changed:" in printed
    assert re.fullmatch(r"\d+\.(mlp|attn|attn\.h\d+):\d+", namespace["best"])
    assert len(namespace["steered"]["rows"]) == 4 and namespace["store"].num_tokens == 64 * 128
    assert namespace["text"].task.name == "text"


def test_example_script_runs(tmp_path):
    pytest.importorskip("tokenizers")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "text_codes.py"), str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out LM loss" in proc.stdout and "month rate" in proc.stdout
    assert (tmp_path / "work" / "codes" / "manifest.json").is_file()
