"""Training settings: `TrainConfig`, whose fields (declared with `option()`) give `cbtool train` its options
and `cbtool.train_model` its keyword arguments, and the presets they start from (docs/train.md)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import Field, dataclass, field, fields, replace
from typing import Any

from cbtool.errors import UserError
from cbtool.model.specs import ModelConfig
from cbtool.training import metrics_file as metrics_log
from cbtool.util.limits import MAX_CODEBOOK_BYTES, MAX_CODES, MAX_SEQ_LEN, MAX_VOCAB, check_seed


def option(default: Any = None, help: str = "", flag: str | None = None, cli: bool = True,
           factory: Callable[[], Any] | None = None) -> Any:
    """A TrainConfig field, declared once: its default, its documentation, and whether `cbtool train`
    offers it as an option (`--name-with-dashes`, or `flag`). The CLI and the overrides derive from these."""
    meta = {"help": help, "flag": flag, "cli": cli}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Every training setting (docs/api.md lists them). Stored in cbtool.json as training.config.

    Unset options come from a preset (PRESETS, TEXT_PRESETS, HF_PRESETS below); `cbtool train --NAME`
    and `cbtool.train_model(..., NAME=...)` override them."""

    task: str = option("tokfsm", "tokfsm (default) or text (default with --corpus or --base-model; the "
                       "built-in Shakespeare corpus if no --corpus).")
    sites: str = option("attn-heads,mlp", "Where codebooks go: attn-heads,mlp (default), attn, mlp, 2.mlp, "
                        "0-1.attn, or a layer list 0,2.")
    num_codes: int = option(1000, "Codes per codebook (C).")
    site_codes: str = option("", "C for some codebooks, as SITES=C items ('0.mlp=4000', 'mlp=2000'; later items "
                             "win); '' = --num-codes everywhere (the default with your own --sites or --num-codes).")
    k: int = option(1, "Codes selected per token.")
    base_steps: int = option(900, "Phase 1: plain transformer steps (0 = train codebooks from scratch with "
                             "the model).")
    steps: int = option(300, "Phase 2: codebook training steps.")
    batch_size: int = option(32, "Sequences per training step.")
    lr: float = option(3e-3, "Phase 1 learning rate.")
    codebook_lr: float = option(2e-3, "Phase 2 learning rate.")
    mse_coef: float = option(0.1, "Weight of the reconstruction MSE.")
    commit_coef: float = option(0.0, "Weight of the commitment term.")
    train_base: bool = option(False, "Phase 2: also fine-tune the base weights.", flag="--train-base/--freeze-base")
    base_lr_factor: float = option(0.1, "With --train-base: base lr = codebook lr x this.")
    kmeans_seqs: int = option(256, "Sequences whose activations initialise the codebooks by k-means.")
    kmeans: str = option("sklearn", "k-means implementation (docs/train.md): sklearn or torch.")
    dead_window: int = option(100, "Revive codes dead over this many phase-2 steps (0: never).", cli=False)
    checkpoint_every: int = option(200, "Save every N steps (0: never).")
    keep_optimizer: bool = option(False, "Keep the optimizer moments in the finished checkpoint too (intermediate "
                                  "saves always hold them, for --resume; a finished run cannot be resumed, so the "
                                  "final save drops them: about 3/4 of a built-in checkpoint's size).",
                                  flag="--keep-optimizer/--drop-optimizer")
    log_every: int = option(metrics_log.DEFAULT_EVERY, "Write a metrics.jsonl row every N steps (default "
                            f"{metrics_log.DEFAULT_EVERY}; 0: none).")
    eval_samples: int = option(512, "TokFSM: sampled sequences for the final transition accuracy.", cli=False)
    seed: int = option(0, "Seed of the model, the data order and the TokFSM graph.")
    model: dict[str, int] = option(help="The built-in transformer (ModelConfig, docs/train.md); vocab_size and "
                                   "block_size follow the task.", cli=False, factory=lambda: ModelConfig().to_dict())
    # the built-in model's shape from the command line: folded into `model` by override(), so they stay None here
    n_layer: int | None = option(None, "Built-in model: transformer layers (default: the preset's).", flag="--layers")
    n_head: int | None = option(None, "Built-in model: attention heads per layer (default: the preset's).",
                                flag="--heads")
    d_model: int | None = option(None, "Built-in model: residual width; a multiple of --heads (default: the "
                                 "preset's).")
    d_mlp: int | None = option(None, "Built-in model: MLP hidden width (default: the preset's).")
    fsm: dict[str, int] = option(help="TokFSM: num_states, out_degree, seq_len.", cli=False,
                                 factory=lambda: {"num_states": 100, "out_degree": 10, "seq_len": 128})
    # text task and pretrained Hugging Face bases (docs/language-models.md)
    corpus: str | None = option(None, "Text corpus: .txt, .jsonl, a folder, or a named offline corpus (shakespeare, "
                                "sotu; default: shakespeare).")
    text_field: str = option("text", "JSON field with the text (.jsonl).")
    seq_len: int = option(128, "Tokens per training block (text).")
    vocab_size: int = option(4096, "BPE vocabulary (built-in text model).")
    base_model: str | None = option(None, "Local Hugging Face causal LM directory (GPT-2, GPT-NeoX/Pythia, "
                                    "Llama): frozen base + codebooks.")
    gguf_file: str | None = option(None, "A GGUF file in --base-model to load.")
    eval_blocks: int = option(256, "Text: held-out blocks for the final LM loss, codebooks on vs bypassed.",
                              cli=False)
    fit_corpus: str = option("", "What `fit_to_corpus` scales to the training tokens: 'codes', 'steps', both "
                             "comma-separated, or '' (the text default's; options given on the command line are "
                             "kept as given).", cli=False)

    def validate(self) -> None:
        for name in ("base_steps", "steps", "kmeans_seqs", "checkpoint_every", "dead_window", "log_every"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        check_seed(self.seed, "--seed")
        if self.base_steps + self.steps < 1:
            raise UserError("nothing to train: --steps and --base-steps are both 0")
        if self.kmeans not in ("sklearn", "torch"):
            raise UserError(f"unknown k-means implementation {self.kmeans!r}: use sklearn or torch")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 1 <= self.num_codes <= MAX_CODES:
            raise UserError(f"--num-codes must be in 1..{MAX_CODES}, got {self.num_codes}")
        if not 1 <= self.k <= self.num_codes:
            raise UserError(f"--k must be in 1..--num-codes ({self.num_codes}), got {self.k}")
        for name in ("lr", "codebook_lr", "base_lr_factor"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
        for name in ("mse_coef", "commit_coef"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if self.task not in ("tokfsm", "text"):
            raise UserError(f"unknown --task {self.task!r}: available: tokfsm, text")
        if self.base_model is not None and self.task != "text":
            raise UserError("--base-model trains on text: use --task text (the default with --base-model)")
        if self.gguf_file is not None and self.base_model is None:
            raise UserError("--gguf-file needs --base-model DIR (the folder holding the file)")
        if self.task == "text" and not 2 <= self.seq_len <= MAX_SEQ_LEN:
            raise UserError(f"--seq-len must be in 2..{MAX_SEQ_LEN}, got {self.seq_len}")
        if self.task == "text" and not 1 <= self.vocab_size <= MAX_VOCAB:
            raise UserError(f"--vocab-size must be in 1..{MAX_VOCAB}, got {self.vocab_size}")
        cfg = self.model
        if cfg["d_model"] % cfg["n_head"]:
            raise UserError(f"--d-model {cfg['d_model']} is not a multiple of --heads {cfg['n_head']}")
        # the largest codebook tensor must be allocatable: refuse before trying
        if self.num_codes * cfg["d_model"] * 4 > MAX_CODEBOOK_BYTES:
            raise UserError(f"--num-codes {self.num_codes} needs > {MAX_CODEBOOK_BYTES / 2**30:.0f} GiB per "
                            f"codebook; refusing")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def override(self, **values: Any) -> TrainConfig:
        """A copy with `values` set; None leaves a setting as it is (an option not given)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"unknown training option(s) {', '.join(unknown)}; see cbtool train --help")
        shape = {k: values.pop(k) for k in SHAPE_OPTIONS if values.get(k) is not None}
        for name, v in shape.items():
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= MAX_SHAPE[name]:
                raise UserError(f"{SHAPE_OPTIONS[name]} must be in 1..{MAX_SHAPE[name]}, got {v}")
        if shape and (values.get("base_model") or self.base_model) is not None:
            raise UserError(f"{', '.join(SHAPE_OPTIONS[k] for k in shape)}: a pretrained --base-model has its own "
                            f"shape; these set the built-in model's")
        values = {k: v for k, v in values.items() if k not in SHAPE_OPTIONS}
        new = replace(self, **{k: v for k, v in values.items() if v is not None})
        if shape:
            new.model = {**new.model, **shape}
        return new


# `--layers/--heads/--d-model/--d-mlp` -> ModelConfig keys (TrainConfig field name = ModelConfig key)
SHAPE_OPTIONS = {"n_layer": "--layers", "n_head": "--heads", "d_model": "--d-model", "d_mlp": "--d-mlp"}
MAX_SHAPE = {"n_layer": 256, "n_head": 1024, "d_model": 65_536, "d_mlp": 262_144}


def cli_fields() -> list[Field]:
    """The TrainConfig fields `cbtool train` offers as options, in declaration order."""
    return [f for f in fields(TrainConfig) if f.metadata.get("cli")]


PRESETS: dict[str, dict[str, Any]] = {
    # 4x the codes at the layer-0 MLP, the codebook that caused nearly all the accuracy gap (README ablation)
    "default": {"site_codes": "0.mlp=4000"},
    # the paper's TokFSM scale (20k steps x batch 512), as the same two-phase recipe: for a GPU
    "paper": {"base_steps": 10_000, "steps": 10_000, "batch_size": 512, "lr": 1e-3,
              "kmeans_seqs": 1024, "checkpoint_every": 1000, "eval_samples": 2048},
    # codebooks trained with the model from step 0 (the paper's TokFSM setup), at a GPU's batch: two runs on one
    # H100 gave codebooks-on transition accuracy 0.995 and 0.919 (README "Training from scratch")
    "scratch": {"base_steps": 0, "steps": 2500, "batch_size": 512, "lr": 1e-3, "codebook_lr": 1e-3,
                "commit_coef": 0.25, "mse_coef": 1.0, "site_codes": "", "kmeans": "torch", "checkpoint_every": 500},
    # seconds on a CPU: for tests and smoke runs
    "tiny": {"base_steps": 30, "steps": 20, "batch_size": 8, "num_codes": 64, "kmeans_seqs": 16,
             "checkpoint_every": 25, "eval_samples": 32,
             "model": {"vocab_size": 11, "block_size": 128, "n_layer": 2, "n_head": 2, "d_model": 32,
                       "d_mlp": 64}},
}


# text-task presets (`--task text` / `--base-model`), used in place of PRESETS for those runs
TEXT_PRESETS: dict[str, dict[str, Any]] = {
    # the built-in text model on Shakespeare: <= 10 min on a 2-core CPU
    # (a smaller corpus gets fewer codes and steps: `fit_to_corpus`)
    "default": {"task": "text", "base_steps": 1200, "steps": 300, "batch_size": 16, "lr": 2e-3,
                "num_codes": 4096, "site_codes": "mlp=16384", "k": 8, "kmeans": "torch", "kmeans_seqs": 128,
                "seq_len": 128, "vocab_size": 2048, "fit_corpus": "codes,steps",
                "eval_samples": 0, "model": {"vocab_size": 2048, "block_size": 129, "n_layer": 4, "n_head": 4,
                                             "d_model": 128, "d_mlp": 512}},
    # codebooks at the 4 MLPs (k=1) trained with the model from step 0: held-out 4.080 with codebooks on, 172 s on
    # a 2-core CPU (README "Training from scratch"); attention-head codebooks from scratch keep it at the unigram
    # level, so this preset has none
    "scratch": {"task": "text", "base_steps": 0, "steps": 900, "batch_size": 16, "lr": 2e-3, "sites": "mlp",
                "num_codes": 4096, "site_codes": "", "k": 1, "commit_coef": 0.25, "mse_coef": 1.0, "kmeans": "torch",
                "kmeans_seqs": 128, "seq_len": 128, "vocab_size": 2048, "eval_samples": 0,
                "model": {"vocab_size": 2048, "block_size": 129, "n_layer": 4, "n_head": 4, "d_model": 128,
                          "d_mlp": 512}},
    "tiny": {"task": "text", "base_steps": 20, "steps": 10, "batch_size": 4, "num_codes": 32,
             "kmeans_seqs": 8, "seq_len": 32, "vocab_size": 320, "checkpoint_every": 0, "eval_blocks": 8,
             "eval_samples": 0, "model": {"vocab_size": 320, "block_size": 33, "n_layer": 2, "n_head": 2,
                                          "d_model": 32, "d_mlp": 64}},
    # a one-layer model whose attention heads carry the topic context, one codebook per head (k=8): the paper's
    # topic-steering setting (its TinyStories-1Layer-21M) at CPU scale (docs/steer.md)
    "context": {"task": "text", "base_steps": 3000, "steps": 400, "batch_size": 16, "lr": 2e-3, "sites": "attn-heads",
                "num_codes": 1024, "site_codes": "", "k": 8, "kmeans": "torch", "kmeans_seqs": 128, "seq_len": 256,
                "vocab_size": 4096, "checkpoint_every": 500, "eval_blocks": 128, "eval_samples": 0,
                "model": {"vocab_size": 4096, "block_size": 257, "n_layer": 1, "n_head": 8, "d_model": 256,
                          "d_mlp": 1024}},
    "paper": {"task": "text", "base_steps": 20_000, "steps": 5_000, "batch_size": 64, "lr": 1e-3,
              "num_codes": 10_000, "k": 8, "kmeans_seqs": 1024, "seq_len": 256, "vocab_size": 8192,
              "checkpoint_every": 1000, "eval_blocks": 1024, "eval_samples": 0,
              "model": {"vocab_size": 8192, "block_size": 256, "n_layer": 6, "n_head": 8, "d_model": 512,
                        "d_mlp": 2048}},
}
# a pretrained base: no plain phase, codebook-only training on its frozen weights
HF_PRESETS: dict[str, dict[str, Any]] = {
    # measured on SmolLM2-135M (README "A recipe for pretrained bases"): 5 middle/late sites, C=4096, k=8
    "default": {"task": "text", "base_steps": 0, "steps": 200, "batch_size": 8, "num_codes": 4096, "k": 8,
                "sites": "middle", "kmeans_seqs": 256, "kmeans": "torch", "seq_len": 128, "eval_samples": 0},
    "tiny": {"task": "text", "base_steps": 0, "steps": 5, "batch_size": 2, "num_codes": 16, "kmeans_seqs": 4,
             "kmeans": "torch", "seq_len": 32, "checkpoint_every": 0, "eval_blocks": 4, "eval_samples": 0},
    "paper": {"task": "text", "base_steps": 0, "steps": 10_000, "batch_size": 32, "num_codes": 10_000, "k": 8,
              "kmeans_seqs": 512, "kmeans": "torch", "seq_len": 256, "checkpoint_every": 1000, "eval_blocks": 1024,
              "eval_samples": 0},
}


# shape options a preset pins, with the values it allows: the context preset is defined by its heads being the
# model's only route for context, which holds for one or two layers
PINNED_SHAPE: dict[str, dict[str, tuple[int, ...]]] = {"context": {"n_layer": (1, 2)}}


def apply_preset(name: str, task: str = "tokfsm", base_model: str | None = None) -> TrainConfig:
    """A preset's TrainConfig; text runs (`task="text"` or a base model) use the text presets."""
    table = HF_PRESETS if base_model is not None else TEXT_PRESETS if task == "text" else PRESETS
    if name not in table:
        raise UserError(f"unknown --preset {name!r}: use {', '.join(table)}")
    return TrainConfig(**table[name])


def cli_help(f: Field) -> str:
    """A CLI field's help with its value in the TokFSM default preset (text and pretrained-base runs take
    theirs from TEXT_PRESETS / HF_PRESETS, which `--preset`'s help says)."""
    value = getattr(apply_preset("default"), f.name)
    if value is None:
        return f.metadata["help"]
    shown = "''" if value == "" else value if not isinstance(value, bool) else ("on" if value else "off")
    return f"{f.metadata['help']} (default: {shown})"


# `--base-steps 0` without a base model trains the codebooks with the model from step 0. The straight-through
# gradient leaves the activations free to grow away from their codes unless a commitment term pulls them back:
# without one, from scratch, the reconstruction error grew to ~1e4-1e5 and the loss stayed at chance (2.25 after
# 1,200 steps x 512 sequences on TokFSM, also with codebooks at the MLPs only); with these it trained
# (README "Training from scratch"). Used unless given.
SCRATCH = {"commit_coef": 0.25, "mse_coef": 1.0}


# `fit_to_corpus`: a codebook gets at most one code per TOKENS_PER_CODE training tokens (a power of two, at least
# MIN_FIT_CODES), and the plain phase at most FIT_EPOCHS passes over the training blocks (at least
# MIN_FIT_BASE_STEPS steps; the codebook phase keeps its share of them, at least MIN_FIT_STEPS). The plays' 3.2M
# training tokens keep the text default as it is (C=16,384 needs 2.1M tokens; 1,200 steps are < 1 pass).
TOKENS_PER_CODE = 128
MIN_FIT_CODES = 64
FIT_EPOCHS = 8
MIN_FIT_BASE_STEPS, MIN_FIT_STEPS = 100, 50


def fit_to_corpus(cfg: TrainConfig, train_tokens: int, chosen: list[tuple[int, str]], n_layer: int) -> str | None:
    """Scale a fresh run's codebook sizes and steps to its corpus as `cfg.fit_corpus` asks (in place): the line
    `train` logs about it, or None when nothing changed."""
    from cbtool.model.sites import parse_site_codes  # torch: only when a run starts

    parts = set(cfg.fit_corpus.split(","))
    notes: list[str] = []
    if "codes" in parts:
        cap = max(MIN_FIT_CODES, 1 << max(0, (train_tokens // TOKENS_PER_CODE).bit_length() - 1))
        sizes = parse_site_codes(cfg.site_codes, chosen, n_layer)
        fitted = {m: min(sizes.get(m, cfg.num_codes), cap) for m in chosen}
        if any(fitted[m] != sizes.get(m, cfg.num_codes) for m in chosen):
            cfg.num_codes = min(cfg.num_codes, cap)
            cfg.site_codes = ",".join(f"{layer}.{comp}={c}" for (layer, comp), c in fitted.items()
                                      if c != cfg.num_codes)
            notes.append(f"codebooks of at most C={cap:,} (one code per {TOKENS_PER_CODE} training tokens)")
    if "steps" in parts:
        passes = -(-FIT_EPOCHS * train_tokens // (cfg.batch_size * cfg.seq_len))
        base = min(cfg.base_steps, max(MIN_FIT_BASE_STEPS, passes))
        if base < cfg.base_steps:
            steps = min(cfg.steps, max(MIN_FIT_STEPS, round(cfg.steps * base / cfg.base_steps)))
            notes.append(f"{base:,} base + {steps:,} codebook steps (at most {FIT_EPOCHS} passes over the corpus; "
                         f"the preset has {cfg.base_steps:,} + {cfg.steps:,})")
            cfg.base_steps, cfg.steps = base, steps
    if not notes:
        return None
    return (f"the text default fitted to {train_tokens:,} training tokens: {'; '.join(notes)}. Give --num-codes/"
            f"--site-codes or --base-steps/--steps to choose them yourself")


def make_config(preset: str = "default", **options: Any) -> TrainConfig:
    """A preset with options (TrainConfig field names) over it; None = the preset's value. The task defaults
    to text when a corpus or a base model is given, else TokFSM. A preset's site_codes are for its own sites
    and C: with your own sites or num_codes and no site_codes, every codebook gets num_codes. A from-scratch
    run (`base_steps=0`, no base model) gets SCRATCH's commitment and MSE weights unless given."""
    task = options.get("task") or ("text" if options.get("base_model") is not None
                                   or options.get("corpus") is not None
                                   or (preset in TEXT_PRESETS and preset not in PRESETS) else "tokfsm")
    for name, allowed in PINNED_SHAPE.get(preset, {}).items():
        if options.get(name) is not None and options[name] not in allowed:
            raise UserError(f"--preset {preset} is a model with {SHAPE_OPTIONS[name]} "
                            f"{' or '.join(map(str, allowed))}; {SHAPE_OPTIONS[name]} {options[name]} conflicts "
                            f"with it (drop one of them)")
    own_sizes = options.get("site_codes") is None and (options.get("sites") is not None
                                                       or options.get("num_codes") is not None)
    extra: dict[str, Any] = {"site_codes": ""} if own_sizes else {}
    base = apply_preset(preset, task, options.get("base_model"))
    given = {"codes": ("sites", "num_codes", "site_codes"), "steps": ("base_steps", "steps")}
    extra["fit_corpus"] = ",".join(f for f in base.fit_corpus.split(",")
                                   if f in given and all(options.get(o) is None for o in given[f]))
    if options.get("base_steps") == 0 and options.get("base_model") is None:  # from scratch: see SCRATCH
        extra.update({k: v for k, v in SCRATCH.items() if options.get(k) is None})
    return base.override(**{**options, "task": task, **extra})


