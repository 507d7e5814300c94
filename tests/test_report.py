"""`tunec report`: the HTML build report, its numbers against the plan and the shards, escaping of
hostile text, runs/ and the plan's lint and estimates, and the page opened in a real browser.

The browser test drives Debian's Chromium (``/usr/bin/chromium``, or ``chromium`` on the PATH) with
playwright (`pip install playwright`; its own browser download is not needed); it skips, saying
which is missing, where either is absent.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny import DEMO, tiny_llama

from tunec.cli import main
from tunec.compiler import plan as plan_module
from tunec.compiler.build import Options, compile_recipe
from tunec.compiler.errors import TunecError
from tunec.compiler.plan import LENGTH_BINS, read_plan
from tunec.compiler.report import render, write_report
from tunec.compiler.shards import open_shard

HOSTILE_TEXT = "<script>alert('x')</script> & </span><u>underlined</u>"
HOSTILE_LABEL = '<img src=x onerror="alert(1)">'


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory) -> Path:
    """The demo compiled once for the module (no unit cache: nothing lands in the user's cache)."""
    out = tmp_path_factory.mktemp("report") / "demo"
    compile_recipe(DEMO / "demo.yaml", out, Options(workers=1, use_cache=False))
    return out


@pytest.fixture
def build(demo_build, tmp_path) -> Path:
    """A copy of the demo build a test may change."""
    out = tmp_path / "demo"
    shutil.copytree(demo_build, out)
    return out


class Page(HTMLParser):
    """The report's elements, with their attributes and the text inside each (for the fast tests)."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.scripts = 0
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        self.scripts += tag == "script"

    def find(self, tag: str, cls: str | None = None, **attrs: str) -> list[dict[str, str]]:
        return [a for t, a in self.elements if t == tag and (cls is None or cls in a.get("class", "").split())
                and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


def _hist_from_shards(out: Path, stage: str) -> tuple[np.ndarray, np.ndarray]:
    """Every packed document's length and trained tokens, read back from the stage's shards."""
    plan = read_plan(out)
    sp = plan.stage(stage)
    lengths, trained = [], []
    for entry in sp.train.shards:
        arrays = open_shard(out / entry.path, entry.bytes, seq_len=sp.train.seq_len)
        ids, labels, pos = (np.asarray(arrays[k]) for k in ("input_ids", "labels", "position_ids"))
        for r in range(ids.shape[0]):
            starts = list(np.flatnonzero(pos[r] == 0)) + [ids.shape[1]]
            for lo, hi in zip(starts[:-1], starts[1:]):
                if np.all(ids[r, lo:hi] == plan.tokenizer.pad_id) and np.all(labels[r, lo:hi] == -100):
                    continue  # padding
                lengths.append(hi - lo)
                trained.append(int((labels[r, lo:hi] != -100).sum()))
    return np.asarray(lengths), np.asarray(trained)


def test_length_histograms_in_the_plan_are_the_packed_documents(demo_build):
    plan = read_plan(demo_build)
    sp = plan.stages[0]
    lengths, trained = _hist_from_shards(demo_build, sp.name)
    width = sp.tasks["reviews"].lengths.bin_width
    assert width == -(-plan.seq_len // LENGTH_BINS)

    def hist(v):
        return np.bincount(np.minimum(v // width, LENGTH_BINS - 1), minlength=LENGTH_BINS)

    for kind, values in (("document", lengths), ("completion", trained), ("prompt", lengths - trained)):
        summed = sum(np.asarray(getattr(c.lengths, kind)) for c in sp.tasks.values())
        assert summed.tolist() == hist(values).tolist(), kind
    for name, c in sp.tasks.items():
        assert sum(c.lengths.document) == c.examples, name
    for name, ev in sp.eval.items():
        assert sum(ev.counts.lengths.document) == ev.counts.examples, name


def test_every_section_holds_the_plans_numbers(demo_build):
    text = render(demo_build, rows=4)
    page = Page(text)
    plan = read_plan(demo_build)
    sp = plan.stages[0]
    assert page.scripts == 0
    assert "Content-Security-Policy" in text and "default-src 'none'" in text
    for section in ("packing", "estimate", "mixture", "lengths", "audit", "eval", "training", "rows"):
        assert page.find("h3", id=f"stage-sft-{section}"), section
    assert page.find("section", id="lint")
    # the packing cards
    stats = dict(re.findall(r'data-stat="([^"]+)">([^<]+)<', text))
    assert stats["rows"] == f"{sp.train.rows:,}"
    assert stats["tokens"] == f"{sp.train.tokens:,}"
    assert stats["trained tokens"] == f"{sp.train.trained_tokens:,}"
    assert stats["padding tokens"] == f"{sp.train.rows * sp.train.seq_len - sp.train.tokens:,}"
    assert stats["fill rate"] == f"{sp.train.fill_rate:.1%}"
    # the mixture chart: a requested and a trained bar per task, at the plan's shares
    for task, c in sp.tasks.items():
        (asked,) = page.find("rect", "bar", data_task=task, data_series="0")
        (got,) = page.find("rect", "bar", data_task=task, data_series="1")
        assert float(asked["data-value"]) == pytest.approx(c.requested_share, abs=1e-6)
        assert float(got["data-value"]) == pytest.approx(c.trained_share, abs=1e-6)
    # three histograms per training task and per eval set, each marking seq_len, bars summing to the examples
    hists = page.find("svg", "histogram")
    assert len(hists) == 3 * (len(sp.tasks) + len(sp.eval))
    assert len(page.find("line", "limit", data_seq_len=str(plan.seq_len))) == len(hists)
    counts = [int(a["data-count"]) for a in page.find("rect", "bar") if "data-count" in a]
    total = sum(c.examples for c in sp.tasks.values()) + sum(ev.counts.examples for ev in sp.eval.values())
    assert sum(counts) == 3 * total
    # the sampled rows: as many as asked; not run yet
    assert len(page.find("div", "packed")) == 4
    assert "not run:" in text
    # lint and estimates as the compile left them
    raw = json.loads((demo_build / "plan.json").read_text())
    assert ("estimate" in raw["stages"][0] and raw["stages"][0]["estimate"] is not None) == bool(
        page.find("table", "estimate"))
    if "lint" in raw:
        assert bool(page.find("table", "lint")) == bool(raw["lint"]) and ("No findings." in text) == (not raw["lint"])


def test_without_lint_and_estimates_says_not_computed(build):
    raw = json.loads((build / "plan.json").read_text())
    raw.pop("lint", None)
    raw["stages"][0].pop("estimate", None)
    (build / "plan.json").write_text(json.dumps(raw))
    text = render(build, rows=0)
    assert text.count("not computed") == 2
    assert '<table class="lint"' not in text and '<table class="estimate"' not in text


def test_sampled_rows_mark_exactly_the_trained_tokens(demo_build):
    plan = read_plan(demo_build)
    sp = plan.stages[0]
    text = render(demo_build, rows=5, seed=7)
    assert text == render(demo_build, rows=5, seed=7)  # seeded: the same rows every time
    assert text != render(demo_build, rows=5, seed=8)
    rows = [int(a["data-row"]) for a in Page(text).find("div", "packed")]
    assert len(rows) == 5 and rows == sorted(rows)
    (entry,) = sp.train.shards
    arrays = open_shard(demo_build / entry.path, entry.bytes)
    blocks = re.findall(r'<div class="packed" data-row="(\d+)">(.*?)</div></div>', text)
    for number, block in blocks:
        labels = np.asarray(arrays["labels"][int(number)])
        ids = np.asarray(arrays["input_ids"][int(number)])
        shown = [int(i) for ids_ in re.findall(r'<b title="([\d ]+)">', block) for i in ids_.split()]
        assert shown == ids[labels != -100].tolist()
        docs = len(re.findall(r'class="doc"', block)) + len(re.findall(r'class="pad"', block))
        assert docs == int((np.asarray(arrays["position_ids"][int(number)]) == 0).sum())


def test_hostile_text_is_escaped_everywhere(tmp_path):
    data = tmp_path / "hostile.jsonl"
    rows = [{"text": f"{HOSTILE_TEXT} \u001b[31m row {i}\ttab", "label": HOSTILE_LABEL} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"""\
tokenizer: {{kind: local, path: {DEMO / 'tokenizer'}}}
seq_len: 128
tasks:
  hostile:
    source: {{kind: jsonl, path: {data}}}
    templates: [{{kind: inline, name: h, prompt: "Text: {{{{ text }}}}\\nAnswer:", completion: " {{{{ label }}}}"}}]
stages:
  - name: sft
    objective: sft
    tasks: [hostile]
    model: {tiny_llama()}
""")
    out = tmp_path / "out"
    compile_recipe(recipe, out, Options(workers=1, use_cache=False))
    raw = json.loads((out / "plan.json").read_text())
    raw["lint"] = [{"id": "label-in-prompt", "message": HOSTILE_TEXT, "location": "recipe.yaml:6:5",
                    "task": "hostile", "template": "h"}]
    (out / "plan.json").write_text(json.dumps(raw))
    text = render(out, rows=20)
    page = Page(text)
    assert page.scripts == 0 and not page.find("img") and not page.find("u")
    assert "<script" not in text and "<img" not in text and "\x1b" not in text
    # the hostile text is shown as text: in the lint table, and in the packed rows token by token
    assert f"<td>{html.escape(HOSTILE_TEXT, quote=True)}</td>" in text
    (first, *_) = re.findall(r'<div class="text">(.*?)</div></div>', text)
    shown = html.unescape(re.sub(r"<[^>]+>", "", first))
    assert shown.startswith(f"Text: {HOSTILE_TEXT} \\x1b[31m row ") and "→tab↵Answer: " + HOSTILE_LABEL in shown
    assert len(page.find("div", "packed")) == read_plan(out).stages[0].train.rows  # fewer rows than asked: all


def _estimate_fixture() -> dict:
    """An ``estimate`` object with every field the plan's schema asks for (any object of numbers where
    the schema has none yet), each value distinct so a test can find it on the page."""
    model = getattr(plan_module, "Estimate", None)
    names = list(model.model_fields) if model is not None else ["steps", "flops", "memory_peak", "seconds_h100"]
    return {n: (0.25 if n == "mfu" else 1000 + i) for i, n in enumerate(names)}


def test_lint_and_estimates_from_the_plan(build):
    raw = json.loads((build / "plan.json").read_text())
    raw["lint"] = [{"id": "constant-prompt", "message": "every rendered prompt is the same", "location":
                    "demo.yaml:30:9", "task": "plurals", "template": "spell_plural"},
                   {"id": "short-instruction", "message": "2 words", "location": None, "task": "reviews",
                    "template": None}]
    raw["stages"][0]["estimate"] = _estimate_fixture()
    (build / "plan.json").write_text(json.dumps(raw))
    text = render(build, rows=0)
    assert "not computed" not in text
    lint = re.search(r'<table class="lint">(.*?)</table>', text).group(1)
    assert lint.count("<tr>") == 3  # header and two findings
    for value in ("constant-prompt", "demo.yaml:30:9", "spell_plural", "short-instruction"):
        assert value in lint
    table = "".join(re.findall(r'<table class="estimate">(.*?)</table>', text))
    cells = dict(re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td></tr>", table))
    assert set(cells) == set(raw["stages"][0]["estimate"])
    for name, value in raw["stages"][0]["estimate"].items():
        assert (f"{value:,}" in cells[name]) or (f"{value:.1%}" == cells[name]) or (f"{value:.3e}" == cells[name])
    raw["lint"] = []
    (build / "plan.json").write_text(json.dumps(raw))
    assert "No findings." in render(build, rows=0)


def _write_runs(out: Path) -> None:
    run = out / "runs" / "sft"
    run.mkdir(parents=True)
    records = [{"step": s, "loss": 7.0 - s * 0.5, "lr": 0.001, "tokens": 4096 * s, "trained_tokens": 500 * s,
                "tokens_per_s": 1000.0, "elapsed_s": s * 0.1, "epoch": s / 10, "grad_norm": 1.0} for s in range(1, 11)]
    records.insert(5, {"step": 5, "eval_loss": {"all": 4.25, "reviews": 3.5}, "eval_tokens": {}})
    records.append({"step": 10, "eval_loss": {"all": 2.125, "reviews": 1.5}, "eval_tokens": {}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 11, "lo')
    part = {"model": "stage sft", "fingerprint": "f", "limit": None,
            "tasks": {"reviews": {"n": 200, "skipped": 0, "truncated": 0, "chance": 0.5, "majority": 0.515,
                                  "acc": 0.8125, "acc_norm": 0.796875, "group": "trained"}},
            "groups": {"trained": {"tasks": 1, "chance": 0.5, "majority": 0.515, "acc": 0.8125,
                                   "acc_norm": 0.796875}}}
    (run / "eval.json").write_text(json.dumps({"format": "tunec.eval", "stage_name": "sft", "stage": part}))


def test_runs_give_loss_curves_eval_loss_and_accuracy(build):
    _write_runs(build)
    text = render(build, rows=0)
    page = Page(text)
    curves = {a["data-name"]: int(a["data-points"]) for a in page.find("polyline", "series")}
    assert curves == {"train": 10, "eval all": 2, "eval reviews": 2}
    assert "unfinished" in text  # the last line, still being written, is left out and said so
    evalloss = re.search(r'<table class="evalloss">(.*?)</table>', text).group(1)
    assert ">2.125<" in evalloss and ">1.5<" in evalloss
    acc = re.search(r'<table class="accuracy stage">(.*?)</table>', text).group(1)
    assert ">0.8125<" in acc and ">0.7969<" in acc and ">200<" in acc
    assert "Not finished" in text  # no result.json


def test_a_damaged_metrics_line_is_located(build):
    _write_runs(build)
    path = build / "runs" / "sft" / "metrics.jsonl"
    lines = path.read_text().split("\n")
    lines[2] = "{not json"
    path.write_text("\n".join(lines))
    with pytest.raises(TunecError, match=re.escape(f"{path}:3: not a JSON record")):
        render(build, rows=0)
    (build / "runs" / "sft" / "eval.json").write_text('{"format": "tunec.eval",\n "stage": }')
    path.write_text("")
    with pytest.raises(TunecError, match=r"eval\.json:2:\d+: not JSON"):
        render(build, rows=0)


def test_cli_writes_the_report_atomically(build, tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(main, ["report", "--help"])
    assert result.exit_code == 0 and "--rows" in result.output
    result = runner.invoke(main, ["report", str(build), "--rows", "2"])
    assert result.exit_code == 0, result.output
    report = build / "report.html"
    assert result.output.startswith(f"report: {report} (")
    before = report.read_bytes()
    assert len(Page(before.decode()).find("div", "packed")) == 2
    # a failure while rendering leaves the previous report as it was, and no temporary file
    from tunec.compiler import report_page

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(report_page, "render", boom)
    with pytest.raises(OSError):
        write_report(build, rows=2)
    assert report.read_bytes() == before
    assert sorted(p.name for p in build.iterdir() if p.name.startswith(".report")) == []
    monkeypatch.undo()
    other = tmp_path / "elsewhere.html"
    result = runner.invoke(main, ["report", str(build), "-o", str(other), "--rows", "0"])
    assert result.exit_code == 0, result.output
    assert other.is_file() and not Page(other.read_text()).find("div", "packed")
    for args, message in (([str(tmp_path / "nothing")], "not a tunec build folder"),
                          ([str(build), "-o", str(tmp_path / "no" / "r.html")], "no such folder for the report"),
                          ([str(build), "-o", str(tmp_path)], "is a directory")):
        result = runner.invoke(main, ["report", *args])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
    result = runner.invoke(main, ["report", str(build), "--rows", "-1"])
    assert result.exit_code == 2


# ---------------------------------------------------------------------------------------- the browser


def _chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def test_the_report_in_headless_chromium(build):
    sync = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    browser_path = _chromium()
    if browser_path is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    _write_runs(build)
    raw = json.loads((build / "plan.json").read_text())
    raw["lint"] = [{"id": "separator", "message": "no space between prompt and completion", "location":
                    "demo.yaml:14:16", "task": "reviews", "template": "sentiment/one_word"}]
    raw["stages"][0]["estimate"] = _estimate_fixture()
    (build / "plan.json").write_text(json.dumps(raw))
    path = write_report(build, rows=6)
    plan = read_plan(build)
    sp = plan.stages[0]
    url = path.resolve().as_uri()
    problems, requests = [], []
    with sync.sync_playwright() as p:
        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        browser = p.chromium.launch(executable_path=browser_path, args=args)
        try:
            tab = browser.new_page(viewport={"width": 1280, "height": 900})
            tab.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
                   if m.type in ("error", "warning") else None)
            tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            tab.on("request", lambda r: requests.append(r.url))
            tab.goto(url, wait_until="load")
            found = tab.evaluate("""() => ({
                title: document.title,
                svgs: document.querySelectorAll('svg.chart').length,
                histograms: document.querySelectorAll('svg.histogram').length,
                drawn: [...document.querySelectorAll('svg.chart')].filter(s => !s.closest('details')).filter(s => {
                    const r = s.getBoundingClientRect(); return r.width > 0 && r.height > 0; }).length,
                shares: [...document.querySelectorAll('svg.bars rect.bar')].map(r =>
                    [r.dataset.task, r.dataset.series, Number(r.dataset.value), r.getBBox().width]),
                stats: Object.fromEntries([...document.querySelectorAll('[data-stat]')].map(
                    d => [d.dataset.stat, d.textContent])),
                tasks: [...document.querySelectorAll('table.tasks tbody tr')].map(
                    tr => [...tr.cells].map(c => c.textContent)),
                lint: document.querySelectorAll('table.lint tbody tr').length,
                estimate: document.querySelectorAll('table.estimate tbody tr').length,
                rows: document.querySelectorAll('div.packed').length,
                trained: document.querySelectorAll('div.packed .text b').length,
                curves: document.querySelectorAll('svg.lines polyline.series').length,
                scripts: document.scripts.length,
                trainedColor: getComputedStyle(document.querySelector('.packed .text b')).backgroundColor,
                plainColor: getComputedStyle(document.querySelector('.packed .text i')).backgroundColor,
            })""")
        finally:
            browser.close()
    assert problems == []
    assert requests == [url]  # the page itself, nothing else
    assert found["title"] == "tunec report: demo.yaml"
    assert found["scripts"] == 0
    assert found["histograms"] == 3 * (len(sp.tasks) + len(sp.eval))
    assert found["drawn"] == found["svgs"] - 3 * len(sp.eval)  # the eval histograms sit in a closed <details>
    assert found["stats"]["rows"] == f"{sp.train.rows:,}" and found["stats"]["tokens"] == f"{sp.train.tokens:,}"
    assert found["stats"]["fill rate"] == f"{sp.train.fill_rate:.1%}"
    shares = {(t, s): (v, w) for t, s, v, w in found["shares"]}
    for task, c in sp.tasks.items():
        assert shares[(task, "0")][0] == pytest.approx(c.requested_share, abs=1e-6)
        assert shares[(task, "1")][0] == pytest.approx(c.trained_share, abs=1e-6)
    widths = {k: w for k, (_, w) in shares.items()}  # bar lengths follow the shares
    ordered = sorted(shares, key=lambda k: shares[k][0])
    assert [widths[k] for k in ordered] == sorted(widths.values())
    assert {r[0]: (int(r[1].replace(",", "")), int(r[3].replace(",", ""))) for r in found["tasks"]} == {
        t: (c.examples, c.trained_tokens) for t, c in sp.tasks.items()}
    assert found["lint"] == 1 and found["estimate"] == len(raw["stages"][0]["estimate"])
    assert found["rows"] == 6 and found["trained"] > 0 and found["curves"] == 3
    assert found["trainedColor"] != found["plainColor"]


def test_chart_docstring_examples():
    import doctest

    from tunec.compiler import report_svg

    result = doctest.testmod(report_svg)
    assert result.attempted > 0 and result.failed == 0


def test_a_damaged_shard_or_tokenizer_is_one_line(build):
    runner = CliRunner()
    shard = build / read_plan(build).stages[0].train.shards[0].path
    shard.write_bytes(shard.read_bytes()[:-4])
    result = runner.invoke(main, ["report", str(build)])
    assert result.exit_code == 1 and result.output.startswith(f"error: {shard}: ") and "Traceback" not in result.output
    assert not (build / "report.html").exists()
    result = runner.invoke(main, ["report", str(build), "--rows", "0"])  # the shards are not read without rows
    assert result.exit_code == 0, result.output
    shutil.rmtree(build / "tokenizer")
    result = runner.invoke(main, ["report", str(build), "--rows", "1"])
    assert result.exit_code == 1 and "tokenizer folder is missing" in result.output


def test_the_report_imports_neither_torch_nor_transformers(demo_build):
    """The compiler never imports torch; the report decodes with `tokenizers` alone, so it starts fast."""
    import subprocess
    import sys

    code = ("import sys; from tunec.compiler.report import render; "
            f"assert 'class=\"packed\"' in render({str(demo_build)!r}, rows=2); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_mask_audit_verdict_follows_the_plan(build):
    assert 'data-audit="passed"' in render(build, rows=0)
    raw = json.loads((build / "plan.json").read_text())
    raw["stages"][0]["tasks"]["plurals"]["audit_failures"] = 3  # as `audit: warn` records documents it kept
    (build / "plan.json").write_text(json.dumps(raw))
    text = render(build, rows=0)
    assert 'data-audit="failed"' in text and "3 document(s) failed the audit" in text and "plurals 3" in text
    row = re.search(r"<tr><td>plurals</td>(.*?)</tr>", re.search(r'<table class="audit">(.*?)</table>', text)[1])[1]
    assert re.findall(r">([\d,.%]+)<", row)[:2] == ["800", "3"]
