"""Codebook layer: forward and forward+backward time vs the bare roofline, peak memory, per-head batching.

Timings are taken in this process, min over `--repeats` after one warm-up, all configurations interleaved
with their roofline so that the ratio compares runs made under the same load. The roofline is the bare
selection with no autograd: normalise the tokens and the codes, one matmul for the whole (tokens x C)
similarity matrix (chunked over tokens only when the matrix is larger than --roofline-max-bytes; the table
says which), and topk. The layer's time includes everything a training step pays for: selection, the mean
of the selected codes, the MSE aux loss, the straight-through input and, for forward+backward, the
backward pass into the codes and the input.

Peak memory is measured in a fresh subprocess per configuration: glibc malloc is told to serve every
allocation of 128 KiB or more with mmap (MALLOC_MMAP_THRESHOLD_), so freed tensors go back to the OS at
once and the resident set follows the live torch allocations; the peak resident set (VmHWM, reset through
/proc/self/clear_refs just before the call) minus the resident set before the call is the memory the call
needed at its peak, including the gradients it leaves behind. The roofline is measured the same way as a
check of the method: it must show the full similarity matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.nn import functional as F

from cbtool.model.codebook import DEFAULT_CHUNK_BYTES, Codebook, select_topk

FULL = {"tokens": 8192, "d": (128, 512), "C": (1024, 16384, 65536), "k": (1, 8)}
QUICK = {"tokens": 2048, "d": (64,), "C": (1024, 8192), "k": (1, 8)}
FWD_FLOOR, FWDBWD_FLOOR = 1.2, 1.5
MEM_FLOOR_C = 65536  # the memory floor applies to this codebook size


def interleaved(fns: list[Callable[[], object]], repeats: int, budget_s: float = 0.0) -> list[float]:
    """Min wall time of each function, timed in rounds (one run of each per round) so that a change
    of load from other processes hits all of them alike. One warm-up round first; then `repeats`
    rounds, or more (up to 30) while they fit in `budget_s`: cheap configurations get more chances
    to meet a quiet moment on a shared machine."""
    start = time.perf_counter()
    for fn in fns:
        fn()
    warm = time.perf_counter() - start
    rounds = max(repeats, min(30, int(budget_s / max(warm, 1e-6))))
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


@torch.no_grad()
def roofline(x: torch.Tensor, codes: torch.Tensor, k: int, max_bytes: int) -> None:
    """Normalise + one matmul + topk; x: (N, d), codes: (C, d). Chunked only above max_bytes."""
    xn = F.normalize(x, dim=-1)
    cn = F.normalize(codes, dim=-1)
    n, c = x.shape[0], codes.shape[0]
    step = n if n * c * 4 <= max_bytes else max(1, max_bytes // (4 * c))
    for start in range(0, n, step):
        xn[start : start + step].matmul(cn.T).topk(k, dim=-1)


def roofline_mode(n: int, c: int, max_bytes: int) -> str:
    return "full" if n * c * 4 <= max_bytes else f"chunked({max(1, max_bytes // (4 * c))} rows)"


class LayerCase:
    """One configuration: a training-mode Codebook and an input that requires grad."""

    def __init__(self, n: int, d: int, c: int, k: int, chunk_bytes: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.cb = Codebook(d, c, k, groups=1, chunk_bytes=chunk_bytes).train()
        with torch.no_grad():
            self.cb.codes.copy_(torch.randn(1, c, d, generator=g))
        self.x = torch.randn(n, 1, d, generator=g).requires_grad_(True)
        self.gout = torch.randn(n, 1, d, generator=g)
        self.k = k

    def forward(self) -> None:
        out = self.cb(self.x)
        assert self.cb.aux_loss is not None and out.requires_grad
        self.cb.aux_loss = None

    def forward_backward(self) -> None:
        self.x.grad = None
        self.cb.codes.grad = None
        out = self.cb(self.x)
        torch.autograd.backward([out, self.cb.aux_loss], [self.gout, None])
        self.cb.aux_loss = None

    def roofline(self, max_bytes: int) -> None:
        roofline(self.x.detach()[:, 0], self.cb.codes.detach()[0], self.k, max_bytes)


@dataclass
class Row:
    d: int
    C: int
    k: int
    fwd_ms: float
    fwdbwd_ms: float
    roof_ms: float
    roof_mode: str
    peak_mb: float | None
    roof_peak_mb: float | None
    full_matrix_mb: float

    @property
    def fwd_ratio(self) -> float:
        return self.fwd_ms / self.roof_ms

    @property
    def fwdbwd_ratio(self) -> float:
        return self.fwdbwd_ms / self.roof_ms


# ---------------------------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _probe(mode: str, n: int, d: int, c: int, k: int, chunk_bytes: int, max_bytes: int) -> None:
    """Child process: print the peak resident-set increase (bytes) of one call as JSON."""
    torch.manual_seed(0)
    small = LayerCase(64, d, min(c, 64), min(k, 8), chunk_bytes)  # load kernels, start threads
    small.forward_backward()
    small.roofline(max_bytes)
    case = LayerCase(n, d, c, k, chunk_bytes)
    call = case.forward_backward if mode == "layer" else lambda: case.roofline(max_bytes)
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    call()
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_bytes": (peak - before) * 1024}))


def measure_peak(mode: str, n: int, d: int, c: int, k: int, chunk_bytes: int, max_bytes: int) -> float | None:
    """Peak memory (MiB) of one call in a fresh subprocess, or None where it cannot be measured."""
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    cmd = [sys.executable, "-m", "benchmarks.codebook", "--probe", mode, str(n), str(d), str(c), str(k),
           "--chunk-bytes", str(chunk_bytes), "--roofline-max-bytes", str(max_bytes)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        print(f"memory probe failed: {res.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"] / 2**20


# ------------------------------------------------------------------------------------------- per head


def per_head(n: int, heads: int, d: int, c: int, repeats: int) -> dict[str, float]:
    """Selection (ids of the best code per head) three ways; times in ms."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, heads, d, generator=g)
    codes = torch.randn(heads, c, d, generator=g)

    def ours() -> torch.Tensor:
        return select_topk(x, codes, 1).ids[..., 0]

    @torch.no_grad()
    def loop() -> torch.Tensor:
        out = []
        for h in range(heads):
            sim = F.normalize(x[:, h], dim=-1) @ F.normalize(codes[h], dim=-1).T
            out.append(sim.max(dim=-1).indices)
        return torch.stack(out, 1)

    @torch.no_grad()
    def naive() -> torch.Tensor:
        sim = torch.einsum("ngd,gcd->ngc", F.normalize(x, dim=-1), F.normalize(codes, dim=-1))
        return sim.argmax(dim=-1)

    a, b, e = ours(), loop(), naive()
    agree = min(float((a == b).float().mean()), float((a == e).float().mean()))
    t_ours, t_loop, t_naive = interleaved([ours, loop, naive], repeats)
    return {"ours_ms": 1e3 * t_ours, "loop_ms": 1e3 * t_loop, "naive_ms": 1e3 * t_naive, "agreement": agree}


# ------------------------------------------------------------------------------------------------ main


def table(rows: list[Row], n: int) -> str:
    head = ("| d | C | k | fwd ms | fwd+bwd ms | roofline ms | roofline | fwd / roof | f+b / roof "
            "| layer peak MiB | roofline peak MiB | full matrix MiB |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        def mb(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.0f}"
        f_ok = "" if r.fwd_ratio <= FWD_FLOOR else " ✗"
        b_ok = "" if r.fwdbwd_ratio <= FWDBWD_FLOOR else " ✗"
        m_ok = "" if r.C < MEM_FLOOR_C or r.peak_mb is None or r.peak_mb < r.full_matrix_mb else " ✗"
        lines.append(
            f"| {r.d} | {r.C} | {r.k} | {r.fwd_ms:.1f} | {r.fwdbwd_ms:.1f} | {r.roof_ms:.1f} | {r.roof_mode} "
            f"| {r.fwd_ratio:.2f}{f_ok} | {r.fwdbwd_ratio:.2f}{b_ok} | {mb(r.peak_mb)}{m_ok} "
            f"| {mb(r.roof_peak_mb)} | {r.full_matrix_mb:.0f} |"
        )
    return "\n".join(lines)


def floors(rows: list[Row]) -> list[str]:
    fails = []
    for r in rows:
        name = f"d={r.d} C={r.C} k={r.k}"
        if r.fwd_ratio > FWD_FLOOR:
            fails.append(f"{name}: forward {r.fwd_ratio:.2f}x > {FWD_FLOOR}x roofline")
        if r.fwdbwd_ratio > FWDBWD_FLOOR:
            fails.append(f"{name}: forward+backward {r.fwdbwd_ratio:.2f}x > {FWDBWD_FLOOR}x roofline")
        if r.C >= MEM_FLOOR_C and r.peak_mb is not None and r.peak_mb >= r.full_matrix_mb:
            fails.append(f"{name}: peak {r.peak_mb:.0f} MiB >= full matrix {r.full_matrix_mb:.0f} MiB")
    return fails


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks codebook", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small grid (smoke test, seconds)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (min is reported)")
    p.add_argument("--budget", type=float, default=8.0,
                   help="seconds per configuration for extra rounds beyond --repeats (cheap ones, up to 30)")
    p.add_argument("--tokens", type=int, help="tokens per batch (default 8192, --quick 2048)")
    p.add_argument("--d", type=int, nargs="+", help="override the grid's dims")
    p.add_argument("--C", type=int, nargs="+", help="override the grid's codebook sizes")
    p.add_argument("--k", type=int, nargs="+", help="override the grid's k values")
    p.add_argument("--chunk-bytes", type=int, default=DEFAULT_CHUNK_BYTES, help="layer's chunk size")
    p.add_argument("--roofline-max-bytes", type=int, default=4 * 2**30,
                   help="largest similarity matrix the roofline builds whole (default 4 GiB)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-per-head", action="store_true", help="skip the per-head comparison")
    p.add_argument("--json", metavar="PATH", help="also write the raw figures as JSON")
    p.add_argument("--check", action="store_true", help="exit 1 when a floor does not hold")
    p.add_argument("--probe", nargs=5, metavar=("MODE", "N", "D", "C", "K"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.probe:
        mode, *nums = args.probe
        n, d, c, k = map(int, nums)
        _probe(mode, n, d, c, k, args.chunk_bytes, args.roofline_max_bytes)
        return 0

    grid = QUICK if args.quick else FULL
    n = args.tokens or grid["tokens"]
    dims, sizes, ks = args.d or grid["d"], args.C or grid["C"], args.k or grid["k"]
    print(f"# codebook layer, tokens={n}, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"repeats={args.repeats}, chunk_bytes={args.chunk_bytes}", file=sys.stderr)
    rows: list[Row] = []
    for d in dims:
        for c in sizes:
            for k in ks:
                case = LayerCase(n, d, c, k, args.chunk_bytes)
                roof, fwd, fb = interleaved(
                    [lambda case=case: case.roofline(args.roofline_max_bytes), case.forward,
                     case.forward_backward], args.repeats, args.budget)
                del case
                peak = roof_peak = None
                if not args.no_memory:
                    probe = (n, d, c, k, args.chunk_bytes, args.roofline_max_bytes)
                    peak = measure_peak("layer", *probe)
                    roof_peak = measure_peak("roofline", *probe)
                mode = roofline_mode(n, c, args.roofline_max_bytes)
                row = Row(d, c, k, 1e3 * fwd, 1e3 * fb, 1e3 * roof, mode, peak, roof_peak, n * c * 4 / 2**20)
                rows.append(row)
                print(f"  d={d} C={c} k={k}: fwd {row.fwd_ratio:.2f}x, fwd+bwd {row.fwdbwd_ratio:.2f}x "
                      f"roofline ({row.roof_ms:.1f} ms), peak {peak} MiB", file=sys.stderr, flush=True)
    print(f"## Codebook layer, tokens={n} (times: min of >= {args.repeats} interleaved rounds; "
          "✗ = floor not met)\n")
    print(table(rows, n))
    result: dict = {"tokens": n, "rows": [asdict(r) for r in rows]}
    if not args.no_per_head:
        ph_n = min(n, 8192)
        ph_rounds = max(args.repeats, 15)
        ph = per_head(ph_n, 4, 32, 1000, ph_rounds)
        result["per_head"] = ph
        print(f"\n## Per-head selection: 4 heads x d=32, C=1000, k=1, {ph_n} tokens (min of "
              f"{ph_rounds} interleaved rounds)\n")
        print("| batched select_topk ms | one matmul per head (loop) ms | naive batched einsum+argmax ms "
              "| ids agree |")
        print("|---|---|---|---|")
        print(f"| {ph['ours_ms']:.1f} | {ph['loop_ms']:.1f} | {ph['naive_ms']:.1f} | {ph['agreement']:.4f} |")
    fails = floors(rows)
    if "per_head" in result and result["per_head"]["ours_ms"] >= min(ph["loop_ms"], ph["naive_ms"]):
        fails.append("per-head: batched selection is not faster than both alternatives")
    print("\nfloors: " + ("all hold" if not fails else "NOT MET: " + "; ".join(fails)))
    if args.json:
        result["floor_failures"] = fails
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if fails and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
