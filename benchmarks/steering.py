"""Steered generation throughput: steered vs unsteered at batch 32, batch 32 vs batch 1 (tokens/s).

The model is the built-in default (4 layers, d 128, codebooks on every attention head and MLP, C=1000,
k=1: 20 sites) with random weights, or a checkpoint given with --checkpoint; throughput does not depend
on training. All three configurations run through the same KV-cache sampler (cbtool.steering.interventions); the
unsteered one installs no intervention. Timings are interleaved in rounds (one run of each per round,
min over rounds) so that a change of load from other processes hits all of them alike.
Floors: steered >= 0.9x unsteered at batch 32; batch 32 >= 8x the tokens/s of batch 1.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from cbtool.model.generate import left_pad
from cbtool.model.sites import BuiltinLocator, CodebookModel, parse_sites_option
from cbtool.model.transformer import ModelConfig, Transformer
from cbtool.steering.interventions import Intervention, sample_steered, sample_uniforms, steering

STEER_FLOOR, BATCH_FLOOR = 0.9, 8.0


def build_model(checkpoint: str | None, device: torch.device) -> CodebookModel:
    if checkpoint:
        from cbtool.formats.checkpoint import load_checkpoint

        return load_checkpoint(checkpoint, device=device).model
    torch.manual_seed(0)
    base = Transformer(ModelConfig())
    chosen = parse_sites_option("attn-heads,mlp", base.config.n_layer)
    return CodebookModel.build(base, BuiltinLocator(base), chosen, 1000, 1).to(device).eval()


def run(model: CodebookModel, batch: int, new_tokens: int, steer: list[Intervention], device) -> float:
    """Wall seconds to generate `new_tokens` for `batch` rows from a 16-token prompt."""
    prompts = [[0] + [1 + (i * 7 + j) % 10 for j in range(15)] for i in range(batch)]
    idx, start = left_pad(prompts)
    uniforms = sample_uniforms(range(batch), new_tokens)
    t0 = time.perf_counter()
    with steering(model, [list(steer) for _ in range(batch)], "all", device) as fwd:
        sample_steered(fwd, idx.to(device), start, uniforms)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks steering", description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=None, help="checkpoint to use (default: random default model)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and rounds (smoke test)")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.rounds = 16, 2
    device = torch.device(args.device)
    model = build_model(args.checkpoint, device)
    mlp = [s for s in model.sites.values() if s.spec.component == "mlp"]
    heads = [s for s in model.sites.values() if s.spec.component == "attn_heads"]
    steer = [Intervention(mlp[-1], 1), Intervention(mlp[0], 2, "add", 2.0)]
    if heads:
        steer.append(Intervention(heads[0], 3, "ablate"))
    configs = {
        "unsteered_b1": (1, []),
        "unsteered_b32": (32, []),
        "steered_b32": (32, steer),
    }
    best = dict.fromkeys(configs, float("inf"))
    with torch.no_grad():
        for b, ivs in configs.values():  # warm-up
            run(model, b, 4, ivs, device)
        for _ in range(args.rounds):
            for name, (b, ivs) in configs.items():
                best[name] = min(best[name], run(model, b, args.new_tokens, ivs, device))
    tps = {name: configs[name][0] * args.new_tokens / best[name] for name in configs}
    steer_ratio = tps["steered_b32"] / tps["unsteered_b32"]
    batch_ratio = tps["unsteered_b32"] / tps["unsteered_b1"]
    result = {
        "benchmark": "steering", "device": str(device), "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens, "rounds": args.rounds,
        "interventions": [iv.to_dict() for iv in steer],
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "steered_vs_unsteered_b32": round(steer_ratio, 3), "steer_floor": STEER_FLOOR,
        "b32_vs_b1": round(batch_ratio, 2), "batch_floor": BATCH_FLOOR,
        "pass": steer_ratio >= STEER_FLOOR and batch_ratio >= BATCH_FLOOR,
    }
    print(json.dumps(result, indent=2))
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
