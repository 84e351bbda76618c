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
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch.nn import functional as F

from cbtool.checkpoint import Checkpoint, save_checkpoint
from cbtool.errors import UserError
from cbtool.evaluate import evaluate_fsm
from cbtool.kmeans_init import capture_inputs, init_codebook
from cbtool.model import ModelConfig, Transformer
from cbtool.sites import BuiltinLocator, CodebookModel, parse_site_codes, parse_sites_option
from cbtool.tokfsm import FSMSpec, TokFSM

MAX_CODES = 2**24  # refuse absurd sizes before allocating
PHASE_TIMERS = ("base", "kmeans", "codebook", "eval")


@dataclass
class TrainConfig:
    task: str = "tokfsm"
    sites: str = "attn-heads,mlp"
    num_codes: int = 1000
    site_codes: str = ""  # C per codebook where it differs from num_codes: "0.mlp=4000,mlp=2000"
    k: int = 1
    base_steps: int = 900
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3  # phase 1 (base) learning rate
    codebook_lr: float = 2e-3  # phase 2 learning rate
    mse_coef: float = 0.1
    commit_coef: float = 0.0
    train_base: bool = False  # phase 2: also train the base (at lr x base_lr_factor)
    base_lr_factor: float = 0.1
    kmeans_seqs: int = 256
    dead_window: int = 100
    checkpoint_every: int = 200
    eval_samples: int = 512
    seed: int = 0
    model: dict[str, int] = field(default_factory=lambda: ModelConfig().to_dict())
    fsm: dict[str, int] = field(default_factory=lambda: {"num_states": 100, "out_degree": 10, "seq_len": 128})
    # text task (cbtool.text) and pretrained Hugging Face bases (cbtool.hf)
    corpus: str | None = None  # .txt/.jsonl/folder; None = the built-in Shakespeare corpus
    text_field: str = "text"
    seq_len: int = 128
    vocab_size: int = 4096  # byte-level BPE trained for the built-in text model
    base_model: str | None = None  # local HF model directory: frozen base with codebooks
    gguf_file: str | None = None
    eval_blocks: int = 256  # held-out blocks for LM loss on vs bypassed

    def validate(self) -> None:
        for name in ("base_steps", "steps", "kmeans_seqs", "checkpoint_every", "dead_window"):
            if getattr(self, name) < 0:
                raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.base_steps + self.steps < 1:
            raise UserError("nothing to train: --steps and --base-steps are both 0")
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
        if self.task == "text" and self.seq_len < 2:
            raise UserError(f"--seq-len must be >= 2, got {self.seq_len}")
        cfg = self.model
        if cfg["d_model"] % cfg["n_head"]:
            raise UserError("d_model must be divisible by n_head")
        # the largest codebook tensor must be allocatable: refuse before trying
        if self.num_codes * cfg["d_model"] * 4 > 8 * 2**30:
            raise UserError(f"--num-codes {self.num_codes} needs > 8 GiB per codebook; refusing")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


PRESETS: dict[str, dict[str, Any]] = {
    # 4x the codes at the layer-0 MLP, the codebook that caused nearly all the accuracy gap (README ablation)
    "default": {"site_codes": "0.mlp=4000"},
    # the paper's TokFSM scale (20k steps x batch 512), as the same two-phase recipe: for a GPU
    "paper": {"base_steps": 10_000, "steps": 10_000, "batch_size": 512, "lr": 1e-3,
              "kmeans_seqs": 1024, "checkpoint_every": 1000, "eval_samples": 2048},
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
                "num_codes": 1024, "k": 1, "kmeans_seqs": 128, "seq_len": 128, "vocab_size": 2048,
                "eval_samples": 0, "model": {"vocab_size": 2048, "block_size": 129, "n_layer": 4, "n_head": 4,
                                             "d_model": 128, "d_mlp": 512}},
    "tiny": {"task": "text", "base_steps": 20, "steps": 10, "batch_size": 4, "num_codes": 32,
             "kmeans_seqs": 8, "seq_len": 32, "vocab_size": 320, "checkpoint_every": 0, "eval_blocks": 8,
             "eval_samples": 0, "model": {"vocab_size": 320, "block_size": 33, "n_layer": 2, "n_head": 2,
                                          "d_model": 32, "d_mlp": 64}},
    "paper": {"task": "text", "base_steps": 20_000, "steps": 5_000, "batch_size": 64, "lr": 1e-3,
              "num_codes": 10_000, "k": 8, "kmeans_seqs": 1024, "seq_len": 256, "vocab_size": 8192,
              "checkpoint_every": 1000, "eval_blocks": 1024, "eval_samples": 0,
              "model": {"vocab_size": 8192, "block_size": 256, "n_layer": 6, "n_head": 8, "d_model": 512,
                        "d_mlp": 2048}},
}
# a pretrained base: no plain phase, codebook-only training on its frozen weights
HF_PRESETS: dict[str, dict[str, Any]] = {
    "default": {"task": "text", "base_steps": 0, "steps": 300, "batch_size": 8, "num_codes": 1024, "k": 1,
                "kmeans_seqs": 64, "seq_len": 128, "eval_samples": 0},
    "tiny": {"task": "text", "base_steps": 0, "steps": 5, "batch_size": 2, "num_codes": 16, "kmeans_seqs": 4,
             "seq_len": 32, "checkpoint_every": 0, "eval_blocks": 4, "eval_samples": 0},
    "paper": {"task": "text", "base_steps": 0, "steps": 10_000, "batch_size": 32, "num_codes": 10_000, "k": 8,
              "kmeans_seqs": 512, "seq_len": 256, "checkpoint_every": 1000, "eval_blocks": 1024,
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


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, device: torch.device, log: Console,
                 tokenizer: Any = None) -> None:
        """`tokenizer` (a cbtool.text.TextTokenizer): text runs use it instead of training or loading one
        (`--resume` passes the checkpoint's tokenizer.json)."""
        cfg.validate()
        self.cfg, self.out, self.device, self.log = cfg, Path(out), device, log
        self.text: Any = None  # a cbtool.text.TextTask for --task text
        self.model_spec: dict[str, Any] = {"kind": "builtin", "config": cfg.model}
        if cfg.task == "text":
            self.model = self._build_text_model(cfg, tokenizer).to(device)
        else:
            self.fsm = TokFSM(FSMSpec(**cfg.fsm, seed=cfg.seed))
            torch.manual_seed(cfg.seed)
            base = Transformer(ModelConfig(**cfg.model))
            chosen = parse_sites_option(cfg.sites, base.config.n_layer)
            locator = BuiltinLocator(base)
            self.model = CodebookModel.build(base, locator, chosen, cfg.num_codes, cfg.k,
                                             self._site_codes(chosen, base.config.n_layer)).to(device)
        for cb in self.model.codebooks.values():
            cb.commit_coef = cfg.commit_coef
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.elapsed = 0.0
        self.phase_seconds = dict.fromkeys(PHASE_TIMERS, 0.0)  # wall time per phase of the run
        self._make_optimizer(self.phase(0))

    def _build_text_model(self, cfg: TrainConfig, tokenizer: Any = None) -> CodebookModel:
        """--task text: the data (cbtool.text) and the model, built-in or a pretrained HF base."""
        from cbtool import text as textmod

        if cfg.corpus is not None and cfg.corpus != textmod.BUILTIN_NAME:
            cfg.corpus = str(Path(cfg.corpus).resolve())
        sources = textmod.load_sources(cfg.corpus, cfg.text_field)
        torch.manual_seed(cfg.seed)
        if cfg.base_model is not None:
            from cbtool import hf

            base, locator, self.model_spec = hf.load_hf_model(cfg.base_model, cfg.gguf_file,
                                                              frozen=not cfg.train_base)
            cfg.base_model = self.model_spec["path"]
            tok = tokenizer if tokenizer is not None else hf.load_hf_tokenizer(cfg.base_model, cfg.gguf_file)
            if tok.vocab_size > base.config.vocab_size:
                raise UserError(f"tokenizer of {cfg.base_model} has {tok.vocab_size} tokens, the model "
                                f"{base.config.vocab_size}: mismatched tokenizer")
            if cfg.seq_len + 1 > base.config.block_size:
                raise UserError(f"--seq-len {cfg.seq_len} exceeds the model's "
                                f"{base.config.block_size} positions")
            chosen = parse_sites_option(cfg.sites, locator.n_layer)
            locator.check_sites(chosen)
        else:
            tok = tokenizer if tokenizer is not None else textmod.train_bpe(sources, cfg.vocab_size)
            cfg.model = {**cfg.model, "vocab_size": tok.vocab_size, "block_size": cfg.seq_len + 1}
            self.model_spec = {"kind": "builtin", "config": cfg.model}
            base = Transformer(ModelConfig(**cfg.model))
            locator = BuiltinLocator(base)
            chosen = parse_sites_option(cfg.sites, base.config.n_layer)
        self.tokenizer = tok
        self.text = textmod.TextTask(tok, sources, cfg.seq_len, cfg.corpus, cfg.text_field)
        self.fsm = self.text  # the trainer draws batches through step_batch(n, seed, step)
        self.log.print(f"text corpus: {self.text.num_tokens:,} tokens, {self.text.train_blocks.shape[0]} "
                       f"training / {self.text.heldout_blocks.shape[0]} held-out blocks of {cfg.seq_len}",
                       highlight=False)
        site_codes = self._site_codes(chosen, locator.n_layer)
        return CodebookModel.build(base, locator, chosen, cfg.num_codes, cfg.k, site_codes)

    def _site_codes(self, chosen: list[tuple[int, str]], n_layer: int) -> dict[tuple[int, str], int]:
        codes = parse_site_codes(self.cfg.site_codes, chosen, n_layer)
        for c in codes.values():
            if not self.cfg.k <= c <= MAX_CODES:
                raise UserError(f"--site-codes: C must be in --k ({self.cfg.k})..{MAX_CODES}, got {c}")
            if c * self.cfg.model["d_model"] * 4 > 8 * 2**30:
                raise UserError(f"--site-codes C={c} needs > 8 GiB per codebook; refusing")
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
        cfg = self.cfg
        t0 = time.perf_counter()
        cbs = [cb for _, cb in self.model.items()]
        self.model.set_enabled(False)
        self.model.eval()

        def run() -> None:
            tokens, _ = self.fsm.step_batch(cfg.kmeans_seqs, cfg.seed, -1)
            for chunk in tokens.split(64):
                self.model(chunk.to(self.device))

        acts = capture_inputs(cbs, run)
        for i, (cb, a) in enumerate(zip(cbs, acts, strict=True)):
            init_codebook(cb, a[:: max(1, a.shape[0] // 65536)], cfg.seed * 1000 + i * 97)
        self.model.train()
        self.phase_seconds["kmeans"] += time.perf_counter() - t0
        self.log.print(f"codebooks initialised by k-means from {acts[0].shape[0]} tokens "
                       f"in {time.perf_counter() - t0:.1f}s", highlight=False)

    # -- one step -----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step
        if step == cfg.base_steps and (cfg.base_steps > 0 or cfg.steps > 0) and step < self.total_steps:
            self._switch_to_codebooks()
            self._make_optimizer("codebook")
        phase = self.phase(step)
        self.model.train()
        tokens, _ = self.fsm.step_batch(cfg.batch_size, cfg.seed, step)
        tokens = tokens.to(self.device)
        logits, _ = self.model(tokens[:, :-1])
        task = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        loss = task
        aux = self.model.aux_loss() if phase == "codebook" else None
        if aux is not None:
            loss = loss + cfg.mse_coef * aux
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {float(loss)} at step {step}; try a lower --lr")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.opt.param_groups for p in g["params"]], 1.0)
        scale = self._schedule(step)
        for g in self.opt.param_groups:
            g["lr"] = g["base_lr"] * scale
        self.opt.step()
        acc = float((logits.argmax(-1) == tokens[:, 1:]).float().mean())
        self.step += 1
        revived = 0
        if phase == "codebook" and cfg.dead_window and (self.step - cfg.base_steps) % cfg.dead_window == 0:
            gen = torch.Generator().manual_seed(cfg.seed * 7 + self.step)
            revived = sum(cb.revive_dead(gen) for cb in self.model.codebooks.values())
        return {"step": self.step, "loss": task.item(), "mse": aux.item() if aux is not None else 0.0,
                "acc": acc, "revived": revived}

    def _set_usage_tracking(self) -> None:
        on = self.phase(self.step) == "codebook" and self.cfg.dead_window > 0
        for cb in self.model.codebooks.values():
            cb.track_usage = on

    # -- the loop -----------------------------------------------------------------------------
    def run(self, on_checkpoint: Callable[[int], None] | None = None) -> dict[str, Any]:
        cfg = self.cfg
        progress = Progress(
            TextColumn("[bold]{task.fields[phase]}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TextColumn("loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f} {task.fields[tps]:,.0f} tok/s"),
            TimeElapsedColumn(), TimeRemainingColumn(),
            console=Console(stderr=True), disable=not sys.stderr.isatty(), transient=True,
        )
        seq = cfg.seq_len if self.text is not None else cfg.fsm["seq_len"] - 1
        tokens_per_step = cfg.batch_size * seq
        with progress:
            bar = progress.add_task("train", total=self.total_steps, completed=self.step, phase=self.phase(self.step),
                                    loss=float("nan"), acc=0.0, tps=0.0)
            while self.step < self.total_steps:
                self._set_usage_tracking()
                t0 = time.perf_counter()
                kmeans_before = self.phase_seconds["kmeans"]
                row = self.train_step()
                dt = time.perf_counter() - t0
                self.elapsed += dt
                self.phase_seconds[self.phase(self.step - 1)] += dt - (self.phase_seconds["kmeans"] - kmeans_before)
                self.history.append(row)
                progress.update(bar, completed=self.step, phase=self.phase(self.step - 1), loss=row["loss"],
                                acc=row["acc"], tps=tokens_per_step / dt)
                if progress.disable and (self.step % 100 == 0 or self.step == self.total_steps):
                    self.log.print(f"step {self.step}/{self.total_steps} [{self.phase(self.step - 1)}] "
                                   f"loss {row['loss']:.3f} acc {row['acc']:.3f} mse {row['mse']:.3f} "
                                   f"{tokens_per_step / dt:,.0f} tok/s", highlight=False)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save(results=None)
                    if on_checkpoint:
                        on_checkpoint(self.step)
        self.log.print("evaluating (codebooks on and bypassed)...", highlight=False)
        t_eval = time.perf_counter()
        if self.text is not None:
            from cbtool.evaluate import evaluate_text

            results = evaluate_text(self.model, self.text, self.device, num_blocks=cfg.eval_blocks)
        else:
            results = evaluate_fsm(self.model, self.fsm, self.device, num_samples=cfg.eval_samples,
                                   seed=cfg.seed)
        self.phase_seconds["eval"] += time.perf_counter() - t_eval
        results["train_seconds"] = round(self.elapsed, 1)
        results["phase_seconds"] = {k: round(v, 1) for k, v in self.phase_seconds.items()}
        results["final_train_loss"] = self.history[-1]["loss"] if self.history else None
        self.save(results=results)
        return results

    # -- checkpoints --------------------------------------------------------------------------
    def meta(self, results: dict[str, Any] | None) -> dict[str, Any]:
        if self.text is not None:
            tokenizer = {"kind": "hf" if self.pretrained else "bpe", "file": "tokenizer.json",
                         "vocab_size": self.text.vocab_size, "eot_id": self.text.tok.eot_id}
            task = self.text.spec()
        else:
            tokenizer, task = {"kind": "tokfsm", "vocab_size": self.fsm.vocab_size}, self.fsm.spec.to_dict()
        return {
            "model": self.model_spec,
            "tokenizer": tokenizer,
            "task": task,
            "training": {
                "config": asdict(self.cfg),
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
        for cb_key, cb in self.model.codebooks.items():
            state[f"usage.{cb_key}"] = cb.usage.clone()
            if cb.recent_inputs is not None:
                state[f"recent.{cb_key}"] = cb.recent_inputs
        return state

    def save(self, results: dict[str, Any] | None) -> None:
        extra = None
        if self.text is not None:
            extra = {"tokenizer.json": self.text.tok.to_str().encode("utf-8")}
        # a frozen pretrained base is referenced by path + hash, its weights saved only when trained
        save_base = not self.pretrained or self.cfg.train_base
        save_checkpoint(self.out, self.model, self.meta(results), save_base=save_base,
                        train_state=self.train_state(), extra_files=extra)

    @classmethod
    def resume(cls, ckpt: Checkpoint, out: Path, device: torch.device, log: Console) -> Trainer:
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
        tokenizer = None
        if cfg.task == "text":  # the tokenizer the run started with, never a retrained one
            from cbtool.text import checkpoint_tokenizer

            tokenizer = checkpoint_tokenizer(ckpt.path)
        self = cls(cfg, out, device, log, tokenizer=tokenizer)
        self.step = int(state["trainer.step"])
        self.elapsed = float(state["trainer.elapsed"])
        for k in PHASE_TIMERS:  # absent in checkpoints of older versions: those phases count from 0
            if state.get(f"trainer.seconds.{k}") is not None and state[f"trainer.seconds.{k}"].numel() == 1:
                self.phase_seconds[k] = float(state[f"trainer.seconds.{k}"])
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
                self.opt.state[p] = {k.split(".", 2)[2]: state[k].to(device) if state[k].dim() else state[k]
                                     for k in keys}
        for cb_key, cb in self.model.codebooks.items():
            if f"usage.{cb_key}" in state:
                if state[f"usage.{cb_key}"].shape != cb.usage.shape:
                    raise UserError(f"{bad} (usage.{cb_key} has the wrong shape)")
                cb.usage.copy_(state[f"usage.{cb_key}"])
            if f"recent.{cb_key}" in state:
                cb.recent_inputs = state[f"recent.{cb_key}"].to(device)
        for p in self.model.parameters():
            p.data = p.data.to(device)
        return self


def apply_preset(name: str, task: str = "tokfsm", base_model: str | None = None) -> TrainConfig:
    """A preset's TrainConfig; text runs (`task="text"` or a base model) use the text presets."""
    table = HF_PRESETS if base_model is not None else TEXT_PRESETS if task == "text" else PRESETS
    if name not in table:
        raise UserError(f"unknown --preset {name!r}: use {', '.join(table)}")
    return TrainConfig(**table[name])
