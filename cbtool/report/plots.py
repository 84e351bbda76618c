"""`--plot FILE.png|svg` for eval, dead-codes, find-codes and intervene (matplotlib, the Agg backend).

matplotlib is an optional extra (`pip install -e '.[plot]'`); it is imported only when a plot is asked for.
Figures are built on `matplotlib.figure.Figure` (no pyplot, no global state, no display) and written
atomically (temp file + rename). The format follows the file's suffix.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cbtool.errors import UserError
from cbtool.util.stats import wilson_interval

FORMATS = (".png", ".svg")


def check_plot_path(path: Path | None) -> Path | None:
    """Validate `--plot` before any work: a .png/.svg file in an existing directory, and matplotlib present."""
    if path is None:
        return None
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UserError(f"--plot {path}: the file must end in .png or .svg")
    if not path.parent.is_dir():
        raise UserError(f"--plot {path}: directory {path.parent} does not exist")
    _matplotlib()
    return path


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install matplotlib (the plot extra: pip install -e '.[plot]' "
                        "in the cbtool checkout)") from None
    matplotlib.use("Agg", force=False)
    return matplotlib


def _figure(rows: int, cols: int, width: float = 10.0, height: float = 6.0) -> tuple[Any, np.ndarray]:
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(-1)
    return fig, axes


def save(fig: Any, path: Path) -> Path:
    """Write the figure atomically; the format follows the suffix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format=path.suffix.lower().lstrip("."), dpi=110, metadata=_metadata(path))
        readable(Path(tmp))
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise UserError(f"cannot write plot {path}: {e.strerror or e}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def readable(path: Path) -> None:
    """Give a temp file (mkstemp: 0600) the permissions a plain `open(..., "w")` would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _metadata(path: Path) -> dict[str, Any]:
    # no creation date: the same inputs give the same file
    return {"Date": None} if path.suffix.lower() == ".svg" else {"Software": "cbtool"}


def _site_colors(names: Sequence[str]) -> dict[str, Any]:
    """MLP sites in warm colours, attention sites in cool ones, darker with depth."""
    _matplotlib()
    from matplotlib import colormaps

    out = {}
    n = max(1, len(names))
    for i, name in enumerate(names):
        cmap = colormaps["Oranges" if name.endswith(".mlp") else "Blues"]
        out[name] = cmap(0.45 + 0.5 * i / n)
    return out


def training_curves(rows: list[dict[str, Any]], results: dict[str, Any] | None, path: Path, title: str) -> Path:
    """eval --plot: loss, task accuracy, per-site MSE and live codes from the metrics log, plus the
    final on-vs-bypassed loss."""
    fig, ax = _figure(2, 2, 11, 7)
    fig.suptitle(title, fontsize=10)
    steps = [r["step"] for r in rows]
    base = [r["step"] for r in rows if r.get("phase") == "base"]
    switch = max(base) if base and len(base) < len(rows) else None  # the last row before the codebooks
    ax[0].plot(steps, [r["loss"] for r in rows], lw=1, label="train batch")
    for label, style in (("on", "-"), ("bypassed", "--")):
        loss = ((results or {}).get(label) or {}).get("loss")
        if loss is not None:
            ax[0].axhline(loss, ls=style, color="k", lw=0.8, label=f"held-out, codebooks {label}: {loss:.4f}")
    ax[0].set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    acc_key = "fsm_valid" if any("fsm_valid" in r for r in rows) else "accuracy"
    ax[1].plot(steps, [r.get(acc_key) for r in rows], lw=1, color="tab:green")
    ax[1].set(xlabel="step", ylabel="share", ylim=(0, 1.02),
              title="greedy next token valid in the FSM" if acc_key == "fsm_valid" else "next-token accuracy")
    cb_rows = [r for r in rows if r.get("sites")]
    names = list(cb_rows[0]["sites"]) if cb_rows else []
    colors = _site_colors(names)
    cb_steps = [r["step"] for r in cb_rows]
    for name in names:
        ax[2].plot(cb_steps, [r["sites"][name].get("mse") for r in cb_rows], lw=0.9, color=colors[name],
                   label=name if len(names) <= 8 else None)
        live = [r["sites"][name]["live"] / max(1, r["sites"][name]["live"] + r["sites"][name]["dead"])
                for r in cb_rows]
        ax[3].plot(cb_steps, live, lw=0.9, color=colors[name])
    ax[2].set(xlabel="step", ylabel="MSE (sum over dims)", title="reconstruction MSE per site "
              "(orange: MLP, blue: attention)")
    if names:
        ax[2].set_yscale("log")
    ax[3].set(xlabel="step", ylabel="share of codes", ylim=(0, 1.02), title="codes that fired since the last row")
    for a in ax:
        if switch is not None:
            a.axvline(switch, color="grey", lw=0.6, ls=":")
    ax[0].legend(fontsize=7)
    if 0 < len(names) <= 8:
        ax[2].legend(fontsize=7)
    if not rows:
        ax[1].text(0.5, 0.5, "this checkpoint has no metrics log", ha="center", transform=ax[1].transAxes)
    return save(fig, path)


def usage_curves(counts: dict[str, np.ndarray], path: Path, title: str) -> Path:
    """dead-codes --plot: each site's firing counts sorted from most to least used (log-log), dead codes
    marked by where each curve ends."""
    fig, ax = _figure(1, 1, 8, 5)
    ax = ax[0]
    colors = _site_colors(list(counts))
    for name, c in counts.items():
        s = np.sort(np.asarray(c))[::-1]
        alive = s[s > 0]
        ax.plot(np.arange(1, len(alive) + 1), alive, lw=1, color=colors[name],
                label=f"{name} ({len(s) - len(alive)} dead)" if len(counts) <= 12 else None)
    ax.set(xscale="log", yscale="log", xlabel="code rank (most used first)", ylabel="tokens fired on",
           title=title)
    if len(counts) <= 12:
        ax.legend(fontsize=7)
    return save(fig, path)


def precision_recall(rows: list[dict[str, Any]], path: Path, title: str, highlight: int = 5) -> Path:
    """find-codes --plot: precision vs recall of the candidate codes; the best `highlight` are labelled."""
    fig, ax = _figure(1, 1, 7, 5.5)
    ax = ax[0]
    rows = [r for r in rows if r.get("code")]
    names = list(dict.fromkeys(r["site"] for r in rows))
    colors = _site_colors(names)
    ax.scatter([r["recall"] for r in rows], [r["precision"] for r in rows], s=10, alpha=0.7,
               c=[colors[r["site"]] for r in rows], edgecolors="none")
    for r in rows[:highlight]:
        ax.annotate(r["code"], (r["recall"], r["precision"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set(xlabel="recall", ylabel="precision", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02),
           title=f"{title}\n{len(rows)} candidate code(s); orange: MLP, blue: attention")
    return save(fig, path)


def _rate_bars(ax: Any, labels: list[str], series: dict[str, list[tuple[int, int]]]) -> None:
    """Grouped bars of hits/n per label with 95% Wilson intervals."""
    width = 0.8 / max(1, len(series))
    x = np.arange(len(labels))
    for i, (name, pairs) in enumerate(series.items()):
        rates = [h / n if n else 0.0 for h, n in pairs]
        ci = [wilson_interval(h, n) for h, n in pairs]
        err = np.array([[max(0.0, r - lo) for r, (lo, _) in zip(rates, ci, strict=True)],
                        [max(0.0, hi - r) for r, (_, hi) in zip(rates, ci, strict=True)]])
        ax.bar(x + (i - (len(series) - 1) / 2) * width, rates, width, yerr=err, capsize=3, label=name)
    ax.set_xticks(x, labels)
    ax.set(ylim=(0, 1.05), ylabel="rate (95% Wilson interval)")
    ax.legend(fontsize=8)


def steering_rates(summary: dict[str, Any], path: Path) -> Path:
    """intervene --regex --plot: steered vs baseline success rates with intervals."""
    fig, ax = _figure(1, 1, 6, 4.5)
    s, b = summary["steered"], summary["baseline"]
    ivs = ", ".join(f"{iv['mode']} {iv['code']}" for iv in summary.get("interventions") or []) or "--spec rows"
    _rate_bars(ax[0], [f"/{summary['regex']}/"], {"steered": [(s["matches"], s["samples"])],
                                                  "baseline (twins)": [(b["matches"], b["samples"])]})
    ax[0].set_title(f"{ivs}: gain {summary['gain']:+.1%}", fontsize=9)
    return save(fig, path)


def fsm_steering_rates(res: dict[str, Any], path: Path) -> Path:
    """intervene --fsm-eval --plot: share of next states valid for b and for a, per patched site set."""
    fig, ax = _figure(1, 1, 7, 4.5)
    n = int(res["pairs"])
    labels = [r["sites"] for r in res["table"]]
    _rate_bars(ax[0], labels, {
        "valid for b (steered-to state)": [(round(r["valid_for_b"] * n), n) for r in res["table"]],
        "valid for a (actual state)": [(round(r["valid_for_a"] * n), n) for r in res["table"]],
    })
    ax[0].set(xlabel="codes forced at", title=f"state steering, {n} pairs (none = unsteered baseline)")
    return save(fig, path)
