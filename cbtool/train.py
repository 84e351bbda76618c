"""Training: the two-phase recipe that reaches >= 97.5% TokFSM accuracy with codebooks on, on a CPU.

Phase 1 (`base_steps`): train the plain transformer (codebooks bypassed).
Switch: collect activations and initialise every codebook with k-means (see `kmeans_init`).
Phase 2 (`steps`): train the codebooks with the base frozen: task loss through the codebooks
plus `mse_coef` x reconstruction MSE (+ optional commitment), dead codes revived every
`dead_window` steps. With `base_steps=0` codebooks are trained from scratch with the base.

Every batch is a pure function of (seed, step) and the checkpoint carries the optimizer state, so
`--resume` continues exactly where a run stopped and equals an uninterrupted run on the CPU.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.nn import functional as F

from cbtool import ddp, distributed, metrics_log, placement, progress, signals
from cbtool import text as textmod
from cbtool.checkpoint import Checkpoint, load_checkpoint, real_target, recover_interrupted_swap, save_checkpoint
from cbtool.errors import UserError
from cbtool.kmeans_init import capture_inputs, init_codebook
from cbtool.limits import MAX_CODEBOOK_BYTES, MAX_CODES, MAX_SEQ_LEN, MAX_VOCAB
from cbtool.locks import Lock, acquire
from cbtool.model import ModelConfig, Transformer
from cbtool.numbers import check_seed
from cbtool.resume import reconcile
from cbtool.sites import BuiltinLocator, CodebookModel, Locator, parse_site_codes, parse_sites_option
from cbtool.task import Task
from cbtool.text import TextTokenizer
from cbtool.tokfsm import FSMSpec, TokFSM

PHASE_TIMERS = ("base", "kmeans", "codebook", "eval")  # results' phase_seconds


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
    and `cbtool.train(..., NAME=...)` override them."""

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
    kmeans: str = option("sklearn", "k-means implementation (cbtool/kmeans_init.py): sklearn or torch.")
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
    model: dict[str, int] = option(help="The built-in transformer (cbtool/model.py ModelConfig); vocab_size and "
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
    # text task (cbtool/text.py) and pretrained Hugging Face bases (cbtool/hf.py)
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
    "default": {"task": "text", "base_steps": 1200, "steps": 300, "batch_size": 16, "lr": 2e-3,
                "num_codes": 4096, "site_codes": "mlp=16384", "k": 8, "kmeans": "torch", "kmeans_seqs": 128,
                "seq_len": 128, "vocab_size": 2048,
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
    # topic-steering setting (its TinyStories-1Layer-21M) at CPU scale, ~25 min on a 2-core CPU (docs/steer.md)
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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda requested but CUDA is not available")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown --device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def make_task(cfg: TrainConfig, tokenizer: TextTokenizer | None = None) -> Task:
    """The task a config trains on. Text reads the corpus and, unless given a `tokenizer` (a pretrained
    base's), trains a byte-level BPE on it."""
    if cfg.task == "tokfsm":
        return TokFSM(FSMSpec(**cfg.fsm, seed=cfg.seed))
    sources = textmod.load_sources(cfg.corpus, cfg.text_field)
    tok = tokenizer if tokenizer is not None else textmod.train_bpe(sources, cfg.vocab_size)
    return textmod.TextTask(tok, cfg.corpus, cfg.text_field, cfg.seq_len,
                            "hf" if cfg.base_model is not None else "bpe", sources=sources,
                            corpus_sha256=textmod.corpus_sha256(cfg.corpus))


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, device: torch.device, log: Console,
                 task: Task | None = None, device_map: str | None = None) -> None:
        """`task`: the checkpoint's own task when resuming (its tokenizer, never a retrained one);
        else `make_task(cfg)`. `device_map="auto"`: a pretrained base spread over the devices, each codebook
        on its layer's (cbtool/placement.py); `device` is then where the input ids go."""
        cfg.validate()
        placement.check_device_map(device_map, cfg.base_model is not None)
        self.world = distributed.world()
        distributed.check_divides(cfg.batch_size, "--batch-size")
        self.cfg, self.out, self.device, self.log = cfg, Path(out), device, log
        self.lock: Lock | None = None  # start_training's claim on `out`
        self.preset: str | None = None  # recorded in cbtool.json: `train --resume --preset` is compared with it
        self.saved_step: int | None = None  # the step of the checkpoint on disk written or resumed by this run
        if cfg.corpus is not None and not (cfg.corpus in textmod.NAMED_CORPORA and not Path(cfg.corpus).exists()):
            cfg.corpus = str(Path(cfg.corpus).resolve())
        torch.manual_seed(cfg.seed)
        if self.pretrained:
            from cbtool import hf

            hf.check_base_dir(cfg.base_model, cfg.gguf_file)  # bad input: one error line, nothing logged first
            self.log.print(f"loading base model {cfg.base_model}"
                           + (f" / {cfg.gguf_file} (de-quantising the GGUF file: ~15-60 s)" if cfg.gguf_file else ""),
                           highlight=False, soft_wrap=True)
            base, locator, self.model_spec = hf.load_hf_model(cfg.base_model, cfg.gguf_file,
                                                              frozen=not cfg.train_base, device_map=device_map)
            cfg.base_model = self.model_spec["path"]
            if task is None:
                task = make_task(cfg, hf.load_hf_tokenizer(cfg.base_model, cfg.gguf_file))
            if task.vocab_size > base.config.vocab_size:
                raise UserError(f"tokenizer of {cfg.base_model} has {task.vocab_size} tokens, the model "
                                f"{base.config.vocab_size}: mismatched tokenizer")
            if task.block_size > base.config.block_size:
                raise UserError(f"--seq-len {task.block_size - 1} exceeds the model's "
                                f"{base.config.block_size} positions")
        else:
            task = task if task is not None else make_task(cfg)
            task.train_tokens  # noqa: B018 - a corpus too small for --seq-len is refused before the model is built
            # the model's vocabulary and positions are the task's
            cfg.model = {**cfg.model, "vocab_size": task.vocab_size, "block_size": task.block_size}
            self.model_spec = {"kind": "builtin", "config": cfg.model}
            base = Transformer(ModelConfig(**cfg.model))
            locator = BuiltinLocator(base)
        self.task = task
        if cfg.steps > 0 and task.train_tokens is not None and task.train_tokens < cfg.num_codes:
            raise UserError(f"corpus too small for k-means: {task.train_tokens:,} training tokens for "
                            f"--num-codes {cfg.num_codes}; use more text or fewer codes")
        chosen = parse_sites_option(cfg.sites, locator.n_layer)
        locator.check_sites(chosen)
        site_codes = self._site_codes(chosen, locator)
        self.model = CodebookModel.build(base, locator, chosen, cfg.num_codes, cfg.k, site_codes)
        self.device_map = device_map
        if device_map is None:
            self.model.to(device)
        else:
            placement.place_codebooks(self.model)
            self.device = placement.input_device(self.model)
        for cb in self.model.codebooks.values():
            cb.commit_coef = cfg.commit_coef
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.elapsed = 0.0
        self.phase_seconds = dict.fromkeys(PHASE_TIMERS, 0.0)  # wall time per phase of the run
        self.metrics = metrics_log.MetricsLog(cfg.log_every)
        self.metrics.attach(self.model)
        ddp.attach(self.world, self.model)
        self._make_optimizer(self.phase(0))

    def _site_codes(self, chosen: list[tuple[int, str]], locator: Locator) -> dict[tuple[int, str], int]:
        """`site_codes`: C per (layer, component) where it differs from num_codes, checked like --num-codes."""
        codes = parse_site_codes(self.cfg.site_codes, chosen, locator.n_layer)
        for c in codes.values():
            if not self.cfg.k <= c <= MAX_CODES:
                raise UserError(f"--site-codes: C must be in --k ({self.cfg.k})..{MAX_CODES}, got {c}")
            if c * locator.d_model * 4 > MAX_CODEBOOK_BYTES:
                raise UserError(f"--site-codes C={c} needs > {MAX_CODEBOOK_BYTES / 2**30:.0f} GiB per codebook; "
                                f"refusing")
        return codes

    @property
    def pretrained(self) -> bool:
        return self.cfg.base_model is not None

    # -- phases -------------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return self.cfg.base_steps + self.cfg.steps

    def phase(self, step: int) -> str:
        return "base" if step < self.cfg.base_steps else "codebook"

    def _make_optimizer(self, phase: str) -> None:
        cfg = self.cfg
        codebook_params = list(self.model.codebooks.parameters())
        base_params = list(self.model.base.parameters())
        if phase == "base":
            self.model.set_enabled(False)
            groups = [{"params": base_params, "lr": cfg.lr}]
        else:
            self.model.set_enabled(True)
            train_base = cfg.train_base or (cfg.base_steps == 0 and not self.pretrained)
            for p in base_params:
                p.requires_grad_(train_base)
            scratch = cfg.base_steps == 0 and not self.pretrained
            base_lr = cfg.lr if scratch else cfg.codebook_lr * cfg.base_lr_factor
            groups = [{"params": codebook_params, "lr": cfg.codebook_lr}]
            if train_base:
                groups.append({"params": base_params, "lr": base_lr})
        for g in groups:
            g["base_lr"] = g["lr"]
        self.opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)

    def _schedule(self, step: int) -> float:
        """Warm-up then cosine to 10% within each phase."""
        if self.phase(step) == "base":
            lo, n = 0, self.cfg.base_steps
        else:
            lo, n = self.cfg.base_steps, self.cfg.steps
        i = step - lo
        warm = min(50, max(1, n // 10))
        if i < warm:
            return (i + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (i - warm) / max(1, n - warm)))

    def _switch_to_codebooks(self) -> None:
        """k-means on rank 0 only; the other ranks receive its codebooks."""
        cfg = self.cfg
        t0 = time.perf_counter()
        cbs = [cb for _, cb in self.model.items()]
        if not self.world.is_main:
            for cb in cbs:
                distributed.broadcast(cb.codes.data)
            self.phase_seconds["kmeans"] += time.perf_counter() - t0
            return
        self.model.set_enabled(False)
        self.model.eval()

        def run() -> None:
            tokens = self.task.train_batch(cfg.kmeans_seqs, cfg.seed, -1)
            for chunk in tokens.split(64):
                self.model(chunk.to(self.device))

        with progress.track("k-means insertion", len(cbs), "codebooks") as bar:
            acts = capture_inputs(cbs, run)
            for i, (cb, a) in enumerate(zip(cbs, acts, strict=True)):
                init_codebook(cb, a[:: max(1, a.shape[0] // 65536)], cfg.seed * 1000 + i * 97, cfg.kmeans)
                distributed.broadcast(cb.codes.data)
                bar.advance(1)
        self.model.train()
        self.phase_seconds["kmeans"] += time.perf_counter() - t0
        self.log.print(f"codebooks initialised by k-means from {acts[0].shape[0]} tokens "
                       f"in {time.perf_counter() - t0:.1f}s", markup=False, highlight=False)

    # -- one step -----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step
        if step == cfg.base_steps and (cfg.base_steps > 0 or cfg.steps > 0) and step < self.total_steps:
            self._switch_to_codebooks()
            self._make_optimizer("codebook")
        phase = self.phase(step)
        self.model.train()
        tokens = self.task.train_batch(cfg.batch_size, cfg.seed, step)[self.world.rows(cfg.batch_size)]
        tokens = tokens.to(self.device)
        logits, _ = self.model(tokens[:, :-1])
        task = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        loss = task
        aux = self.model.aux_loss() if phase == "codebook" else None
        if aux is not None:
            loss = loss + cfg.mse_coef * aux.to(loss.device)  # codebooks may sit on other devices
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.opt.param_groups for p in g["params"]]
        acc = float((logits.argmax(-1) == tokens[:, 1:]).float().mean())
        values = [task.item(), aux.item() if aux is not None else 0.0, acc]
        if self.world.active:  # the whole batch's gradient, loss and accuracy on every rank
            values = ddp.average_gradients(params, values)
        if not math.isfinite(values[0] + values[1]):
            kept = (f"the last checkpoint, step {self.saved_step}, is intact at {self.out}" if self.saved_step
                    is not None else "no checkpoint was written")
            raise UserError(f"the loss became {values[0] + cfg.mse_coef * values[1]} at step {step}: training "
                            f"diverged; try a lower --lr / --codebook-lr ({kept})")
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scale = self._schedule(step)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        self.opt.step()
        extra = {}
        if isinstance(self.task, TokFSM) and self.metrics.due(step + 1, self.total_steps):  # TokFSM task accuracy
            extra["fsm_valid"] = metrics_log.fsm_valid_rate(self.task, tokens, logits.argmax(-1))
            if self.world.active:
                extra["fsm_valid"] = ddp.mean(extra["fsm_valid"])
        self.step += 1
        revived = 0
        revive = phase == "codebook" and cfg.dead_window and (self.step - cfg.base_steps) % cfg.dead_window == 0
        if self.world.active and phase == "codebook" and (revive or self._saves_now()
                                                          or self.metrics.due(self.step, self.total_steps)):
            ddp.combine_stats(self.model, self.metrics)  # what revival, the metrics row and a save read
            if revive:
                ddp.global_usage(self.model)
        if revive:
            gen = torch.Generator().manual_seed(cfg.seed * 7 + self.step)
            revived = sum(cb.revive_dead(gen) for cb in self.model.codebooks.values())
        return {"step": self.step, "loss": values[0], "mse": values[1], "acc": values[2], "revived": revived,
                **extra}

    def _saves_now(self) -> bool:
        """A checkpoint is written after the current step (periodic, or the final one)."""
        every = self.cfg.checkpoint_every
        return self.step >= self.total_steps or bool(every and self.step % every == 0)

    def _set_usage_tracking(self) -> None:
        on = self.phase(self.step) == "codebook" and self.cfg.dead_window > 0
        for cb in self.model.codebooks.values():
            cb.track_usage = on

    # -- the loop -----------------------------------------------------------------------------
    def run(self, on_checkpoint: Callable[[int], None] | None = None) -> dict[str, Any]:
        """Train to the end, save, and return the results; the lock on --out is released however it ends."""
        try:
            return self._run(on_checkpoint)
        finally:
            if self.lock is not None:
                self.lock.release()

    def _run(self, on_checkpoint: Callable[[int], None] | None) -> dict[str, Any]:
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * (self.task.block_size - 1)
        self.log.print(self.task.summary(), markup=False, highlight=False)
        smooth: dict[str, float] = {}
        with progress.track(self.phase(self.step), self.total_steps, "steps", done=self.step) as bar:
            while self.step < self.total_steps:
                self._set_usage_tracking()
                t0 = time.perf_counter()
                kmeans_before = self.phase_seconds["kmeans"]
                row = self.train_step()
                dt = time.perf_counter() - t0
                self.elapsed += dt
                self.phase_seconds[self.phase(self.step - 1)] += dt - (self.phase_seconds["kmeans"] - kmeans_before)
                self.history.append(row)
                self.metrics.add_step(dt, tokens_per_step, row["revived"])
                if self.metrics.due(self.step, self.total_steps):
                    self.metrics.record(self.step, self.phase(self.step - 1), row, self.opt.param_groups[0]["lr"],
                                        self.model, row.get("fsm_valid"))
                new_phase = self.step == cfg.base_steps + 1
                bar.advance(1, phase=self.phase(self.step - 1), **_smoothed(smooth, row, new_phase))
                bar.fields.pop("tok/s", None)  # last, after the smoothed losses
                bar.fields["tok/s"] = f"{(bar.rate or 0) * tokens_per_step:,.0f}"
                if not progress.live() and (self.step % 100 == 0 or self.step == self.total_steps
                                            or time.perf_counter() - bar.last_line >= progress.heartbeat_seconds()):
                    self.log.print(bar.describe(), markup=False, highlight=False, soft_wrap=True)
                    bar.last_line = time.perf_counter()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save(results=None)
                    if on_checkpoint:
                        on_checkpoint(self.step)
        if not self.world.is_main:  # rank 0 evaluates and writes the checkpoint
            distributed.barrier()
            return {}
        self.log.print("evaluating (codebooks on and bypassed)...", markup=False, highlight=False)
        t_eval = time.perf_counter()
        results = self.task.evaluate(self.model, self.device, samples=cfg.eval_samples, seed=cfg.seed,
                                     blocks=cfg.eval_blocks)
        self.phase_seconds["eval"] += time.perf_counter() - t_eval
        results["train_seconds"] = round(self.elapsed, 1)
        results["phase_seconds"] = {k: round(v, 1) for k, v in self.phase_seconds.items()}
        results["final_train_loss"] = self.history[-1]["loss"] if self.history else None
        self.save(results=results)
        distributed.barrier()
        return results

    # -- checkpoints --------------------------------------------------------------------------
    def meta(self, results: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "model": self.model_spec,
            "tokenizer": self.task.tokenizer_meta(),
            "task": self.task.task_meta(),
            "training": {
                "config": asdict(self.cfg),
                "preset": self.preset,
                "step": self.step,
                "total_steps": self.total_steps,
                "finished": self.step >= self.total_steps,
                "phase": self.phase(max(0, self.step - 1)),
                "seconds": round(self.elapsed, 1),
                "device": str(self.device),
                "results": results,
            },
        }

    def train_state(self) -> dict[str, torch.Tensor]:
        """Optimizer moments and step counters as flat tensors (safetensors, no pickle)."""
        state = {"trainer.step": torch.tensor(self.step), "trainer.elapsed": torch.tensor(self.elapsed)}
        state.update({f"trainer.seconds.{k}": torch.tensor(v) for k, v in self.phase_seconds.items()})
        params = [p for g in self.opt.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            s = self.opt.state.get(p)
            if not s:
                continue
            for key, val in s.items():
                state[f"opt.{i}.{key}"] = val.detach().clone() if torch.is_tensor(val) else torch.tensor(val)
        state.update(self.metrics.state())
        for cb_key, cb in self.model.codebooks.items():
            state[f"usage.{cb_key}"] = cb.usage.clone()
            if cb.recent_inputs is not None:
                state[f"recent.{cb_key}"] = cb.recent_inputs
        return state

    def save(self, results: dict[str, Any] | None) -> None:
        """Write the checkpoint atomically (rank 0 only: every rank holds the same weights)."""
        if not self.world.is_main:
            return
        # a frozen pretrained base is referenced by path + hash, its weights saved only when trained
        save_base = not self.pretrained or self.cfg.train_base
        state = self.train_state()
        if results is not None and not self.cfg.keep_optimizer:  # finished: only what cannot be recomputed
            state = {k: v for k, v in state.items() if not k.startswith(("opt.", "recent."))}
        with signals.deferred():  # an interrupt during the save is acted on after it, naming the new checkpoint
            save_checkpoint(self.out, self.model, self.meta(results), save_base=save_base, train_state=state,
                            extra_files={**self.task.files(), metrics_log.FILE: self.metrics.to_bytes()})
            self.saved_step = self.step

    @classmethod
    def resume(cls, ckpt: Checkpoint, out: Path, device: torch.device, log: Console,
               device_map: str | None = None) -> Trainer:
        training = ckpt.meta.get("training") or {}
        if not isinstance(training, dict) or "config" not in training or ckpt.train_state is None:
            raise UserError(f"{ckpt.path} has no resumable training state")
        bad = f"{ckpt.path}: malformed training state"
        if not isinstance(training["config"], dict):
            raise UserError(f"{bad} (config is not an object)")
        try:
            cfg = TrainConfig.from_dict(training["config"])
            cfg.validate()
            ModelConfig(**cfg.model)
        except (TypeError, ValueError, AttributeError, KeyError) as e:
            raise UserError(f"{bad} ({e})") from None
        state = ckpt.train_state
        for key in ("trainer.step", "trainer.elapsed"):
            if key not in state or state[key].numel() != 1:
                raise UserError(f"{bad} ({key} missing)")
        self = cls(cfg, out, device, log, task=ckpt.task, device_map=device_map)
        self.step = self.saved_step = int(state["trainer.step"])
        self.elapsed = float(state["trainer.elapsed"])
        self.preset = training.get("preset") if isinstance(training.get("preset"), str) else None
        for k in PHASE_TIMERS:  # absent in checkpoints of older versions: those phases count from 0
            if state.get(f"trainer.seconds.{k}") is not None and state[f"trainer.seconds.{k}"].numel() == 1:
                self.phase_seconds[k] = float(state[f"trainer.seconds.{k}"])
        self.metrics.rows = [r for r in metrics_log.read_metrics(ckpt.path) if r["step"] <= self.step]
        self.metrics.load_state(state)
        if not 0 <= self.step <= self.total_steps:
            raise UserError(f"{bad} (step {self.step} of {self.total_steps})")
        try:
            self.model.load_state_dict(ckpt.model.state_dict())
        except RuntimeError as e:
            raise UserError(f"{bad} (the model does not fit its training config: {str(e).splitlines()[0]})") from None
        self._make_optimizer(self.phase(max(0, self.step - 1)))
        params = [p for g in self.opt.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            keys = [k for k in state if k.startswith(f"opt.{i}.")]
            for k in keys:
                if state[k].dim() and state[k].shape != p.shape:
                    raise UserError(f"{bad} ({k} has shape {tuple(state[k].shape)}, its parameter "
                                    f"{tuple(p.shape)})")
            if keys:
                self.opt.state[p] = {k.split(".", 2)[2]: state[k].to(p.device) if state[k].dim() else state[k]
                                     for k in keys}
        for cb_key, cb in self.model.codebooks.items():
            if f"usage.{cb_key}" in state:
                if state[f"usage.{cb_key}"].shape != cb.usage.shape:
                    raise UserError(f"{bad} (usage.{cb_key} has the wrong shape)")
                cb.usage.copy_(state[f"usage.{cb_key}"])
            if f"recent.{cb_key}" in state:
                cb.recent_inputs = state[f"recent.{cb_key}"].to(cb.usage.device)
        ddp.split_counts(self.model)
        return self


LOSS_SMOOTHING = 0.9  # the training log's loss and accuracy: exponential moving average over steps


def _smoothed(state: dict[str, float], row: dict[str, float], restart: bool) -> dict[str, str]:
    """The log's smoothed loss / accuracy (/ MSE in the codebook phase), restarted when the phase changes."""
    keys = ("loss", "acc", "mse") if row.get("mse") else ("loss", "acc")
    for key in keys:
        old = state.get(key)
        state[key] = row[key] if old is None or restart else LOSS_SMOOTHING * old + (1 - LOSS_SMOOTHING) * row[key]
    return {key: f"{state[key]:.3f}" for key in keys}


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
    if options.get("base_steps") == 0 and options.get("base_model") is None:  # from scratch: see SCRATCH
        extra.update({k: v for k, v in SCRATCH.items() if options.get(k) is None})
    return apply_preset(preset, task, options.get("base_model")).override(**{**options, "task": task, **extra})


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


def start_training(out: Path, preset: str | None = None, *, resume: bool = False, overwrite: bool = False,
                   device: str | torch.device = "auto", log: Console | None = None, device_map: str | None = None,
                   **options: Any) -> Trainer:
    """A Trainer ready to `run()`: a new run of a preset (default "default") with options (TrainConfig
    fields) over it, writing its checkpoint to `out` (refused if one is there, unless `overwrite`), or with
    `resume` the run at `out`, continued exactly; a preset or options given with `resume` must agree with
    the stored run, but for those cbtool/resume.py lets change (applied and logged). `device_map="auto"`
    spreads a pretrained base over the devices (cbtool/placement.py)."""
    target = Path(out)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    log = log if log is not None else Console(stderr=True, quiet=True)
    world = distributed.world()
    distributed.agree({"out": str(target.resolve()), "preset": preset, "resume": resume, "overwrite": overwrite,
                       "device": str(dev), "options": options}, "the training options")
    if not world.is_main:  # one log: rank 0's
        log = Console(stderr=True, quiet=True)
    check_target(target, overwrite or resume)
    cfg = None if resume else make_config(preset or "default", **options)
    if cfg is not None:
        cfg.validate()  # bad options are refused before anything is created
        placement.check_device_map(device_map, cfg.base_model is not None)
    lock = acquire_out(target) if world.is_main else None  # rank 0 holds the claim for all ranks
    try:
        trainer = (_start(target, cfg, overwrite, dev, log, device_map) if cfg is not None
                   else _resume(target, dev, log, preset, options, device_map))
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.lock = lock
    if cfg is not None:
        trainer.preset = preset or "default"
    return trainer


def acquire_out(target: Path) -> Lock:
    """One `train` per --out at a time: the lock file `.NAME.lock` beside the (real) checkpoint directory."""
    real = real_target(target)
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write checkpoint to {target}: {e.strerror or e}") from None
    return acquire(real.parent / f".{real.name}.lock", f"checkpoint {target}")


def _resume(target: Path, dev: torch.device, log: Console, preset: str | None, options: dict[str, Any],
            device_map: str | None = None) -> Trainer:
    """The run at `target` resumed, with the options that may change applied (cbtool/resume.py)."""
    distributed.main_first(lambda: recover_interrupted_swap(target))
    if not target.exists():
        raise UserError(f"nothing to resume: {target} does not exist")
    ckpt = load_checkpoint(target, with_train_state=True)
    training = ckpt.meta.get("training")
    changes, notes = reconcile(training if isinstance(training, dict) else {}, preset, options)
    if changes:
        training["config"] = {**training["config"], **changes}
    trainer = Trainer.resume(ckpt, target, dev, log, device_map)
    if trainer.step >= trainer.total_steps:
        raise UserError(f"{target} is already finished ({trainer.step} steps); nothing to resume (a larger "
                        f"--steps continues it)")
    for note in notes:
        log.print(f"resume: {note}", markup=False, highlight=False)
    if not any(k.startswith("opt.") for k in ckpt.train_state or {}):
        log.print("resume: the checkpoint holds no optimizer moments (a finished run drops them unless "
                  "--keep-optimizer): they start again from zero", markup=False, highlight=False)
    log.print(f"resuming {target} at step {trainer.step}/{trainer.total_steps}")
    return trainer


def _start(target: Path, cfg: TrainConfig, overwrite: bool, dev: torch.device, log: Console,
           device_map: str | None = None) -> Trainer:
    """A new run of `cfg`."""
    world = distributed.world()
    check_target(target, overwrite)  # again: another run may have finished while this one waited
    distributed.barrier()  # no rank may see rank 0's first checkpoint here
    trainer = Trainer(cfg, target, dev, log, device_map=device_map)
    sizes = f"C={cfg.num_codes}" + (f" ({cfg.site_codes})" if cfg.site_codes else "")
    ranks = f" x {world.size} ranks" if world.active else ""
    log.print(f"training {cfg.task} on {dev}{ranks}: {len(trainer.model.sites)} sites, {sizes}, k={cfg.k}, "
              f"{cfg.base_steps} base + {cfg.steps} codebook steps -> {target}")
    return trainer
