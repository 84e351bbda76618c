"""Render `cbtool.report.build` data as ONE self-contained HTML file: inline CSS, inline SVG charts, inline JS.

Safety: every string from the corpus, the checkpoint or an included file reaches the page either through
`html.escape` (the static parts, rendered here) or as JSON inside `<script type="application/json">` with
`<`, `>` and `&` written as `\\u003c`, `\\u003e`, `\\u0026` (so no `</script>` can end it early), which the
browser-side code only ever puts into the page with `textContent`. A Content-Security-Policy meta tag
forbids every network request (`default-src 'none'`): the file works from disk, offline, and a hostile
corpus can neither run script nor load anything.
"""

from __future__ import annotations

import json
import math
from html import escape
from importlib.resources import files
from typing import Any

from cbtool.util import strict_json

CSP = ("default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:; "
       "base-uri 'none'; form-action 'none'")
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def _e(x: Any) -> str:
    return escape(str(x), quote=True)


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool) or not isinstance(x, int | float):
        return _e(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return "–"
    if abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-3):
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}".rstrip("0").rstrip(".")


def _site_color(name: str, i: int, n: int) -> str:
    """MLP sites in oranges, attention sites in blues, darker with depth (as in cbtool.report.plots)."""
    t = 0.35 + 0.55 * i / max(1, n - 1)
    if name.endswith(".mlp"):
        return f"hsl(28, 90%, {70 - 40 * t:.0f}%)"
    return f"hsl(210, 70%, {72 - 42 * t:.0f}%)"


# -- SVG charts --------------------------------------------------------------------------------------------
def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        step = max(1, (b - a) // 5)
        return [10.0**e for e in range(a, b + 1, step) if lo <= 10.0**e <= hi] or [lo, hi]
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def svg_chart(series: list[dict[str, Any]], title: str, xlabel: str, ylabel: str, logx: bool = False,
              logy: bool = False, width: int = 460, height: int = 240, ylim: tuple[float, float] | None = None,
              vline: float | None = None) -> str:
    """A line chart as inline SVG. `series`: [{"name", "x", "y", "color"}]; None values are skipped."""
    pts = [(x, y) for s in series for x, y in zip(s["x"], s["y"], strict=True) if x is not None and y is not None
           and (not logx or x > 0) and (not logy or y > 0)]
    if not pts:
        return f'<div class="chart empty">{_e(title)}: no data</div>'
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = ylim if ylim else (min(ys), max(ys))
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = (y0 - 1, y1 + 1) if not logy else (y0 / 2, y1 * 2)
    left, right, top, bottom = 52, 10, 22, 34
    pw, ph = width - left - right, height - top - bottom

    def fx(x: float) -> float:
        t = (math.log10(x) - math.log10(x0)) / (math.log10(x1) - math.log10(x0)) if logx else (x - x0) / (x1 - x0)
        return left + t * pw

    def fy(y: float) -> float:
        t = (math.log10(y) - math.log10(y0)) / (math.log10(y1) - math.log10(y0)) if logy else (y - y0) / (y1 - y0)
        return top + (1 - t) * ph

    out = [f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
           f'aria-label="{_e(title)}"><title>{_e(title)}</title>',
           f'<text x="{left}" y="14" class="ct">{_e(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="frame"/>']
    for t in _ticks(x0, x1, logx):
        out.append(f'<line x1="{fx(t):.1f}" x2="{fx(t):.1f}" y1="{top}" y2="{top + ph}" class="grid"/>'
                   f'<text x="{fx(t):.1f}" y="{top + ph + 13}" class="tick" text-anchor="middle">{_num(t, 3)}</text>')
    for t in _ticks(y0, y1, logy):
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{fy(t):.1f}" y2="{fy(t):.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{fy(t) + 3:.1f}" class="tick" text-anchor="end">{_num(t, 3)}</text>')
    if vline is not None and x0 <= vline <= x1:
        out.append(f'<line x1="{fx(vline):.1f}" x2="{fx(vline):.1f}" y1="{top}" y2="{top + ph}" class="vline"/>')
    for s in series:
        seg = [(fx(x), fy(min(max(y, y0), y1))) for x, y in zip(s["x"], s["y"], strict=True)
               if x is not None and y is not None and (not logx or x > 0) and (not logy or y > 0)]
        if seg:
            d = " ".join(f"{'M' if i == 0 else 'L'}{a:.1f},{b:.1f}" for i, (a, b) in enumerate(seg))
            out.append(f'<path d="{d}" stroke="{_e(s["color"])}" class="line"><title>{_e(s["name"])}</title></path>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 4}" class="axis" text-anchor="middle">{_e(xlabel)}</text>')
    out.append(f'<text x="12" y="{top + ph / 2}" class="axis" text-anchor="middle" '
               f'transform="rotate(-90 12 {top + ph / 2})">{_e(ylabel)}</text></svg>')
    return "".join(out)


def _legend(names: list[str], colors: list[str]) -> str:
    if len(names) > 24:
        return '<p class="note">orange: MLP sites, blue: attention sites (darker = deeper)</p>'
    items = "".join(f'<span class="lg"><i style="background:{_e(c)}"></i>{_e(n)}</span>'
                    for n, c in zip(names, colors, strict=True))
    return f'<div class="legend">{items}</div>'


def _thin(rows: list[dict[str, Any]], points: int) -> list[dict[str, Any]]:
    if len(rows) <= points:
        return rows
    step = len(rows) / points
    picked = [rows[int(i * step)] for i in range(points)]
    return picked if picked[-1] is rows[-1] else [*picked, rows[-1]]


# -- sections ----------------------------------------------------------------------------------------------
def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escape before)."""
    th = "".join(f"<th>{h}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _overview(data: dict[str, Any]) -> str:
    ck, st = data.get("checkpoint"), data.get("store")
    parts = ['<section id="overview"><h2>Overview</h2>']
    facts = []
    if ck:
        model = ck.get("model") or {}
        desc = ", ".join(f"{k}={v}" for k, v in (model.get("config") or {}).items()) or model.get("path", "")
        facts += [("checkpoint", ck["path"]), ("model", f"{model.get('kind')}: {desc}"),
                  ("task", json.dumps(ck.get("task"))), ("cbtool", ck.get("cbtool_version"))]
        tr = ck.get("training") or {}
        if tr:
            facts.append(("training", f"step {tr.get('step')}/{tr.get('total_steps')}, {tr.get('seconds')} s on "
                                      f"{tr.get('device')}" + ("" if tr.get("finished") else " (unfinished)")))
    if st:
        facts += [("code store", st["path"]), ("tokens", f"{st['tokens']:,} in {st['docs']:,} documents"),
                  ("corpus", json.dumps(st.get("corpus"))), ("labels", st.get("labels") or "none")]
    parts.append("<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>")
    if ck and ck.get("codebooks"):
        rows = [[_e(c.get("key")), _e(", ".join(c.get("sites", []))), _num(c.get("num_codes")), _num(c.get("k")),
                 _num(c.get("dim")), _e(c.get("similarity", "cosine"))] for c in ck["codebooks"]]
        parts.append("<h3>Codebooks</h3>" + _table(["module", "sites", "C", "k", "dim", "similarity"], rows))
    res = ((ck or {}).get("training") or {}).get("results") or {}
    if res.get("on") and res.get("bypassed"):
        keys = [k for k in ("loss", "transition_accuracy", "greedy_accuracy", "perplexity") if k in res["on"]]
        rows = [[f"codebooks {label}"] + [_num(res[label].get(k)) for k in keys] for label in ("on", "bypassed")]
        parts.append("<h3>Codebooks on vs bypassed (held-out, at the end of training)</h3>"
                     + _table(["", *[_e(k.replace("_", " ")) for k in keys]], rows, "num"))
    if ck:
        parts.append(_training(ck, data["limits"]["curve_points"]))
    parts.append("</section>")
    return "".join(parts)


def _training(ck: dict[str, Any], points: int) -> str:
    rows = _thin(ck.get("metrics") or [], points)
    if not rows:
        return '<h3>Training curves</h3><p class="note">This checkpoint has no metrics log (metrics.jsonl).</p>'
    steps = [r["step"] for r in rows]
    base = [r["step"] for r in rows if r.get("phase") == "base"]
    switch = max(base) if base and len(base) < len(rows) else None
    charts = [svg_chart([{"name": "train loss", "x": steps, "y": [r.get("loss") for r in rows],
                          "color": PALETTE[0]}], "loss (train batch)", "step", "nats/token", vline=switch)]
    acc = "fsm_valid" if any("fsm_valid" in r for r in rows) else "accuracy"
    charts.append(svg_chart([{"name": acc, "x": steps, "y": [r.get(acc) for r in rows], "color": PALETTE[2]}],
                            "greedy next token valid in the FSM" if acc == "fsm_valid" else "next-token accuracy",
                            "step", "share", ylim=(0.0, 1.0), vline=switch))
    cb = [r for r in rows if r.get("sites")]
    names = list(cb[0]["sites"]) if cb else []
    colors = [_site_color(n, i, len(names)) for i, n in enumerate(names)]
    if cb:
        x = [r["step"] for r in cb]
        charts.append(svg_chart([{"name": n, "x": x, "y": [r["sites"][n].get("mse") for r in cb], "color": c}
                                 for n, c in zip(names, colors, strict=True)],
                                "reconstruction MSE per site", "step", "MSE (sum over dims)", logy=True))
        charts.append(svg_chart([{"name": n, "x": x, "y": [r["sites"][n]["live"] / max(1, r["sites"][n]["live"]
                                                                                         + r["sites"][n]["dead"])
                                                           for r in cb], "color": c}
                                 for n, c in zip(names, colors, strict=True)],
                                "live codes per site (fired since the previous row)", "step", "share", ylim=(0, 1)))
        tps = [r.get("tokens_per_s") for r in rows]
        charts.append(svg_chart([{"name": "tokens/s", "x": steps, "y": tps, "color": PALETTE[7]}],
                                "training speed", "step", "tokens/s", vline=switch))
    note = f'<p class="note">From metrics.jsonl ({len(ck["metrics"])} rows; dotted line: codebooks switched on).</p>'
    return f'<h3>Training curves</h3>{note}<div class="charts">{"".join(charts)}</div>{_legend(names, colors)}'


def _sites(st: dict[str, Any], lim: dict[str, Any]) -> str:
    sites = st["sites"]
    names = [s["site"] for s in sites]
    colors = [_site_color(n, i, len(names)) for i, n in enumerate(names)]
    rows = [[f'<a href="#browser" data-site="{i}">{_e(s["site"])}</a>', _num(s["codes"]), _num(s["k"]),
             _num(s["dead"]), _num(s["rare"]), f"{s['alive_frac']:.1%}", f"{s['entropy_bits']:.2f} / "
             f"{s['max_entropy_bits']:.2f}", _num(round(s["perplexity"]))] for i, s in enumerate(sites)]
    table = _table(["site", "C", "k", "dead", f"rare (&lt; {lim['min_count']} fires)", "alive",
                    "entropy (bits) / max", "perplexity"], rows, "num")
    chart = svg_chart([{"name": s["site"], "x": [p[0] for p in s["curve"]], "y": [p[1] for p in s["curve"]],
                        "color": c} for s, c in zip(sites, colors, strict=True)],
                      "code usage: firings of each code, most used first", "code rank", "tokens fired on",
                      logx=True, logy=True, width=700, height=320)
    small = "".join(
        svg_chart([{"name": s["site"], "x": [p[0] for p in s["curve"]], "y": [p[1] for p in s["curve"]],
                    "color": c}], f"{s['site']}: {s['dead']} dead, {s['rare']} rare, perplexity "
                  f"{s['perplexity']:.0f}", "rank", "fires", logx=True, logy=True, width=300, height=180)
        for s, c in zip(sites, colors, strict=True))
    return ('<section id="sites"><h2>Sites: code usage</h2>'
            f'<p class="note">Over the store\'s {st["tokens"]:,} tokens. Dead: fired on no token; rare: fired on '
            "fewer than --min-count tokens; perplexity = 2^entropy, the effective number of codes in use.</p>"
            + table + chart + _legend(names, colors) + f'<details><summary>one chart per site</summary>'
            f'<div class="charts">{small}</div></details></section>')


def _label_section(st: dict[str, Any]) -> str:
    lt = st.get("label_table")
    if not lt:
        return ""
    is_fsm = any("next" in r for r in lt["rows"])
    head = ["value", "tokens", "best code (F1)", "precision", "recall", "F1", "sites with a code of precision ≥ 0.9"]
    if is_fsm:
        head.append("next states (FSM out-neighbours)")
    rows = []
    for r in lt["rows"]:
        code = (f'<a href="#browser" data-code="{_e(r["code"])}">{_e(r["code"])}</a>' if r.get("code") else "–")
        row = [f'<a href="#browser" data-label="{_e(r["value"])}">{_e(r["value"])}</a>', _num(r["tokens"]), code,
               _num(r.get("precision"), 3), _num(r.get("recall"), 3), _num(r.get("f1"), 3), _num(r["sites_p90"])]
        if is_fsm:
            row.append(_e(" ".join(f"{n:02d}" for n in r.get("next", []))))
        rows.append(row)
    more = f" (the first {lt['shown']} of {lt['values']} values)" if lt["shown"] < lt["values"] else ""
    title = "TokFSM state table" if is_fsm else f"Label table: {_e(lt['name'])}"
    return (f'<section id="labels"><h2>{title}</h2><p class="note">For each value of the labels '
            f"<b>{_e(lt['name'])}</b>{more}: the code with the best F1 over all sites (precision = hits / fires, "
            "recall = hits / tokens with the value), as <code>cbtool find-codes --labels</code> computes it. Click a "
            "value or a code to open it in the code browser.</p>" + _table(head, rows, "num") + "</section>")


def _include(inc: dict[str, Any]) -> str:
    doc, kind = inc["doc"], inc["kind"]
    head = f'<h3>{_e(kind)} <span class="note">{_e(inc["file"])}</span></h3>'
    if kind == "intervene-fsm" and isinstance(doc.get("table"), list):
        cols = ["sites", "patched_sites", "jsd_to_b", "jsd_to_b_vs_none", "jsd_to_a", "first_digit_jsd_to_b",
                "valid_for_b", "valid_for_a", "mean_code_precision"]
        rows = [[_num(r.get(c), 3) for c in cols] for r in doc["table"] if isinstance(r, dict)]
        note = (f"<p class=\"note\">State steering: {_num(doc.get('pairs'))} (a, b) pairs, patch "
                f"{_e(doc.get('patch'))}; JSD in bits between the model's next-state distribution and b's / a's "
                "true one; valid: share of sampled next states that are out-neighbours of b / a.</p>")
        return head + note + _table([_e(c.replace("_", " ")) for c in cols], rows, "num")
    if kind == "explain" and isinstance(doc.get("census"), dict):
        return head + _explain_include(doc)
    if kind == "find-codes" and isinstance(doc.get("rows"), list) and all(
            isinstance(r, dict) and "code" in r for r in doc["rows"]):
        return head + _find_codes_include(doc)
    if kind == "intervene":
        ivs = ", ".join(f"{iv.get('mode')} {iv.get('code')}" for iv in doc.get("interventions") or []
                        if isinstance(iv, dict)) or "--spec rows"
        facts = [("interventions", ivs), ("samples", doc.get("samples")), ("positions", doc.get("positions")),
                 ("changed", f"{doc.get('changed', 0):.1%}" if isinstance(doc.get("changed"), float) else "–")]
        out = head + "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts) + "</dl>"
        if doc.get("regex") is not None:
            rows = []
            for label in ("steered", "baseline"):
                r = doc.get(label) or {}
                ci = r.get("ci95") or [None, None]
                rows.append([label, _num(r.get("matches")), _num(r.get("samples")), _num(r.get("rate"), 3),
                             f"{_num(ci[0], 3)} – {_num(ci[1], 3)}"])
            out += (f"<p>success = generated text matches <code>/{_e(doc['regex'])}/</code>; gain "
                    f"{_num(doc.get('gain'), 3)}</p>" + _table(["", "matches", "samples", "rate", "95% interval"],
                                                              rows, "num"))
        ex = [[_num(r.get("seed")), _e(r.get("prompt")), _e(r.get("steered")), _e(r.get("baseline"))]
              for r in doc.get("examples") or [] if isinstance(r, dict)]
        if ex:
            out += _table(["seed", "prompt", "steered", "baseline (twin)"], ex, "mono")
        return out
    text = strict_json.dumps(doc, indent=1, ensure_ascii=False)
    clipped = text[:20000] + ("\n…" if len(text) > 20000 else "")
    return head + f"<pre>{_e(clipped)}</pre>"


def _share(x: Any) -> str:
    return f"{x:.1%}" if isinstance(x, int | float) and not isinstance(x, bool) else "–"


def _find_codes_include(doc: dict[str, Any]) -> str:
    """The rows of a `cbtool find-codes --json` (codes link to their cards in the browser)."""
    query = " ".join(f"--{k.replace('_', '-')} {doc[k]}" for k in ("regex", "labels", "label", "level", "match_on")
                     if doc.get(k) is not None)
    per_label = any("label" in r for r in doc["rows"])  # label-table mode: one row per label value
    rows = [([_e(r.get("label")), _num(r.get("tokens"))] if per_label else [])
            + [f'<a href="#browser" data-code="{_e(r["code"])}">{_e(r["code"])}</a>', _num(r.get("precision"), 3),
               _num(r.get("recall"), 3), _num(r.get("f1"), 3), _num(r.get("fires")), _num(r.get("hits"))]
            for r in doc["rows"]]
    what = "the best code of each label value" if per_label else (
        f"{_num(doc.get('feature_tokens'))} feature tokens, the {len(rows):,} best codes")
    note = (f'<p class="note">find-codes {_e(query)} on {_e(doc.get("store"))}: {what}. Click a code to open its '
            "card.</p>")
    head = (["value", "tokens"] if per_label else []) + ["code", "precision", "recall", "F1", "fires", "hits"]
    return note + _table(head, rows, "num")


def _explain_include(doc: dict[str, Any]) -> str:
    """The census of a `cbtool explain --json` (its rows are on the code cards) and its recovered automaton."""
    census = doc["census"]
    rows = []
    for site in [*(doc.get("sites") or []), "all"]:
        c = census.get(site)
        if not isinstance(c, dict):
            continue
        fams = ", ".join(f"{f} {n}" for f, n in (c.get("by_family") or {}).items())
        ref = f'<a href="#browser" data-site-name="{_e(site)}">{_e(site)}</a>' if site != "all" else "all"
        rows.append([ref, _num(c.get("live_codes")), _num(c.get("explained")), _share(c.get("explained_share")),
                     _share(c.get("firing_mass_share")), _num(c.get("mean_f1"), 3), _e(fams)])
    note = (f'<p class="note">Census of <code>cbtool explain</code> on {_e(doc.get("store"))} '
            f"({_num(doc.get('tokens'))} tokens): a live code (&ge; {_num(doc.get('min_count'))} fires) is explained "
            f"when its best hypothesis (at most {_num(doc.get('max_set'))} tokens / n-grams) has precision &ge; "
            f"{_num(doc.get('min_precision'))}. Each code card in the browser shows its hypothesis and the "
            "<code>find-codes</code> query that reproduces its numbers; filter the browser by explained / not "
            "explained, or sort it by the hypothesis's F1.</p>")
    out = note + _table(["site", "live codes", "explained", "share", "firing mass", "mean F1", "by family"], rows,
                        "num")
    auto = [a for a in doc.get("automaton") or [] if isinstance(a, dict)]
    if auto:
        cols = ["site", "codes", "kept_code_edges", "states_mapped", "predicted_edges", "edge_precision",
                "edge_recall"]
        out += ("<p>TokFSM automaton recovered from each site's codes, edges scored against the true FSM:</p>"
                + _table([_e(c.replace("_", " ")) for c in cols], [[_num(a.get(c), 3) for c in cols] for a in auto],
                         "num"))
    return out


def _browser(data: dict[str, Any]) -> str:
    st = data["store"]
    lim = data["limits"]
    site_opts = "".join(f'<option value="{i}">{_e(s["site"])}</option>' for i, s in enumerate(st["sites"]))
    label_opts = "".join(f'<option value="{_e(v)}">{_e(v)}</option>' for v in st["label_values"][:5000])
    label_ctl = (f'<label>label {_e(st["labels"])} <select id="label"><option value="">any</option>{label_opts}'
                 "</select></label>")
    if not st["labels"]:
        label_ctl = '<select id="label" hidden><option value=""></option></select>'
    explained = any("e" in c for c in data.get("codes") or [])
    expl_ctl = ('<label>explanation <select id="expl"><option value="">any</option><option value="yes">explained'
                '</option><option value="no">not explained</option></select></label>') if explained else ""
    expl_sort = '<option value="f1">explanation F1</option>' if explained else ""
    similar_note = f" ({_e(st['similar_note'])})" if st.get("similar_note") else ""
    return f"""<section id="browser"><h2>Code browser</h2>
<p class="note">Cards for the {lim['codes_per_site']:,} most used codes of each site that fired; each card keeps its
{lim['top_tokens']} most frequent tokens, {lim['contexts']} contexts spread evenly over its firings
({lim['context']} tokens each side, at most {lim['context_chars']} characters) and its {lim['label_mix']} most
frequent label values (precision for a label is exact for those). Search is a case-insensitive regular expression
(or plain text) over a code's top tokens, contexts and explanation. An open card lists the nearest codes of its
codebook by vector cosine (<code>--similar</code>; click one to open it).{similar_note}</p>
<div class="controls">
<label>site <select id="site"><option value="-1">all</option>{site_opts}</select></label>
<label>search <input id="q" type="search" placeholder="token or regex, e.g. 42|17" autocomplete="off"></label>
{label_ctl}
{expl_ctl}<label>sort <select id="sort"><option value="freq">frequency</option>
<option value="prec">precision for the label</option>{expl_sort}</select></label>
<span id="count" class="note"></span></div>
<div id="codes"></div><button id="more" type="button">show more</button></section>"""


def _asset(name: str) -> str:
    """A file of cbtool/report/assets (package data), as text: the report's stylesheet and script."""
    return files("cbtool.report").joinpath("assets", name).read_text(encoding="utf-8")


CSS = _asset("report.css")
JS = _asset("report.js")


def _json_for_script(data: Any) -> str:
    text = strict_json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


def render(data: dict[str, Any]) -> str:
    """The whole report as one HTML string."""
    st = data.get("store")
    ck = data.get("checkpoint")
    name = (st or {}).get("path") or (ck or {}).get("path") or "cbtool"
    nav = ['<a href="#overview">overview</a>']
    body = [_overview(data)]
    if st:
        nav += ['<a href="#sites">sites</a>', '<a href="#browser">code browser</a>']
        body += [_sites(st, data["limits"]), _browser(data)]
        if st.get("label_table"):
            nav.append('<a href="#labels">labels</a>')
            body.append(_label_section(st))
    else:
        body.append('<section><h2>Codes</h2><p class="note">No code store: run <code>cbtool embed</code> and '
                    "give the store to <code>cbtool report</code> for code usage and the code browser.</p></section>")
    if data["includes"]:
        nav.append('<a href="#included">included results</a>')
        body.append('<section id="included"><h2>Included results</h2>'
                    + "".join(_include(i) for i in data["includes"]) + "</section>")
    payload = {"store": st and {k: st[k] for k in ("tokens", "labels")} | {
        "sites": [{"site": s["site"]} for s in st["sites"]]}, "codes": data.get("codes") or []}
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>cbtool report: {_e(name)}</title><style>{CSS}</style></head>
<body><header><h1>cbtool report: {_e(name)}</h1><nav>{"".join(nav)}</nav></header>
<main>{"".join(body)}</main>
<script type="application/json" id="cbdata">{_json_for_script(payload)}</script>
<script>{JS}</script></body></html>
"""
