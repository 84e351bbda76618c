
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("cbdata").textContent);
  var S = D.store, C = D.codes || [];
  var $ = function (id) { return document.getElementById(id); };
  var state = {site: -1, re: null, label: "", sort: "freq", expl: "", shown: 40};
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function ref(c) { return S.sites[c.s].site + ":" + c.c; }
  function haystack(c) {
    if (c._h === undefined) {
      var parts = c.t.map(function (t) { return t[0]; });
      c.x.forEach(function (x) { parts.push(x[0] + x[1] + x[2]); });
      if (c.e) parts.push(c.e[0] + ": " + c.e[1]);
      c._h = parts.join("\n");
    }
    return c._h;
  }
  function labelCount(c, v) {
    for (var i = 0; i < c.m.length; i++) if (c.m[i][0] === v) return c.m[i][1];
    return 0;
  }
  function precision(c) {
    if (state.label) return labelCount(c, state.label) / c.f;
    return c.m.length ? c.m[0][1] / c.f : 0;
  }
  var carded = null;
  function hasCard(site, code) {
    if (carded === null) { carded = {}; C.forEach(function (x) { carded[x.s + ":" + x.c] = true; }); }
    return carded[site + ":" + code] === true;
  }
  function f1(c) { return c.e ? c.e[4] : -1; }
  function matches() {
    var out = C.filter(function (c) {
      if (state.site >= 0 && c.s !== state.site) return false;
      if (state.label && !labelCount(c, state.label)) return false;
      if (state.re && !state.re.test(haystack(c))) return false;
      if (state.expl && (state.expl === "yes") !== Boolean(c.e && c.e[6])) return false;
      return true;
    });
    if (state.sort === "f1") out.sort(function (a, b) { return f1(b) - f1(a) || b.f - a.f; });
    else if (state.sort === "prec") out.sort(function (a, b) { return precision(b) - precision(a) || b.f - a.f; });
    else out.sort(function (a, b) { return b.f - a.f || a.s - b.s || a.c - b.c; });
    return out;
  }
  function details(c) {
    var body = el("div", "body"), ctx = el("div"), side = el("div");
    body.appendChild(ctx); body.appendChild(side);
    ctx.appendChild(el("h4", null, "contexts (firing token highlighted)"));
    c.x.forEach(function (x) {
      var line = el("div", "ctx");
      line.appendChild(document.createTextNode(x[0]));
      line.appendChild(el("mark", null, x[1]));
      line.appendChild(document.createTextNode(x[2]));
      if (x[3] !== null) line.appendChild(el("span", "lab", S.labels + " " + x[3]));
      ctx.appendChild(line);
    });
    if (c.e) {
      ctx.appendChild(el("h4", null, "explanation (cbtool explain)" + (c.e[6] ? "" : ": below its --min-precision")));
      var ex = el("p", "expl");
      if (c.e[1].indexOf(c.e[0] + " ") !== 0) ex.appendChild(el("b", null, c.e[0] + ": "));
      ex.appendChild(document.createTextNode(c.e[1] + " \u2014 precision " + c.e[2].toFixed(3) + ", recall " +
        c.e[3].toFixed(3) + ", F1 " + c.e[4].toFixed(3)));
      ctx.appendChild(ex);
    }
    var cmd = el("p", "note cmd");
    cmd.appendChild(el("code", null, "cbtool show-code " + ref(c)));
    if (c.e) cmd.appendChild(el("code", null, "cbtool find-codes " + c.e[5]));
    cmd.appendChild(el("code", null, "cbtool intervene --code " + ref(c)));
    ctx.appendChild(cmd);
    side.appendChild(el("h4", null, "top tokens"));
    var tt = el("table", "num");
    c.t.forEach(function (t) {
      var tr = el("tr"); var td = el("td"); td.appendChild(el("span", "chip", t[0])); tr.appendChild(td);
      tr.appendChild(el("td", null, t[1].toLocaleString() + " (" + (100 * t[1] / c.f).toFixed(1) + "%)"));
      tt.appendChild(tr);
    });
    side.appendChild(tt);
    if (c.m.length) {
      side.appendChild(el("h4", null, "label mix: " + S.labels + " (precision)"));
      var mt = el("table", "num");
      c.m.forEach(function (m) {
        var tr = el("tr"); tr.appendChild(el("td", null, m[0]));
        var td = el("td"); var bar = el("span", "bar"); bar.style.width = Math.round(120 * m[1] / c.f) + "px";
        td.appendChild(bar); td.appendChild(document.createTextNode((100 * m[1] / c.f).toFixed(1) + "% (" +
          m[1].toLocaleString() + ")"));
        tr.appendChild(td); mt.appendChild(tr);
      });
      side.appendChild(mt);
    }
    if (c.n && c.n.length) {
      side.appendChild(el("h4", null, "nearest codes (vector cosine)"));
      var nt = el("table", "num near");
      c.n.forEach(function (nb) {
        var tr = el("tr"), td = el("td"), name = S.sites[c.s].site + ":" + nb[0];
        if (hasCard(c.s, nb[0])) {
          var a = el("a", null, name); a.href = "#browser"; a.dataset.code = name; td.appendChild(a);
        } else td.appendChild(el("span", null, name));
        tr.appendChild(td); tr.appendChild(el("td", null, nb[1].toFixed(3)));
        tr.appendChild(el("td", "note", nb[2].toLocaleString() + " fires")); nt.appendChild(tr);
      });
      side.appendChild(nt);
    }
    return body;
  }
  function card(c) {
    var box = el("div", "card");
    box.dataset.code = ref(c);
    var head = el("button");
    head.type = "button";
    head.setAttribute("aria-expanded", "false");
    head.appendChild(el("span", "ref", ref(c)));
    head.appendChild(el("span", null, c.f.toLocaleString() + " fires (" + (100 * c.f / S.tokens).toFixed(2) + "%)"));
    var chips = el("span");
    c.t.slice(0, 3).forEach(function (t) { chips.appendChild(el("span", "chip", t[0])); });
    head.appendChild(chips);
    if (c.e) {
      var hyp = c.e[1].length > 60 ? c.e[1].slice(0, 59) + "\u2026" : c.e[1];
      head.appendChild(el("span", c.e[6] ? "hyp" : "hyp weak", hyp + " (F1 " + c.e[4].toFixed(2) + ")"));
    }
    if (c.m.length) {
      var v = state.label || c.m[0][0];
      head.appendChild(el("span", "note", S.labels + " " + v + ": precision " + precision(c).toFixed(3)));
    }
    head.addEventListener("click", function () {
      var open = box.classList.toggle("open");
      head.setAttribute("aria-expanded", String(open));
      if (open) box.appendChild(details(c)); else box.removeChild(box.lastChild);
    });
    box.appendChild(head);
    return box;
  }
  function render() {
    var list = matches(), root = $("codes");
    root.textContent = "";
    list.slice(0, state.shown).forEach(function (c) { root.appendChild(card(c)); });
    $("count").textContent = list.length.toLocaleString() + " of " + C.length.toLocaleString() +
      " codes match" + (list.length > state.shown ? ", showing " + state.shown : "") + (state.note || "");
    $("more").hidden = list.length <= state.shown;
    return list;
  }
  function setQuery(q) {
    state.note = "";
    if (!q) { state.re = null; return; }
    try { state.re = new RegExp(q, "i"); }
    catch (err) {
      state.re = new RegExp(q.replace(/[.*+?^${}()|[\]\\]/g, "\\$&"), "i");
      state.note = " (not a valid regular expression: matched as plain text)";
    }
  }
  function openCode(code) {
    var i = code.lastIndexOf(":"), site = code.slice(0, i), id = Number(code.slice(i + 1));
    state.site = S.sites.findIndex(function (s) { return s.site === site; });
    $("site").value = String(state.site); $("q").value = ""; setQuery(""); state.label = ""; $("label").value = "";
    var list = matches(), at = list.findIndex(function (c) { return c.c === id; });
    state.shown = Math.max(40, at + 1);
    render();
    var box = document.querySelector('.card[data-code="' + CSS.escape(code) + '"]');
    if (box) { box.firstChild.click(); box.scrollIntoView({block: "center"}); }
    else $("count").textContent += " (" + code + " has no card: see the limits above)";
  }
  if (!S) return;
  $("site").addEventListener("change", function (e) {
    state.site = Number(e.target.value); state.shown = 40; render();
  });
  $("q").addEventListener("input", function (e) { setQuery(e.target.value.trim()); state.shown = 40; render(); });
  $("label").addEventListener("change", function (e) {
    state.label = e.target.value; if (state.label) { state.sort = "prec"; $("sort").value = "prec"; }
    state.shown = 40; render();
  });
  $("sort").addEventListener("change", function (e) { state.sort = e.target.value; render(); });
  if ($("expl")) $("expl").addEventListener("change", function (e) { state.expl = e.target.value; state.shown = 40;
    render(); });
  $("more").addEventListener("click", function () { state.shown += 80; render(); });
  document.addEventListener("click", function (e) {
    var a = e.target.closest("a[data-code],a[data-label],a[data-site],a[data-site-name]");
    if (!a) return;
    if (a.dataset.code) { e.preventDefault(); openCode(a.dataset.code); $("browser").scrollIntoView(); }
    else if (a.dataset.label !== undefined) {
      state.label = a.dataset.label; $("label").value = state.label; state.sort = "prec"; $("sort").value = "prec";
      state.site = -1; $("site").value = "-1"; state.shown = 40; render();
    } else if (a.dataset.siteName !== undefined) {
      state.site = S.sites.findIndex(function (s) { return s.site === a.dataset.siteName; });
      $("site").value = String(state.site); state.shown = 40; render(); $("browser").scrollIntoView();
    } else { state.site = Number(a.dataset.site); $("site").value = a.dataset.site; state.shown = 40; render(); }
  });
  render();
})();
