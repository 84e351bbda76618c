"""`cbtool train`: train a model with codebooks and write a checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from cbtool.checkpoint import load_checkpoint, recover_interrupted_swap
from cbtool.commands.common import DEVICE_HELP, RUN_OPTION_HELP, default_checkpoint, emit_json, err, out
from cbtool.errors import UserError
from cbtool.train import Trainer, apply_preset, resolve_device


def train(
    task: str | None = typer.Option(None, "--task", help="tokfsm (default) or text (default with --corpus "
                                    "or --base-model; the built-in Shakespeare corpus if no --corpus)."),
    preset: str = typer.Option("default", "--preset",
                               help="default (CPU, ~4-5 min), paper (20k steps x 512, GPU), tiny."),
    sites: str | None = typer.Option(None, "--sites", help="Where codebooks go: attn-heads,mlp (default), attn, "
                                     "mlp, 2.mlp, 0-1.attn, or a layer list 0,2."),
    num_codes: int | None = typer.Option(None, "--num-codes", help="Codes per codebook (C)."),
    site_codes: str | None = typer.Option(None, "--site-codes", help="C for some codebooks, as SITES=C items "
                                          "('0.mlp=4000', 'mlp=2000'); '' = --num-codes everywhere (the "
                                          "default with your own --sites or --num-codes)."),
    kmeans_seqs: int | None = typer.Option(None, "--kmeans-seqs", help="Sequences whose activations "
                                           "initialise the codebooks by k-means."),
    k: int | None = typer.Option(None, "--k", help="Codes selected per token."),
    base_steps: int | None = typer.Option(None, "--base-steps", help="Phase 1: plain transformer steps "
                                          "(0 = train codebooks from scratch with the model)."),
    steps: int | None = typer.Option(None, "--steps", help="Phase 2: codebook training steps."),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lr: float | None = typer.Option(None, "--lr", help="Phase 1 learning rate."),
    codebook_lr: float | None = typer.Option(None, "--codebook-lr", help="Phase 2 learning rate."),
    mse_coef: float | None = typer.Option(None, "--mse-coef", help="Weight of the reconstruction MSE."),
    commit_coef: float | None = typer.Option(None, "--commit-coef", help="Weight of the commitment term."),
    train_base: bool | None = typer.Option(None, "--train-base/--freeze-base",
                                           help="Phase 2: also fine-tune the base weights."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Save every N steps (0: never)."),
    seed: int | None = typer.Option(None, "--seed"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    out_dir: Path | None = typer.Option(None, "--out", help="Checkpoint directory (default RUN/checkpoint)."),
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),
    resume: bool = typer.Option(False, "--resume", help="Continue the unfinished run at --out exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing checkpoint at --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON document."),
    base_model: str | None = typer.Option(None, "--base-model", help="Local Hugging Face causal LM directory "
                                          "(GPT-2, GPT-NeoX/Pythia, Llama): frozen base + codebooks."),
    gguf_file: str | None = typer.Option(None, "--gguf-file", help="A GGUF file in --base-model to load."),
    corpus: str | None = typer.Option(None, "--corpus", help="Text corpus: .txt, .jsonl or a folder."),
    text_field: str | None = typer.Option(None, "--text-field", help="JSON field with the text (.jsonl)."),
    seq_len: int | None = typer.Option(None, "--seq-len", help="Tokens per training block (text)."),
    vocab_size: int | None = typer.Option(None, "--vocab-size", help="BPE vocabulary (built-in text model)."),
    base_lr_factor: float | None = typer.Option(None, "--base-lr-factor",
                                                help="With --train-base: base lr = codebook lr x this."),
) -> None:
    """Train a transformer with codebooks (TokFSM by default) and write a checkpoint.

    Examples:
      cbtool train                          # the default: ~4-5 min on a 2-core CPU, >= 97.5% accuracy
      cbtool train --site-codes ''          # the earlier default: C=1000 at every site (95.6%)
      cbtool train --sites mlp --num-codes 2000 --k 2 --out runs/mlp
      cbtool train --preset paper --device cuda
      cbtool train --resume                 # after an interruption
      cbtool train --task text              # built-in text model on Shakespeare, <= 10 min on a CPU
      cbtool train --base-model ./pythia-70m --corpus notes.jsonl --text-field body --sites 3.mlp
    """
    target = default_checkpoint(out_dir, run)
    dev = resolve_device(device)
    if resume:
        recover_interrupted_swap(target)
        if not target.exists():
            raise UserError(f"nothing to resume: {target} does not exist")
        ckpt = load_checkpoint(target, with_train_state=True)
        trainer = Trainer.resume(ckpt, target, dev, err)
        if trainer.step >= trainer.total_steps:
            raise UserError(f"{target} is already finished ({trainer.step} steps); nothing to resume")
        err.print(f"resuming {target} at step {trainer.step}/{trainer.total_steps}")
    else:
        check_target(target, overwrite)
        task = task or ("text" if base_model is not None or corpus is not None else "tokfsm")
        cfg = apply_preset(preset, task, base_model)
        overrides = {"task": task, "base_model": base_model, "gguf_file": gguf_file, "corpus": corpus,
                     "text_field": text_field, "seq_len": seq_len, "vocab_size": vocab_size,
                     "base_lr_factor": base_lr_factor,
                     "sites": sites, "num_codes": num_codes, "site_codes": site_codes,
                     "kmeans_seqs": kmeans_seqs, "k": k, "base_steps": base_steps,
                     "steps": steps, "batch_size": batch_size, "lr": lr, "codebook_lr": codebook_lr,
                     "mse_coef": mse_coef, "commit_coef": commit_coef, "train_base": train_base,
                     "checkpoint_every": checkpoint_every, "seed": seed}
        if site_codes is None and (sites is not None or num_codes is not None):
            cfg.site_codes = ""  # the preset's sizes are for its own sites: own --sites/--num-codes = uniform C
        for name, value in overrides.items():
            if value is not None:
                setattr(cfg, name, value)
        trainer = Trainer(cfg, target, dev, err)
        sizes = f"C={cfg.num_codes}" + (f" ({cfg.site_codes})" if cfg.site_codes else "")
        err.print(f"training {cfg.task} on {dev}: {len(trainer.model.sites)} sites, {sizes}, k={cfg.k}, "
                  f"{cfg.base_steps} base + {cfg.steps} codebook steps -> {target}")
    results = trainer.run()
    if as_json:
        emit_json("train", {"checkpoint": str(target), "results": results})
        return
    on, off = results["on"], results["bypassed"]
    out.print(f"checkpoint: {target}  ({results['train_seconds']:.0f} s of training)")
    if "perplexity" in on:
        out.print(f"LM loss (nats/token) codebooks on {on['loss']:.4f}  bypassed {off['loss']:.4f}")
        out.print(f"perplexity           codebooks on {on['perplexity']:.2f}  "
                  f"bypassed {off['perplexity']:.2f}")
        return
    out.print(f"transition accuracy  codebooks on {on['transition_accuracy']:.3f}   "
              f"bypassed {off['transition_accuracy']:.3f}")
    out.print(f"first transition     codebooks on {on['first_transition_accuracy']:.3f}   "
              f"bypassed {off['first_transition_accuracy']:.3f}")
    out.print(f"loss (nats/token)    codebooks on {on['loss']:.4f}  bypassed {off['loss']:.4f}")


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse before any work to replace what the user has, unless asked to."""
    if target.exists() and not target.is_dir():
        raise UserError(f"--out {target} exists and is not a directory")
    parent = target.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():  # refuse now rather than after training (nothing could be saved)
        raise UserError(f"cannot write checkpoint to {target}: {parent} is not a directory")
    if target.is_dir() and any(target.iterdir()):
        if not (target / "cbtool.json").is_file():
            raise UserError(f"--out {target} exists and is not a cbtool checkpoint; refusing to replace it")
        if not overwrite:
            raise UserError(f"checkpoint {target} exists; pass --overwrite to replace it or --resume to continue it")


def register(app: typer.Typer) -> None:
    app.command("train")(train)
