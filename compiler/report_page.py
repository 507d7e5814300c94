"""The build report as one HTML page: inline CSS, inline SVG, no script, no network.

A Content-Security-Policy in the page itself forbids every fetch and every script, so the file
is safe to open whatever text the data holds; and every piece of text is escaped all the same.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from . import report_svg as svg
from .plan import Lengths, StagePlan, TaskCounts
from .report_data import Build, Document, Row, Run

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; base-uri 'none'; form-action 'none'"
_VISIBLE = {"\n": "↵", "\t": "→", "\r": "␍"}


def e(text: object) -> str:
    return escape(str(text), quote=True)


def render(build: Build, version: str) -> str:
    plan = build.plan
    parts = [_head(f"tunec report: {plan.recipe.file}"), "<body><main>", _header(build, version), _toc(build),
             _lint(build)]
    for sp in plan.stages:
        parts.append(_stage(build, sp))
    parts.append("</main></body></html>\n")
    return "".join(parts)


def _head(title: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{e(title)}</title><style>{STYLE}</style></head>")


def _header(build: Build, version: str) -> str:
    plan = build.plan
    tok = plan.tokenizer
    overrides = (f"<dt>overrides</dt><dd>{e(' '.join(plan.recipe.overrides))}</dd>" if plan.recipe.overrides else "")
    versions = ", ".join(f"{k} {v}" for k, v in sorted(plan.versions.items()))
    return (f'<header><h1>Build report <span class="muted">{e(plan.recipe.file)}</span></h1>'
            f'<dl class="facts"><dt>recipe hash</dt><dd><code>{e(plan.recipe.hash[:16])}</code></dd>'
            f"<dt>seq_len</dt><dd>{plan.seq_len:,}</dd><dt>seed</dt><dd>{plan.seed}</dd>"
            f"<dt>tokenizer</dt><dd>vocab {tok.vocab_size:,}, eos {tok.eos_id}, pad {tok.pad_id}</dd>"
            f"<dt>stages</dt><dd>{len(plan.stages)}</dd>{overrides}"
            f"<dt>versions</dt><dd>{e(versions)}</dd><dt>report by</dt><dd>tunec {e(version)}</dd></dl>"
            f'<p class="muted">Every number here is counted from the compiled build: <code>plan.json</code>, '
            f"the packed shards and, where training ran, <code>runs/</code>.</p></header>")


def _toc(build: Build) -> str:
    items = ['<li><a href="#lint">Prompt lint</a></li>']
    for sp in build.plan.stages:
        a = _anchor(sp.name)
        items.append(f'<li><a href="#{a}">Stage {e(sp.name)}</a><ul>'
                     + "".join(f'<li><a href="#{a}-{k}">{label}</a></li>' for k, label in _SECTIONS) + "</ul></li>")
    return f'<nav><h2>Contents</h2><ul>{"".join(items)}</ul></nav>'


_SECTIONS = (("packing", "Packing"), ("estimate", "Cost estimate"), ("mixture", "Mixture"),
             ("lengths", "Token lengths"), ("audit", "Mask audit"), ("eval", "Eval sets"),
             ("training", "Training and evaluation"), ("rows", "Packed rows"))


def _anchor(name: str) -> str:
    return "stage-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _lint(build: Build) -> str:
    head = '<section id="lint"><h2>Prompt lint</h2>'
    if build.lint is None:
        return head + '<p class="none">not computed: this plan has no lint findings (<code>lint</code>).</p></section>'
    if not build.lint:
        return head + '<p class="ok">No findings.</p></section>'
    cols = ["id", "message", "location", "task", "template"]
    extra = sorted({k for f in build.lint if isinstance(f, dict) for k in f} - set(cols))
    rows = []
    for f in build.lint:
        f = f if isinstance(f, dict) else {"message": f}
        rows.append([_cell(f.get(c)) for c in cols + extra])
    return (head + f'<p>{len(build.lint)} finding(s).</p>'
            + _table(cols + extra, rows, cls="lint", raw=True) + "</section>")


def _cell(v: Any) -> str:
    if v is None:
        return '<span class="muted">-</span>'
    if isinstance(v, (dict, list)):
        return f"<code>{e(json.dumps(v, ensure_ascii=False, sort_keys=True))}</code>"
    return e(v)


def _table(head: list[str], rows: list[list[Any]], cls: str = "", raw: bool = False, nums: bool = True) -> str:
    """A table; cells are escaped unless ``raw`` (then they are HTML already). Numbers align right."""
    th = "".join(f"<th>{e(h)}</th>" for h in head)
    body = []
    for r in rows:
        cells = []
        for i, v in enumerate(r):
            num = nums and i > 0 and isinstance(v, (int, float)) and not isinstance(v, bool)
            text = v if raw and isinstance(v, str) else e(_fmt(v))
            cells.append(f'<td class="num">{text}</td>' if num else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:.3e}"
    return "-" if v is None else str(v)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _stage(build: Build, sp: StagePlan) -> str:
    a = _anchor(sp.name)
    s = sp.settings
    where = next((str(getattr(s.model, k)) for k in ("id", "stage", "path") if getattr(s.model, k, None)), "")
    model = f"{s.model.kind} {where}".strip()
    peft = "full fine-tuning" if s.peft.kind == "none" else f"{s.peft.kind}"
    return (f'<section class="stage" id="{a}"><h2>Stage {e(sp.name)} '
            f'<span class="tag">{e(s.objective.kind)}</span></h2>'
            f'<p class="muted">tasks {e(", ".join(s.tasks))}; model {e(model)}; {e(peft)}; '
            f"lr {s.lr:g}; {s.batch_tokens:,} tokens per step</p>"
            + _packing(a, sp) + _estimate(build, a, sp) + _mixture(a, sp) + _lengths(a, sp, build.plan.seq_len)
            + _audit(a, sp) + _evalsets(a, sp) + _training(a, sp, build.runs.get(sp.name))
            + _rows(a, sp, build.samples.get(sp.name)) + "</section>")


def _packing(a: str, sp: StagePlan) -> str:
    t = sp.train
    cap = t.rows * t.seq_len
    pad = cap - t.tokens
    cards = [("rows", f"{t.rows:,}"), ("tokens", f"{t.tokens:,}"), ("trained tokens", f"{t.trained_tokens:,}"),
             ("padding tokens", f"{pad:,}"), ("fill rate", _pct(t.fill_rate)),
             ("trained / tokens", _pct(t.trained_tokens / t.tokens if t.tokens else None)),
             ("shards", f"{len(t.shards):,}")]
    html = "".join(f'<div class="card"><div class="k">{e(k)}</div><div class="v" data-stat="{e(k)}">{v}</div></div>'
                   for k, v in cards)
    return (f'<h3 id="{a}-packing">Packing</h3><div class="cards">{html}</div>'
            + svg.meter(t.fill_rate, f"fill rate {t.fill_rate:.1%}: {t.tokens:,} of {cap:,} token slots hold "
                        f"documents, {pad:,} are padding", width=420)
            + f'<p class="muted small">{t.rows:,} rows × {t.seq_len:,} tokens = {cap:,} slots.</p>')


def _estimate(build: Build, a: str, sp: StagePlan) -> str:
    head = f'<h3 id="{a}-estimate">Cost estimate</h3>'
    est = build.estimates.get(sp.name)
    if est is None:
        return head + '<p class="none">not computed: this plan has no estimate for the stage.</p>'
    if not isinstance(est, dict):
        est = {"value": est}
    groups: dict[str, list[list[Any]]] = {}
    for k, v in _flatten(est):  # one small table per kind of quantity (flops, memory, params, seconds...)
        groups.setdefault(k.split(".")[0].split("_")[0], []).append([k, _quantity(k, v)])
    single = [rows[0] for rows in groups.values() if len(rows) == 1]
    kept = [rows for rows in groups.values() if len(rows) > 1] + ([single] if single else [])
    tables = "".join(_table(["quantity", "value"], rows, cls="estimate", nums=False) for rows in kept)
    return (head + f'<div class="row-of-tables">{tables}</div>'
            + '<p class="muted small">As <code>plan.json</code> gives them (docs/build-format.md, "Estimates"); '
              "memory in bytes shown in MiB or GiB, times in seconds, minutes or hours.</p>")


def _quantity(key: str, v: Any) -> str:
    """An estimate's value for reading: bytes as GiB, seconds as hours or minutes, FLOPs in powers of ten."""
    name = key.rsplit(".", 1)[-1]
    if v is None:
        return "unknown"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return _fmt(v)
    if name.startswith("memory") or name.endswith("_bytes"):
        return f"{v / 2**30:,.2f} GiB ({v:,.0f} bytes)" if v >= 2**30 else f"{v / 2**20:,.1f} MiB ({v:,.0f} bytes)"
    if name.startswith("seconds") or name.endswith("_s"):
        if v >= 3600:
            return f"{v / 3600:,.2f} h ({v:,.0f} s)"
        return f"{v / 60:,.1f} min ({v:,.1f} s)" if v >= 60 else f"{v:.3g} s"
    if name.startswith("flops"):
        return f"{v:.3e}"
    if name in ("mfu",) or name.endswith("_share"):
        return f"{v:.1%}"
    return _fmt(v)


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        out = []
        for k in sorted(value):
            out += _flatten(value[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list):
        return [(prefix, json.dumps(value, ensure_ascii=False))]
    return [(prefix or "value", value)]


def _mixture(a: str, sp: StagePlan) -> str:
    budget = sp.settings.budget
    unit = "tokens" if budget is not None and budget.kind == "tokens" else "examples"
    chart = svg.paired_bars([(t, c.requested_share, c.trained_share) for t, c in sp.tasks.items()],
                            (f"requested (share of {unit})", "trained (share of trained tokens)"),
                            "Mixture: requested versus trained shares")
    head = ["task", "examples", "tokens", "trained tokens", "% trained tokens", f"% {unit} asked", "few-shot",
            "truncated", "dropped", "boundary merges"]
    rows = [[t, c.examples, c.tokens, c.trained_tokens, _pct(c.trained_share), _pct(c.requested_share), c.fewshot,
             c.truncated, c.dropped, c.boundary_merges] for t, c in sp.tasks.items()]
    templates = []
    for t, c in sp.tasks.items():
        for name, n in c.templates.items():
            templates.append([t, name, n, c.skipped.get(name, 0)])
    return (f'<h3 id="{a}-mixture">Mixture</h3>' + chart
            + _table(head, rows, cls="tasks")
            + f'<p class="muted small">% trained tokens: the task\'s share of the stage\'s trained tokens after '
              f"packing; % {unit} asked: the share the mixture asked for.</p>"
            + "<h4>Templates per task</h4>"
            + _table(["task", "template", "documents", "rows skipped"], templates, cls="templates"))


def _lengths(a: str, sp: StagePlan, seq_len: int) -> str:
    out = [f'<h3 id="{a}-lengths">Token lengths</h3>',
           '<p class="muted small">Documents per length bin, as packed (after truncation); the dashed line is '
           "seq_len. Prompt: the tokens no <code>sft</code> loss is taken on; completion: the labelled tokens "
           "(completion or assistant turns, and the EOS).</p>"]
    for t, c in sp.tasks.items():
        out.append(_length_block(t, c, seq_len, "train"))
    return "".join(out)


def _length_block(task: str, c: TaskCounts, seq_len: int, part: str) -> str:
    note = (f"{c.examples:,} documents, mean {c.tokens / c.examples:,.1f} tokens" if c.examples else "no documents")
    note += f"; truncated {c.truncated:,}, dropped {c.dropped:,}"
    if c.lengths is None:
        charts = '<p class="none">not in this build: compiled by a tunec without length histograms.</p>'
    else:
        charts = _hists(c.lengths, seq_len)
    return (f'<div class="lengths" data-task="{e(task)}" data-part="{part}"><h4>{e(task)} '
            f'<span class="muted small">{e(note)}</span></h4>{charts}</div>')


def _hists(lengths: Lengths, seq_len: int) -> str:
    return '<div class="row-of-charts">' + "".join(
        svg.histogram(getattr(lengths, k), lengths.bin_width, seq_len, k, color=svg.PALETTE[i])
        for i, k in enumerate(("prompt", "completion", "document"))) + "</div>"


def _audit(a: str, sp: StagePlan) -> str:
    failed = {t: c.audit_failures for t, c in sp.tasks.items() if c.audit_failures}
    failed.update({f"{t} (eval)": ev.counts.audit_failures for t, ev in sp.eval.items() if ev.counts.audit_failures})
    what = ("each trained span decodes to its completion (or assistant turn) and the EOS, and nothing else")
    if failed:
        verdict = (f'<p class="warn" data-audit="failed">{sum(failed.values()):,} document(s) failed the audit and '
                   f"were kept (<code>audit: warn</code>): {e(', '.join(f'{t} {n:,}' for t, n in failed.items()))}. "
                   f"Their trained tokens are not what the template says; check {what}.</p>")
    else:
        verdict = f'<p class="ok" data-audit="passed">Passed for every document at compile: {what}.</p>'
    rows = []
    for t, c in sp.tasks.items():
        merges = c.boundary_merges / c.examples if c.examples else 0.0
        rows.append([t, c.examples, c.audit_failures, c.boundary_merges, _pct(merges), c.dropped, c.truncated])
    return (f'<h3 id="{a}-audit">Mask audit</h3>' + verdict
            + _table(["task", "documents", "audit failures", "boundary merges", "share merged",
                      "dropped (incl. nothing to train)", "truncated"], rows, cls="audit")
            + '<p class="muted small">A boundary merge is a first trained token that also holds prompt '
              "characters; end prompts without a trailing space to avoid them.</p>")


def _evalsets(a: str, sp: StagePlan) -> str:
    head = f'<h3 id="{a}-eval">Eval sets</h3>'
    if not sp.eval:
        return head + '<p class="none">none: no task of this stage has an eval part.</p>'
    rows = [[t, "held-out" if ev.held_out else "eval", ev.counts.examples, ev.data.rows, ev.counts.tokens,
             ev.counts.trained_tokens, ev.counts.truncated, ev.counts.dropped,
             ev.choices.count if ev.choices else "-"] for t, ev in sp.eval.items()]
    out = [head, _table(["task", "kind", "examples", "rows", "tokens", "trained tokens", "truncated", "dropped",
                         "with answer choices"], rows, cls="evalsets")]
    if sp.leakage:
        leak = [[t, r.examples, r.leaked, ", ".join(f"{k} {v}" for k, v in r.by_task.items()),
                 ", ".join(f"{k} {v}" for k, v in r.by_kind.items())] for t, r in sp.leakage.items()]
        out.append('<p class="warn">Eval examples that also appear in training:</p>'
                   + _table(["eval task", "examples", "leaked", "found in", "kind"], leak, cls="leakage"))
    out.append("<details><summary>Eval token lengths</summary>"
               + "".join(_length_block(t, ev.counts, sp.train.seq_len, "eval") for t, ev in sp.eval.items())
               + "</details>")
    return "".join(out)


def _training(a: str, sp: StagePlan, run: Run | None) -> str:
    head = f'<h3 id="{a}-training">Training and evaluation</h3>'
    if run is None or run.empty:
        return head + f'<p class="none">not run: <code>runs/{e(sp.name)}/</code> holds no metrics yet.</p>'
    out = [head]
    if run.result:
        r = run.result
        out.append(f'<p>Finished: {_fmt(r.get("steps"))} steps, {_fmt(r.get("tokens"))} tokens, final train loss '
                   f'{_fmt(r.get("train_loss"))}, {_fmt(r.get("wall_s"))} s.</p>')
    else:
        out.append('<p class="warn">Not finished: no <code>result.json</code> (running, interrupted or failed).</p>')
    if run.train or run.eval:
        series = [("train", run.train, False)] if run.train else []
        series += [(f"eval {t}", pts, True) for t, pts in sorted(run.eval.items(), key=lambda kv: kv[0] != "all")]
        out.append(svg.lines(series, "Loss", "step", "loss"))
    if run.skipped_lines:
        out.append('<p class="muted small">The last line of metrics.jsonl is unfinished (a run is writing it) '
                   "and is not shown.</p>")
    last = {t: pts[-1] for t, pts in run.eval.items() if pts}
    if last:
        out.append("<h4>Eval loss (last evaluation)</h4>"
                   + _table(["task", "step", "loss"], [[t, s, v] for t, (s, v) in sorted(last.items())],
                            cls="evalloss"))
    out.append(_accuracy(run.accuracy))
    return "".join(out)


def _accuracy(acc: dict[str, Any] | None) -> str:
    if not acc:
        return ('<h4>Accuracy</h4><p class="none">not evaluated: no <code>eval.json</code> '
                "(<code>tunec eval</code> writes it).</p>")
    out = ["<h4>Accuracy</h4>"]
    for which in ("base", "stage"):
        part = acc.get(which)
        if not isinstance(part, dict):
            continue
        tasks: dict = part["tasks"] if isinstance(part.get("tasks"), dict) else {}
        rows = [[t, m.get("group"), m.get("n"), m.get("chance"), m.get("majority"), m.get("acc"), m.get("acc_norm")]
                for t, m in tasks.items() if isinstance(m, dict)]
        groups: dict = part["groups"] if isinstance(part.get("groups"), dict) else {}
        rows += [[f"mean of {m.get('tasks', '?')} task(s)", g, None, m.get("chance"), m.get("majority"),
                  m.get("acc"), m.get("acc_norm")] for g, m in groups.items() if isinstance(m, dict)]
        out.append(f'<p class="muted">{e(which)} model: {e(part.get("model", "?"))}'
                   + (f', first {part["limit"]} records per task' if part.get("limit") else "") + "</p>")
        out.append(_table(["task", "group", "n (scored)", "chance", "majority", "acc", "acc_norm"], rows,
                          cls=f"accuracy {which}"))
    return "".join(out)


def _rows(a: str, sp: StagePlan, rows: list[Row] | None) -> str:
    head = f'<h3 id="{a}-rows">Packed rows</h3>'
    if not rows:
        why = "no rows in the stage" if rows is not None else "not sampled (--rows 0)"
        return head + f'<p class="none">{why}.</p>'
    legend = ('<p class="legend"><b>trained</b> <i>not trained</i> '
              '<span class="doc-mark">│</span> document boundary <span class="pad">padding</span> '
              '<span class="muted small">↵ newline, → tab, ␣ shown as space; hover a token for its id</span></p>')
    out = [head, f'<p class="muted">{len(rows)} of {sp.train.rows:,} rows, drawn by seed.</p>', legend]
    for r in rows:
        docs = [d for d in r.documents if d.tokens is not None]
        trained = sum(len(t.ids) for d in docs for t in (d.tokens or []) if t.trained)
        out.append(f'<div class="packed" data-row="{r.number}"><div class="meta">row {r.number:,} '
                   f'<span class="muted">({e(r.shard)}, row {r.index}): {len(docs)} documents, '
                   f"{sum(d.length for d in docs):,} tokens, {trained:,} trained</span></div>"
                   f'<div class="text">{"".join(_doc(d) for d in r.documents)}</div></div>')
    return "".join(out)


def _doc(d: Document) -> str:
    if d.tokens is None:
        return f'<span class="pad" data-pad="{d.length}">[{d.length:,} pad]</span>'
    # <b> a trained token, <i> another (styled, not bold or italic): the shortest markup, since a row of
    # thousands of tokens is most of the page
    toks = "".join(f'<{"b" if t.trained else "i"} title="{" ".join(map(str, t.ids))}">{_visible(t.text)}'
                   f'</{"b" if t.trained else "i"}>' for t in d.tokens)
    return f'<span class="doc" data-length="{d.length}">{toks}</span>'


def _visible(text: str) -> str:
    """Token text, escaped, with newlines and tabs as visible marks and other control characters as codes."""
    out = []
    for ch in text:
        if ch in _VISIBLE:
            out.append(f'<span class="ws">{_VISIBLE[ch]}</span>')
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f'<span class="ws">\\x{ord(ch):02x}</span>')
        else:
            out.append(escape(ch, quote=True))
    return "".join(out) or '<span class="ws">∅</span>'


STYLE = """
:root{--fg:#1f2328;--muted:#656d76;--line:#d0d7de;--bg:#fff;--soft:#f6f8fa;--accent:#0072b2}
*{box-sizing:border-box}
body{margin:0;background:var(--soft);color:var(--fg);font:14px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif}
main{max-width:1180px;margin:0 auto;padding:24px}
header,nav,section{background:var(--bg);border:1px solid var(--line);border-radius:8px;padding:16px 20px;
margin-bottom:16px}
h1{font-size:22px;margin:0 0 8px}h2{font-size:18px;margin:0 0 8px}h3{font-size:15px;margin:22px 0 8px;
border-bottom:1px solid var(--line);padding-bottom:4px}h4{font-size:13px;margin:14px 0 6px}
.muted{color:var(--muted);font-weight:normal}.small{font-size:12px}
.tag{font-size:12px;background:#ddf4ff;color:#0969da;border-radius:10px;padding:1px 8px;vertical-align:middle}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:8px 0}dl.facts dt{color:var(--muted)}
dl.facts dd{margin:0}
nav ul{margin:4px 0;padding-left:18px}nav>ul>li{margin-bottom:4px}nav ul ul{display:flex;flex-wrap:wrap;gap:0 14px;
padding-left:0;list-style:none;font-size:12px}
a{color:#0969da;text-decoration:none}a:hover{text-decoration:underline}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:var(--soft);padding:0 3px;
border-radius:3px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}th,td{border:1px solid var(--line);padding:3px 8px;
text-align:left;vertical-align:top}th{background:var(--soft);font-weight:600}td.num{text-align:right;
font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:8px;margin:8px 0}.card{border:1px solid var(--line);border-radius:6px;
padding:6px 12px;min-width:120px}.card .k{font-size:12px;color:var(--muted)}.card .v{font-size:18px;
font-weight:600;font-variant-numeric:tabular-nums}
.chart{max-width:100%;height:auto;display:block;margin:6px 0}.row-of-charts{display:flex;flex-wrap:wrap;gap:10px}
.row-of-tables{display:flex;flex-wrap:wrap;gap:0 14px;align-items:flex-start}
.row-of-charts .chart{border:1px solid #eef0f2;border-radius:4px}
.none{color:var(--muted);font-style:italic}.ok{color:#1a7f37}.warn{color:#9a6700;font-weight:600}
details{margin:8px 0}summary{cursor:pointer;color:#0969da}
.packed{border:1px solid var(--line);border-radius:6px;margin:8px 0;overflow:hidden}
.packed .meta{background:var(--soft);padding:3px 8px;font-size:12px;border-bottom:1px solid var(--line)}
.packed .text{padding:6px 8px;font:12px/1.9 ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;
white-space:pre-wrap;overflow-wrap:anywhere}
.doc{border-left:3px solid #cc79a7;padding-left:2px;margin-left:2px}
.doc-mark{color:#cc79a7;font-weight:700}
.text i,.text b,.legend i,.legend b{font-style:normal;font-weight:normal;border-right:1px solid #e3e6ea;padding:1px 0}
.text b,.legend b{background:#d1f0d9;color:#0b4f22;font-weight:600;
border-right-color:#a6dcb5}
.ws{color:#8c959f;font-weight:normal}
.legend i,.legend b{border:1px solid var(--line);padding:0 4px}
.pad{color:var(--muted);background:repeating-linear-gradient(45deg,#f6f8fa,#f6f8fa 4px,#eaeef2 4px,#eaeef2 8px);
padding:1px 4px;border-radius:3px;margin-left:2px}
"""
