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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.nn import functional as F

from cbtool.errors import UserError
from cbtool.formats.checkpoint import (
    Checkpoint,
    save_checkpoint,
)
from cbtool.model import devices
from cbtool.model.sites import BuiltinLocator, CodebookModel, Locator, parse_site_codes, parse_sites_option
from cbtool.model.transformer import ModelConfig, Transformer
from cbtool.tasks import corpora
from cbtool.tasks import text as textmod
from cbtool.tasks.base import Task
from cbtool.tasks.text import TextTokenizer
from cbtool.tasks.tokfsm import FSMSpec, TokFSM
from cbtool.training import ddp, metrics_log
from cbtool.training.config import (
    TrainConfig,
    fit_to_corpus,
)
from cbtool.training.kmeans import capture_inputs, init_codebook
from cbtool.training.resume import check_train_state
from cbtool.util import budget, distributed, progress, signals
from cbtool.util.limits import MAX_CODEBOOK_BYTES, MAX_CODES
from cbtool.util.locks import Lock

PHASE_TIMERS = ("base", "kmeans", "codebook", "eval")  # results' phase_seconds


def make_task(cfg: TrainConfig, tokenizer: TextTokenizer | None = None) -> Task:
    """The task a config trains on. Text reads the corpus and, unless given a `tokenizer` (a pretrained
    base's), trains a byte-level BPE on it."""
    if cfg.task == "tokfsm":
        return TokFSM(FSMSpec(**cfg.fsm, seed=cfg.seed))
    sources = corpora.load_sources(cfg.corpus, cfg.text_field)
    tok = tokenizer if tokenizer is not None else textmod.train_bpe(sources, cfg.vocab_size)
    return textmod.TextTask(tok, cfg.corpus, cfg.text_field, cfg.seq_len,
                            "hf" if cfg.base_model is not None else "bpe", sources=sources,
                            corpus_sha256=corpora.corpus_sha256(cfg.corpus))


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path, device: torch.device, log: Console,
                 task: Task | None = None, device_map: str | None = None) -> None:
        """`task`: the checkpoint's own task when resuming (its tokenizer, never a retrained one);
        else `make_task(cfg)`. `device_map="auto"`: a pretrained base spread over the devices, each codebook
        on its layer's (cbtool/model/devices.py); `device` is then where the input ids go."""
        cfg.validate()
        devices.check_device_map(device_map, cfg.base_model is not None)
        fresh = task is None  # a new run; a resumed one keeps the sizes and steps it started with
        self.world = distributed.world()
        distributed.check_divides(cfg.batch_size, "--batch-size")
        self.cfg, self.out, self.device, self.log = cfg, Path(out), device, log
        self.lock: Lock | None = None  # start_training's claim on `out`
        self.preset: str | None = None  # recorded in cbtool.json: `train --resume --preset` is compared with it
        self.saved_step: int | None = None  # the step of the checkpoint on disk written or resumed by this run
        self._switched = False  # k-means has run in this process (at step base_steps)
        if cfg.corpus is not None and not (cfg.corpus in corpora.NAMED_CORPORA and not Path(cfg.corpus).exists()):
            cfg.corpus = str(Path(cfg.corpus).resolve())
        torch.manual_seed(cfg.seed)
        if self.pretrained:
            from cbtool.model import hf

            hf.check_base_dir(cfg.base_model, cfg.gguf_file)  # bad input: one error line, nothing logged first
            self.log.print(f"loading base model {cfg.base_model}"
                           + (f" / {cfg.gguf_file} (de-quantising the GGUF file: ~15-60 s)" if cfg.gguf_file else ""),
                           highlight=False, soft_wrap=True)
            base, locator, self.model_spec = hf.load_hf_model(cfg.base_model, cfg.gguf_file,
                                                              frozen=not cfg.train_base, device_map=device_map)
            cfg.base_model = self.model_spec["path"]
            if task is None:
                task = make_task(cfg, textmod.load_hf_tokenizer(cfg.base_model, cfg.gguf_file))
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
        chosen = parse_sites_option(cfg.sites, locator.n_layer)
        if fresh and cfg.fit_corpus and task.train_tokens is not None:
            note = fit_to_corpus(cfg, task.train_tokens, chosen, locator.n_layer)
            if note is not None:
                self.log.print(note, markup=False, highlight=False, soft_wrap=True)
        if cfg.steps > 0 and task.train_tokens is not None and task.train_tokens < cfg.num_codes:
            raise UserError(f"corpus too small for k-means: {task.train_tokens:,} training tokens for "
                            f"--num-codes {cfg.num_codes}; use more text or fewer codes")
        locator.check_sites(chosen)
        site_codes = self._site_codes(chosen, locator)
        self.model = CodebookModel.build(base, locator, chosen, cfg.num_codes, cfg.k, site_codes)
        self._check_memory(locator, device)
        self.device_map = device_map
        if device_map is None:
            self.model.to(device)
        else:
            devices.place_codebooks(self.model)
            self.device = devices.input_device(self.model)
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

    def _check_memory(self, locator: Locator, device: torch.device) -> None:
        """--batch-size and --kmeans-seqs that cannot fit are refused before anything runs (cbtool/util/budget.py):
        a training step keeps at least 4 d_model-wide activations per layer and token for the backward pass
        and the logits with their gradient; k-means holds every token's activations of a codebook's site."""
        cfg, t = self.cfg, self.task.block_size
        limit = budget.physical_memory()
        if limit is not None and device.type == "cuda":
            limit = max(limit, torch.cuda.get_device_properties(device).total_memory)
        rows = -(-cfg.batch_size // self.world.size)
        per_seq = 4 * t * (4 * locator.n_layer * locator.d_model + 2 * self.task.vocab_size)
        budget.check_memory(rows * per_seq, f"--batch-size {cfg.batch_size} (sequences of {t} tokens)",
                            "use a smaller --batch-size", limit)
        if cfg.steps > 0:
            dim = min((spec.dim for spec, _ in self.model.items()), default=0)
            budget.check_memory(cfg.kmeans_seqs * t * (8 + 4 * dim), f"--kmeans-seqs {cfg.kmeans_seqs} "
                                f"(sequences of {t} tokens)", "use a smaller --kmeans-seqs", limit)

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

    def _switch_due(self) -> bool:
        cfg, step = self.cfg, self.step
        return (not self._switched and step == cfg.base_steps and (cfg.base_steps > 0 or cfg.steps > 0)
                and step < self.total_steps)

    def _enter_codebook_phase(self) -> None:
        self._switch_to_codebooks()
        self._make_optimizer("codebook")
        self._switched = True

    # -- one step -----------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        cfg, step = self.cfg, self.step
        if self._switch_due():
            self._enter_codebook_phase()
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
        # one tracker per phase, its total the phase's steps as the header says ("900 base + 300 codebook
        # steps"); k-means runs between them, so a finished phase is not reprinted while it runs
        for phase, first, end in (("base", 0, cfg.base_steps), ("codebook", cfg.base_steps, self.total_steps)):
            if self.step >= end:
                continue
            if phase == "codebook" and self._switch_due():
                t0 = time.perf_counter()
                self._enter_codebook_phase()
                self.elapsed += time.perf_counter() - t0
            self._run_phase(phase, first, end, tokens_per_step, smooth, on_checkpoint)
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

    def _run_phase(self, phase: str, first: int, end: int, tokens_per_step: int, smooth: dict[str, float],
                   on_checkpoint: Callable[[int], None] | None) -> None:
        """Steps `self.step`..`end` of one phase, its progress counted from the phase's `first` step."""
        cfg = self.cfg
        with progress.track(phase, end - first, "steps", done=self.step - first) as bar:
            while self.step < end:
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
                bar.advance(1, **_smoothed(smooth, row, new_phase))
                bar.fields.pop("tok/s", None)  # last, after the smoothed losses
                bar.fields["tok/s"] = f"{(bar.rate or 0) * tokens_per_step:,.0f}"
                if not progress.live() and (self.step % 100 == 0 or self.step == end):  # + the heartbeat's lines
                    self.log.print(bar.describe(), markup=False, highlight=False, soft_wrap=True)
                    bar.last_line = time.perf_counter()
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < self.total_steps:
                    self.save(results=None)
                    if on_checkpoint:
                        on_checkpoint(self.step)

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
        check_train_state(state, bad, self.model.codebooks)  # NaN, inf, wrong shapes: one line, before use
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


