"""``tunec report``: one self-contained HTML page about a build, to read before training on it.

Per stage and task: packing (rows, tokens, trained tokens, fill rate, padding), requested versus
trained mixture shares, examples, tokens and templates per task, token-length histograms with
``seq_len`` marked and the truncated and dropped counts, the mask audit, the eval sets and any
leakage, a seeded sample of packed rows with every token shown and trained tokens highlighted,
and, once ``tunec run`` / ``tunec eval`` have run, loss curves, eval losses and accuracy. The
plan's prompt lint and cost estimates are shown when the plan has them.

The page has inline CSS and inline SVG only: no script, no font or image to fetch, a
Content-Security-Policy that forbids both, so it opens anywhere, offline, and can be archived
or attached to a review as one file. It is written atomically (a crash never leaves half a page).
"""

from __future__ import annotations

from pathlib import Path

from . import report_data as data
from . import report_page as page
from .errors import TunecError
from .fileio import atomic_write_text

REPORT_FILE = "report.html"
MAX_ROWS = 1000  # sampled rows: beyond this the page grows past what a browser shows comfortably


def render(out: Path, rows: int = 8, seed: int | None = None) -> str:
    """The report of the build in ``out`` as HTML text. ``rows`` packed rows per stage are shown,
    drawn by ``seed`` (the plan's seed when ``None``)."""
    from . import __version__

    if not 0 <= rows <= MAX_ROWS:
        raise TunecError(f"--rows {rows}: give 0 to {MAX_ROWS} rows per stage")
    if seed is not None and seed < 0:
        raise TunecError(f"--seed {seed}: give a seed of 0 or more")
    return page.render(data.load(Path(out), rows, seed), __version__)


def write_report(out: Path, dest: Path | None = None, rows: int = 8, seed: int | None = None) -> Path:
    """Render the report and write it atomically to ``dest`` (default ``OUT/report.html``)."""
    out = Path(out)
    dest = Path(dest) if dest is not None else out / REPORT_FILE
    text = render(out, rows, seed)
    if dest.is_dir():
        raise TunecError(f"{dest}: is a folder; give a file name, e.g. {dest / REPORT_FILE}")
    if not dest.parent.is_dir():
        raise TunecError(f"{dest.parent}: no such folder for the report")
    try:
        atomic_write_text(dest, text)
    except OSError as exc:
        raise TunecError(f"{dest}: cannot write the report ({exc.strerror or type(exc).__name__})") from None
    return dest
