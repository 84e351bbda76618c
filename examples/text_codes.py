# %% [markdown]
# # Codes for months in text: a notebook-style tour of the Python API
#
# Train a tiny text model with codebooks on a small corpus, embed it, find the codes that fire on month
# names, look at where one fires, and steer generation with it. Runs in about a minute on a laptop CPU:
#
#     python examples/text_codes.py [WORK_DIR]
#
# Each `# %%` block is a notebook cell (VS Code / Jupytext open this file as a notebook).

# %%
import sys
import tempfile
from pathlib import Path

import cbtool

HERE = Path(__file__).resolve().parent
CORPUS = HERE.parent / "fixtures" / "corpus.txt"  # 60 short sentences with months and archaic pronouns
work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="cbtool-example-"))

# %% train: a byte-level BPE and a 2-layer transformer, then codebooks on its MLPs
ckpt = cbtool.train_model(work / "checkpoint", "tiny", corpus=CORPUS, sites="mlp", num_codes=64, seq_len=32,
                          base_steps=100, steps=40, overwrite=True)
on, off = (ckpt.meta["training"]["results"][k]["loss"] for k in ("on", "bypassed"))
print(f"held-out LM loss: codebooks on {on:.3f}, bypassed {off:.3f} nats/token")

# %% embed the corpus: every token's code at every site
store = cbtool.embed(ckpt, work / "codes", CORPUS, overwrite=True)
print(f"{store.num_tokens} tokens embedded at sites {list(store.sites)}")

# %% which codes fire on month names?
months = "January|February|March|April|May|June|July|August|September|October|November|December"
found = cbtool.find_codes(store, regex=months, sort="f1", top=5)
print(f"the regex selects {found['feature_tokens']} tokens")
for row in found["rows"]:
    print(f"{row['code']:>10}  precision {row['precision']:.2f}  recall {row['recall']:.2f}  {row['examples']}")
best = found["rows"][0]["code"]

# %% where does the best one fire?
contexts = cbtool.code_contexts(store, best, examples=5, context=6)
print(f"{best} fires on {contexts['fires']} tokens; most often {[t['token'] for t in contexts['top_tokens'][:5]]}")
for ex in contexts["examples"]:
    print("  ...", (ex["left"] + "[" + ex["token"] + "]" + ex["right"]).replace("\n", " / "), "...")

# %% steer: force it on while generating after "In", beside unsteered twins with the same seeds
steered = cbtool.steer(ckpt, [best], ["In"], samples=4, max_new_tokens=6, regex=months)
for row in steered["rows"]:
    print(f"steered {row['steered']!r:40} twin {row['baseline']!r}")
print(f"month rate: steered {steered['steered']['rate']:.2f}, twins {steered['baseline']['rate']:.2f}")

# %% dead codes: how much of each codebook the corpus uses
for site in cbtool.dead_codes(store)["sites"]:
    print(f"{site['site']}: {site['dead']} of {site['codes']} codes dead, perplexity {site['perplexity']:.1f}")
