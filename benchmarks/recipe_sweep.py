"""Recipe sweep: codebook-phase variants (C, k, sites, steps) on one base; held-out loss on/bypassed per line.

Every variant trains the codebook phase of `cbtool train` (k-means insertion + codebook-only steps, base frozen)
and evaluates on the held-out documents, so its line is what `cbtool train` with those options would report:

  python -m benchmarks recipe_sweep --base-model DIR --gguf-file F --corpus CORPUS \\
      --variant 'num_codes=1024,k=1' --variant 'num_codes=4096,k=8' --steps 60

With no --base-model the built-in text model is used: its plain phase is trained ONCE (the text default's
`base_steps`) and every variant starts from that same base, which is what makes a sweep of the built-in
model affordable on a CPU. A variant is `field=value,...` over TrainConfig fields (cbtool/training/config.py);
`sites` takes `;` in place of `,` inside a variant (e.g. `sites=12.mlp;20.mlp`).
Output: one line per variant (and `--json-out FILE`: the rows).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path
from tempfile import TemporaryDirectory

from rich.console import Console

from cbtool.errors import UserError
from cbtool.model.devices import resolve_device
from cbtool.training.config import TrainConfig, apply_preset
from cbtool.training.trainer import Trainer

_FIELDS = {f.name: f.type for f in fields(TrainConfig)}


def parse_variant(text: str) -> dict[str, object]:
    out: dict[str, object] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in _FIELDS:
            raise SystemExit(f"unknown TrainConfig field {key!r} in variant {text!r}")
        if key == "sites":
            out[key] = value.replace(";", ",")
        elif value.lower() in ("true", "false"):
            out[key] = value.lower() == "true"
        else:
            for parse in (int, float, str):  # kmeans=torch is a string
                try:
                    out[key] = parse(value)
                    break
                except ValueError:
                    continue
    return out


def base_config(args: argparse.Namespace) -> TrainConfig:
    cfg = apply_preset("default", "text", args.base_model)
    cfg.base_model, cfg.gguf_file, cfg.corpus = args.base_model, args.gguf_file, args.corpus
    cfg.checkpoint_every = 0
    for name in ("steps", "eval_blocks", "seed"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    return cfg


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks recipe_sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--base-model", default=None, help="local HF model dir (default: the built-in text model)")
    ap.add_argument("--gguf-file", default=None)
    ap.add_argument("--corpus", default=None, help="training corpus (default: the built-in one)")
    ap.add_argument("--variant", action="append", default=[], help="field=value,... (repeatable)")
    ap.add_argument("--steps", type=int, default=None, help="codebook steps of every variant")
    ap.add_argument("--eval-blocks", type=int, default=None)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--device", default="cpu", help="cpu (default: the figures in docs/results.md), cuda or auto")
    args = ap.parse_args(argv)
    log = Console(stderr=True)
    try:
        dev = resolve_device(args.device)
    except UserError as e:
        ap.error(str(e))  # one line, exit 2
    rows = []
    with TemporaryDirectory() as tmp:
        base_state, task = None, None
        cfg0 = base_config(args)
        if cfg0.base_model is None and cfg0.base_steps > 0:  # the built-in model: train its plain phase once
            t0 = time.perf_counter()
            plain = TrainConfig(**{**cfg0.__dict__, "steps": 0})
            tr = Trainer(plain, Path(tmp) / "base", dev, log)
            while tr.step < plain.base_steps:
                tr.train_step()
            base_state = {k: v.clone() for k, v in tr.model.base.state_dict().items()}
            task = tr.task
            log.print(f"base phase: {plain.base_steps} steps in {time.perf_counter() - t0:.0f} s")
        for i, text in enumerate(args.variant or [""]):
            cfg = TrainConfig(**{**cfg0.__dict__, **parse_variant(text)})
            t0 = time.perf_counter()
            tr = Trainer(cfg, Path(tmp) / f"v{i}", dev, log, task=task)
            if base_state is not None:
                tr.model.base.load_state_dict(base_state)
                tr.step = cfg.base_steps
            res = tr.run()
            usage = list(res["code_usage"].values())
            row = {"variant": text or "default", "sites": cfg.sites, "num_codes": cfg.num_codes, "k": cfg.k,
                   "steps": cfg.steps, "loss_on": round(res["on"]["loss"], 4),
                   "loss_bypassed": round(res["bypassed"]["loss"], 4),
                   "gap": round(res["on"]["loss"] - res["bypassed"]["loss"], 4),
                   "train_s": res["train_seconds"], "wall_s": round(time.perf_counter() - t0, 1),
                   "dead_share": round(1 - sum(usage) / len(usage), 3), "heldout_tokens": res["heldout_tokens"]}
            rows.append(row)
            print(f"{row['variant']:<40} sites={cfg.sites:<28} C={cfg.num_codes:<6} k={cfg.k:<2} "
                  f"steps={cfg.steps:<4} loss on {row['loss_on']:.4f} bypassed {row['loss_bypassed']:.4f} "
                  f"(gap {row['gap']:+.4f})  train {row['train_s']:.0f} s  dead {row['dead_share']:.1%}",
                  flush=True)
            if args.json_out:
                args.json_out.write_text(json.dumps(rows, indent=1))
    return 0
