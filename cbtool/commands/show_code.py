"""`cbtool show-code`: the contexts a code fires on, with the firing token highlighted (docs/analyse.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from cbtool.analysis.contexts import code_contexts
from cbtool.analysis.similar import similar_codes
from cbtool.commands.common import RUN_OPTION_HELP, emit_json, keep_whole, open_run_store, out
from cbtool.errors import UserError
from cbtool.tasks.fsm_text import group_context


def show_code(
    args: list[str] = typer.Argument(  # noqa: B008
        ...,
        metavar="[STORE] SITE:CODE",
        help="Optional store directory (default RUN/codes), then a code reference such as 1.mlp:412.",
    ),
    run: Path | None = typer.Option(None, "--run", help=RUN_OPTION_HELP),  # noqa: B008
    examples: int = typer.Option(10, "--examples", help="Contexts to show."),
    context: int = typer.Option(8, "--context", help="Tokens of context on each side."),
    similar: int = typer.Option(0, "--similar", help="Also the N nearest codes by vector cosine (same site, from "
                                "the checkpoint) and by firing-set Jaccard (every site)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
) -> None:
    """The contexts a code fires on (firing token highlighted), its firing count, share of tokens,
    and the tokens it fires on most.

    Examples:
      cbtool show-code 1.mlp:412
      cbtool show-code runs/a/codes 0.attn.h2:7 --examples 20 --context 12 --json
      cbtool show-code 0.mlp:412 --similar 5      # nearest codes by cosine and by Jaccard
    """
    if len(args) > 2:
        raise UserError(f"expected [STORE] SITE:CODE, got {len(args)} arguments")
    if examples < 0 or context < 0 or similar < 0:
        raise UserError("--examples, --context and --similar must be >= 0")
    store = open_run_store(Path(args[0]) if len(args) == 2 else None, run)
    res = code_contexts(store, args[-1], examples, context)
    ref = res["code"]
    if similar:
        res["similar"] = similar_codes(store, ref, similar)
    if as_json:
        emit_json("show-code", res)
        return
    out.print(
        f"[bold]{ref}[/] fires on {res['fires']:,} of {store.num_tokens:,} tokens "
        f"({res['share_of_tokens']:.2%})"
    )
    if res["top_tokens"]:
        out.print(
            "most frequent tokens: "
            + ", ".join(f"{escape(repr(t['token']))} x{t['count']:,}" for t in res["top_tokens"])
        )
    if res["examples"]:
        strongest = "activation" in res["examples"][0]  # an SAE store: the strongest firings, strongest first
        table = Table(title=f"contexts of {ref} (firing token \\[highlighted]; ⏎ = a line break"
                            + ("; strongest activations first)" if strongest else ")"))
        table.add_column("doc", justify="right")
        if strongest:
            table.add_column("act", justify="right")
        table.add_column("context")
        for name in store.label_names:
            table.add_column(name, justify="right")
        fsm = (store.manifest.get("corpus") or {}).get("kind") == "tokfsm"
        for ex in res["examples"]:
            left, token, right = (group_context(ex["left"], ex["token"], ex["right"], ex["doc_position"]) if fsm
                                  else (ex["left"], ex["token"], ex["right"]))
            mark = escape("[" + one_line(token) + "]")
            ctx = f"{escape(one_line(left))}[bold reverse]{mark}[/]{escape(one_line(right))}"
            act = [f"{ex['activation']:.3g}"] if strongest else []
            table.add_row(str(ex["doc"]), *act, ctx, *[str(ex[f"label_{n}"]) for n in store.label_names])
        out.print(table)
    if similar:
        _print_similar(ref, res["similar"])


def _print_similar(ref: str, sim: dict[str, Any]) -> None:
    for key, title in (("cosine", "by code-vector cosine (same site)"), ("jaccard", "by firing-set Jaccard")):
        rows = sim[key]
        if rows is None:
            out.print(f"nearest codes {title}: not available ({sim['cosine_unavailable']})")
            continue
        table = Table(title=f"codes nearest {ref} {title}")
        for col in ("code", key, "fires", *(("both",) if key == "jaccard" else ())):
            table.add_column(col, justify="left" if col == "code" else "right")
        for r in rows:
            table.add_row(r["code"], f"{r[key]:.3f}", f"{r['fires']:,}",
                          *((f"{r['both']:,}",) if key == "jaccard" else ()))
        out.print(keep_whole(table, "code"))


def one_line(text: str) -> str:
    """A context on one table row: line breaks shown as ⏎, tabs as spaces."""
    return text.replace("\r\n", "⏎").replace("\n", "⏎").replace("\r", "⏎").replace("\t", " ")


def register(app: typer.Typer) -> None:
    app.command("show-code")(show_code)
