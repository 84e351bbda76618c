"""`cbtool report`: the HTML file from real checkpoints and stores (TokFSM and text), its bounds, its escaping,
and the page itself in a real headless Chromium (Debian's package, driven by Playwright; never downloaded)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cbtool.formats.store import Store
from tests.helpers import run_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: threads only contend

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = ('Alpha <script>window.__pwned = 1</script> beta & "gamma" <img src=x onerror="window.__pwned=2"> '
           "delta </script><b>bold</b> <!-- comment --> &amp; \u2028 end.\n")


@pytest.fixture(scope="module")
def fsm_run(tiny_checkpoint_master, tmp_path_factory):
    """The tiny TokFSM checkpoint, a store of it, an fsm-eval and a steering --json, and the report of them."""
    d = tmp_path_factory.mktemp("report")
    store = d / "codes"
    res = run_cli("embed", tiny_checkpoint_master, "--out", store, "--num-seqs", "48", "--device", "cpu")
    assert res.exit_code == 0, res.output
    steer = run_cli("intervene", tiny_checkpoint_master, "--code", "1.mlp:3", "--prompt", "12", "-n", "6", "--regex",
                    "^[1-4]", "--max-new-tokens", "4", "--json", "--device", "cpu")
    assert steer.exit_code == 0, steer.output
    (d / "steer.json").write_text(steer.stdout)
    fsm = run_cli("intervene", tiny_checkpoint_master, "--fsm-eval", "--fsm-mode", "steering", "--pairs", "8",
                  "--code-seqs", "8", "--json", "--device", "cpu")
    assert fsm.exit_code == 0, fsm.output
    (d / "fsm.json").write_text(fsm.stdout)
    out = d / "report.html"
    res = run_cli("report", store, tiny_checkpoint_master, "--out", out, "--include", d / "fsm.json",
                  "--include", d / "steer.json")
    assert res.exit_code == 0, res.output
    return {"dir": d, "store": store, "checkpoint": tiny_checkpoint_master, "html": out}


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A tiny text model trained and embedded on a corpus full of HTML and script."""
    pytest.importorskip("tokenizers", reason="the `text` extra (tokenizers) is not installed")
    d = tmp_path_factory.mktemp("hostile")
    corpus = d / "hostile.txt"
    corpus.write_text(HOSTILE * 60, encoding="utf-8")
    ck, store, out = d / "ck", d / "codes", d / "report.html"
    res = run_cli("train", "--corpus", corpus, "--preset", "tiny", "--base-steps", "10", "--steps", "4",
                  "--sites", "1.mlp", "--out", ck, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert run_cli("embed", ck, "--corpus", corpus, "--out", store, "--device", "cpu").exit_code == 0
    res = run_cli("report", ck, store, "--out", out, "--contexts", "3", "--context", "6")
    assert res.exit_code == 0, res.output
    return {"store": store, "checkpoint": ck, "html": out}


def _data(html: str) -> dict:
    m = re.search(r'<script type="application/json" id="cbdata">(.*?)</script>', html, re.S)
    assert m
    return json.loads(m.group(1))


def test_report_sections_and_bounds(fsm_run):
    html = fsm_run["html"].read_text(encoding="utf-8")
    store = Store(fsm_run["store"])
    for needle in ("Overview", "Training curves", "Sites: code usage", "Code browser", "TokFSM state table",
                   "intervene-fsm", "valid for b", "95% interval", "codebooks on", "codebooks bypassed"):
        assert needle in html, needle
    assert "http://" not in html and "https://" not in html and "src=" not in html  # nothing to fetch
    assert "default-src 'none'" in html
    data = _data(html)
    cards = data["codes"]
    sites = [s["site"] for s in data["store"]["sites"]]
    assert sites == list(store.sites)
    for i, site in enumerate(sites):  # every code that fired gets a card (C=64 < --codes-per-site)
        counts = store.counts(site)
        mine = {c["c"]: c for c in cards if c["s"] == i}
        assert set(mine) == set(np.flatnonzero(counts).tolist())
        for c, card in mine.items():
            assert card["f"] == counts[c] and 1 <= len(card["x"]) <= 4 and sum(t[1] for t in card["t"]) <= card["f"]
    # the label mix of a card is exact: recount one code's states from the store
    card = max(cards, key=lambda c: c["f"])
    site = sites[card["s"]]
    fired = np.concatenate([np.asarray(store.codes(s, site))[:, 0] == card["c"] for s in range(store.num_shards)])
    states = np.concatenate([np.asarray(store.labels(s, "state")) for s in range(store.num_shards)])[fired]
    vals, n = np.unique(states[states >= 0], return_counts=True)
    assert sorted(card["m"], key=lambda m: (-m[1], int(m[0])))[0][1] == n.max()
    assert {int(v): int(k) for v, k in card["m"]}.items() <= dict(zip(vals.tolist(), n.tolist(), strict=True)).items()

    res = run_cli("report", fsm_run["store"], fsm_run["checkpoint"], "--out", fsm_run["dir"] / "small.html",
                  "--codes-per-site", "2", "--contexts", "1")
    assert res.exit_code == 0, res.output
    small = _data((fsm_run["dir"] / "small.html").read_text(encoding="utf-8"))["codes"]
    assert len(small) == 2 * len(sites) and all(len(c["x"]) == 1 for c in small)
    kept = {(c["s"], c["c"]) for c in small}  # each site's most used codes
    assert all(c["f"] >= max(d["f"] for d in cards if d["s"] == c["s"] and (d["s"], d["c"]) not in kept)
               for c in small)


def test_report_defaults_to_the_run_dir_and_store_alone(fsm_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(fsm_run["checkpoint"], run / "checkpoint")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CBTOOL_RUN", str(run))
    res = run_cli("report")  # no store yet: the checkpoint alone
    assert res.exit_code == 0 and (run / "report.html").is_file()
    assert "no code store" in res.stderr and "Training curves" in (run / "report.html").read_text()
    # a store alone: its checkpoint comes from the manifest
    res = run_cli("report", fsm_run["store"], "--out", tmp_path / "s.html")
    assert res.exit_code == 0, res.output
    html = (tmp_path / "s.html").read_text()
    assert "Training curves" in html and fsm_run["checkpoint"].name in html  # found via the manifest's path


def test_report_bad_input_exit_2(fsm_run, tmp_path):
    cases = [
        (("report", tmp_path / "nothing"), "does not exist"),
        (("report", tmp_path), "neither a cbtool checkpoint"),
        (("report", fsm_run["store"], fsm_run["store"]), "two code stores"),
        (("report", fsm_run["store"], fsm_run["checkpoint"], tmp_path), "at most a checkpoint and a store"),
        (("report", fsm_run["store"], "--include", tmp_path / "missing.json"), "does not exist"),
        (("report", fsm_run["store"], "--contexts", "-1"), "--contexts must be >= 0"),
        (("report", fsm_run["store"], "--out", tmp_path), "is a directory"),
    ]
    (tmp_path / "bad.json").write_text("[1, 2")
    cases.append((("report", fsm_run["store"], "--include", tmp_path / "bad.json"), "not valid JSON"))
    for args, msg in cases:
        res = run_cli(*args)
        assert res.exit_code == 2 and msg in res.stderr and "Traceback" not in res.output, (args, res.output)


def test_text_report_escapes_the_corpus(text_run):
    html = text_run["html"].read_text(encoding="utf-8")
    assert html.count("<script") == 2  # the data block and the page's own code; none from the corpus
    assert "<img" not in html and "<b>bold" not in html and "<!-- comment" not in html
    assert "window.__pwned" in html  # the text is there, inert (escaped)
    data = _data(html)
    text = "".join(x[0] + x[1] + x[2] for c in data["codes"] for x in c["x"])
    assert "<script>" in text or "</script>" in text or "<img" in text  # contexts are the raw corpus text
    for c in data["codes"]:
        for left, tok, right, _ in c["x"]:
            assert left + tok + right in HOSTILE * 2  # verbatim slices of the corpus (contexts stay in a doc)


def _browser():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (make setup does, as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the dev extra) is not installed")
    return sync_api.sync_playwright()


def _open(p, html: Path):
    browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: errors.append(f"request {r.url}") if not r.url.startswith("file:") else None)
    page.goto(html.as_uri())
    return browser, page, errors


def test_browser_search_and_code_card_text_store(text_run, tmp_path):
    with _browser() as p:
        browser, page, errors = _open(p, text_run["html"])
        try:
            assert page.evaluate("typeof window.__pwned") == "undefined"
            total = page.locator(".card").count()
            assert total > 0
            page.fill("#q", "script|onerror")
            page.wait_for_function("document.getElementById('count').textContent.includes('match')")
            cards = page.locator(".card")
            assert 0 < cards.count() <= total
            cards.first.locator("button").click()
            body = cards.first.locator(".body")
            body.wait_for()
            contexts = body.locator(".ctx").all_text_contents()
            assert contexts and any(re.search("script|onerror", c, re.I) for c in contexts)
            assert any(c.replace("\u2028", "") in (HOSTILE * 2).replace("\u2028", "") for c in contexts)
            assert body.locator("mark").count() == len(contexts)
            assert cards.first.locator("button").get_attribute("aria-expanded") == "true"
            page.fill("#q", "(")  # not a regex: matched as plain text, no error
            assert "plain text" in page.text_content("#count")
            assert page.evaluate("typeof window.__pwned") == "undefined"
            page.screenshot(path=str(tmp_path / "text-report.png"))
            assert (tmp_path / "text-report.png").stat().st_size > 1000
            assert errors == []
        finally:
            browser.close()


def test_browser_state_table_opens_code_card(fsm_run, tmp_path):
    data = _data(fsm_run["html"].read_text(encoding="utf-8"))
    with _browser() as p:
        browser, page, errors = _open(p, fsm_run["html"])
        try:
            link = page.locator("#labels a[data-code]").first
            code = link.get_attribute("data-code")
            link.click()
            card = page.locator(f'.card.open[data-code="{code}"]')
            card.wait_for()
            site, cid = code.rsplit(":", 1)
            want = next(c for c in data["codes"] if data["store"]["sites"][c["s"]]["site"] == site
                        and c["c"] == int(cid))
            assert card.locator(".ref").text_content() == code
            assert f"{want['f']:,} fires" in card.text_content()
            mix = card.locator(".body table").nth(1).locator("tr").all_text_contents()
            assert len(mix) == len(want["m"]) and mix[0].startswith(want["m"][0][0])
            assert card.locator(".ctx mark").count() == len(want["x"])
            page.select_option("#label", want["m"][0][0])  # label filter: sorted by precision for that label
            precisions = page.locator(".card button .note").all_text_contents()
            values = [float(t.rsplit(" ", 1)[1]) for t in precisions]
            assert values == sorted(values, reverse=True) and values
            page.screenshot(path=str(tmp_path / "fsm-report.png"))
            assert errors == []
        finally:
            browser.close()


@pytest.fixture(scope="module")
def explained_run(fsm_run):
    """`cbtool explain --json --fsm` of the TokFSM store, and the report including it."""
    d = fsm_run["dir"]
    res = run_cli("explain", fsm_run["store"], "--fsm", "--json")
    assert res.exit_code == 0, res.output
    (d / "explain.json").write_text(res.stdout)
    html = d / "explained.html"
    res = run_cli("report", fsm_run["store"], "--out", html, "--include", d / "explain.json")
    assert res.exit_code == 0, res.output
    return {"doc": json.loads(res_stdout := (d / "explain.json").read_text()), "json": d / "explain.json",
            "html": html, "raw": res_stdout}


def test_report_puts_each_explanation_on_its_code_card(explained_run):
    from cbtool.explanations.explainer import shell_query

    doc = explained_run["doc"]
    html = explained_run["html"].read_text(encoding="utf-8")
    data = _data(html)
    sites = [s["site"] for s in data["store"]["sites"]]
    rows = {(r["site"], r["code_id"]): r for r in doc["rows"]}
    with_e = 0
    for c in data["codes"]:
        r = rows.get((sites[c["s"]], c["c"]))
        if r is None or r["family"] is None:
            assert "e" not in c  # no live code, or no hypothesis: nothing claimed
            continue
        with_e += 1
        assert c["e"] == [r["family"], r["hypothesis"], r["precision"], r["recall"], r["f1"], shell_query(r["query"]),
                          r["precision"] >= doc["min_precision"]]
    assert with_e > 10
    # the census table, not a dump of the rows
    start = html.index('<section id="included">')
    section = html[start : html.index("</section>", start)]
    assert "Census of <code>cbtool explain</code>" in section and "edge precision" in section
    for site in [*doc["sites"], "all"]:
        c = doc["census"][site]
        assert f"{c['live_codes']:,}</td><td>{c['explained']:,}</td><td>{c['explained_share']:.1%}" in section
    assert "<pre>" not in section and '"rows"' not in section


def test_report_refuses_an_explain_of_another_store(explained_run, fsm_run, tmp_path):
    doc = explained_run["doc"]
    other = json.loads(explained_run["raw"])
    other["rows"][0]["fires"] += 1  # the same sites and codes, other counts: another store
    (tmp_path / "other.json").write_text(json.dumps(other))
    broken = {**doc, "rows": [{"site": doc["rows"][0]["site"]}]}
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    norows = {k: v for k, v in doc.items() if k != "rows"}
    (tmp_path / "norows.json").write_text(json.dumps(norows))
    for name, msg in (("other", "an explain output of another store"), ("broken", "a row lacks"),
                      ("norows", "not a `cbtool explain --json` output")):
        out = tmp_path / f"{name}.html"
        res = run_cli("report", fsm_run["store"], "--out", out, "--include", tmp_path / f"{name}.json")
        assert res.exit_code == 2 and msg in res.stderr and "Traceback" not in res.output, (name, res.output)
        assert len(res.stderr.strip().splitlines()) == 1 and not out.exists()


def test_browser_filters_and_sorts_by_explanation(explained_run, tmp_path):
    data = _data(explained_run["html"].read_text(encoding="utf-8"))
    by_ref = {f"{data['store']['sites'][c['s']]['site']}:{c['c']}": c for c in data["codes"]}
    with _browser() as p:
        browser, page, errors = _open(p, explained_run["html"])
        try:
            page.select_option("#expl", "no")
            unexplained = sum(1 for c in data["codes"] if not (c.get("e") or [0] * 7)[6])
            assert unexplained and page.text_content("#count").startswith(f"{unexplained:,} of")
            refs = page.locator(".card .ref").all_text_contents()
            assert all(not (by_ref[r].get("e") or [0] * 7)[6] for r in refs)
            assert page.locator(".card .hyp:not(.weak)").count() == 0
            page.select_option("#expl", "yes")
            page.select_option("#sort", "f1")
            refs = page.locator(".card .ref").all_text_contents()
            f1s = [by_ref[r]["e"][4] for r in refs]
            assert refs and all(by_ref[r]["e"][6] for r in refs) and f1s == sorted(f1s, reverse=True)
            want = sum(1 for c in data["codes"] if "e" in c and c["e"][6])
            assert page.text_content("#count").startswith(f"{want:,} of")
            card = page.locator(".card").first
            card.locator("button").click()
            e = by_ref[refs[0]]["e"]
            assert f"cbtool find-codes {e[5]}" in card.locator(".cmd").text_content()
            assert e[1] in card.locator(".expl").text_content()
            page.select_option("#expl", "")
            page.fill("#q", re.escape(e[0] + ": " + e[1]))  # search covers the explanation
            page.wait_for_function("document.getElementById('count').textContent.includes('match')")
            found = page.locator(".card .ref").all_text_contents()
            assert refs[0] in found and all(by_ref[r]["e"][1] == e[1] for r in found)
            site = data["store"]["sites"][1]["site"]
            page.fill("#q", "")
            page.locator(f'#included a[data-site-name="{site}"]').click()  # census row -> that site's cards
            assert page.input_value("#site") == "1"
            assert {r.rsplit(":", 1)[0] for r in page.locator(".card .ref").all_text_contents()} == {site}
            assert errors == []
        finally:
            browser.close()


def test_report_cards_list_nearest_codes_by_cosine(fsm_run, tmp_path):
    data = _data(fsm_run["html"].read_text(encoding="utf-8"))
    sites = [s["site"] for s in data["store"]["sites"]]
    cards = data["codes"]
    assert all(len(c["n"]) == 5 for c in cards)
    for c in cards[:: max(1, len(cards) // 6)]:  # the same neighbours as show-code --similar
        ref = f"{sites[c['s']]}:{c['c']}"
        res = run_cli("show-code", fsm_run["store"], ref, "--similar", "5", "--json")
        assert res.exit_code == 0, res.output
        want = json.loads(res.stdout)["similar"]["cosine"]
        assert [(b, f) for b, _, f in c["n"]] == [(w["code_id"], w["fires"]) for w in want], ref
        assert np.allclose([v for _, v, _ in c["n"]], [w["cosine"] for w in want], atol=1e-4)
    res = run_cli("report", fsm_run["store"], "--similar", "0", "--out", tmp_path / "none.html")
    assert res.exit_code == 0, res.output
    assert all("n" not in c for c in _data((tmp_path / "none.html").read_text())["codes"])
    assert run_cli("report", fsm_run["store"], "--similar", "-1", "--out", tmp_path / "x.html").exit_code == 2


def test_report_without_the_checkpoint_says_why_there_are_no_neighbours(fsm_run, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(fsm_run["checkpoint"], ck)
    res = run_cli("embed", ck, "--out", tmp_path / "codes", "--num-seqs", "8", "--device", "cpu")
    assert res.exit_code == 0, res.output
    shutil.rmtree(ck)  # the store's checkpoint is gone
    res = run_cli("report", tmp_path / "codes", "--out", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "nearest codes by cosine are not shown" in html and "is not available" in html
    assert all("n" not in c for c in _data(html)["codes"])


def test_browser_nearest_code_link_opens_its_card(fsm_run):
    data = _data(fsm_run["html"].read_text(encoding="utf-8"))
    first = max(data["codes"], key=lambda c: (c["f"], -c["s"], -c["c"]))  # the first card shown
    with _browser() as p:
        browser, page, errors = _open(p, fsm_run["html"])
        try:
            card = page.locator(".card").first
            card.locator("button").click()
            site = data["store"]["sites"][first["s"]]["site"]
            carded = {(c["s"], c["c"]) for c in data["codes"]}
            names = card.locator(".near td:first-child").all_text_contents()
            assert names == [f"{site}:{b}" for b, _, _ in first["n"]]
            linked = [f"{site}:{b}" for b, _, _ in first["n"] if (first["s"], b) in carded]
            links = card.locator(".near a")
            assert links.all_text_contents() == linked and linked  # codes without a card are plain text
            target = linked[-1]
            links.last.click()
            page.locator(f'.card.open[data-code="{target}"]').wait_for()
            assert errors == []
        finally:
            browser.close()


def test_report_find_codes_include_is_a_table_linked_to_the_cards(fsm_run, tmp_path):
    res = run_cli("find-codes", fsm_run["store"], "--regex", "^1", "--top", "5", "--json")
    assert res.exit_code == 0, res.output
    (tmp_path / "fc.json").write_text(res.stdout)
    rows = json.loads(res.stdout)["rows"]
    html = tmp_path / "r.html"
    assert run_cli("report", fsm_run["store"], "--out", html, "--include", tmp_path / "fc.json").exit_code == 0
    page_html = html.read_text(encoding="utf-8")
    start = page_html.index('<section id="included">')
    section = page_html[start : page_html.index("</section>", start)]
    assert "find-codes --regex ^1" in section and "<pre>" not in section
    assert re.findall(r'data-code="([^"]+)"', section) == [r["code"] for r in rows]
    with _browser() as p:
        browser, page, errors = _open(p, html)
        try:
            page.locator("#included a[data-code]").first.click()
            page.locator(f'.card.open[data-code="{rows[0]["code"]}"]').wait_for()
            assert errors == []
        finally:
            browser.close()
