"""Inline SVG charts for the build report: histograms, paired bars and line charts, drawn in Python.

No charting library and no script: each function returns one ``<svg>`` element as text, every
label HTML-escaped, every mark carrying a ``<title>`` (the browser shows it on hover) and a
``data-*`` attribute with its number, so a test can read the charts back. Sizes are in CSS
pixels; the page scales them down on narrow screens (``max-width: 100%``).

>>> svg = histogram([0, 3, 1, 0], bin_width=4, seq_len=16, title="document")
>>> svg.count('class="bar"'), 'data-count="3"' in svg, 'class="limit"' in svg
(2, True, True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#7a7a7a", "#f0e442")
_FONT = 'font-family="system-ui, sans-serif" font-size="11"'


def _e(text: object) -> str:
    return escape(str(text), quote=True)


def _num(x: float) -> str:
    """A short label for an axis tick or a bar."""
    if x == 0:
        return "0"
    if abs(x) >= 10_000:
        return f"{x / 1000:,.0f}k"
    if abs(x) >= 100 or float(x).is_integer():
        return f"{x:,.0f}"
    return f"{x:.3g}"


def _nice_max(x: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times a power of ten that is at least ``x``."""
    if x <= 0:
        return 1.0
    p = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * p >= x:
            return m * p
    return 10 * p  # pragma: no cover - the loop always returns


def _open(width: int, height: int, label: str, kind: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart {kind}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(label)}" {_FONT}>'
            f"<title>{_e(label)}</title>")


def histogram(counts: Sequence[int], bin_width: int, seq_len: int, title: str, color: str = PALETTE[0],
              width: int = 300, height: int = 150) -> str:
    """Bars of documents per length bin on an axis from 0 to a little past ``seq_len``, which is marked."""
    left, right, top, bottom = 34, 10, 18, 24
    w, h = width - left - right, height - top - bottom
    span = max(seq_len, bin_width * len(counts)) * 1.04
    ymax = _nice_max(max(counts, default=0))
    out = [_open(width, height, f"{title}: token lengths", "histogram"),
           f'<text x="{left}" y="12" font-weight="600">{_e(title)}</text>']
    bars = []
    for frac in (0, 0.5, 1):
        y = top + h - frac * h
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6ea"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{_num(ymax * frac)}</text>')
    for k, n in enumerate(counts):
        if not n:
            continue
        lo, hi = k * bin_width, (k + 1) * bin_width
        x = left + lo / span * w
        bw = max(bin_width / span * w - 0.6, 1.2)
        bh = max(n / ymax * h, 1.0)
        what = f"{lo}+" if k == len(counts) - 1 else f"{lo}–{hi - 1}"
        bars.append(f'<rect class="bar" data-count="{n}" x="{x:.1f}" y="{top + h - bh:.1f}" width="{bw:.1f}" '
                    f'height="{bh:.1f}"><title>{what} tokens: {n:,} documents</title></rect>')
    out.append(f'<g fill="{color}">{"".join(bars)}</g>')
    xs = left + seq_len / span * w
    out.append(f'<line class="limit" data-seq-len="{seq_len}" x1="{xs:.1f}" x2="{xs:.1f}" y1="{top - 4}" '
               f'y2="{top + h}" stroke="#c0392b" stroke-width="1.5" stroke-dasharray="4 3"/>'
               f'<text x="{xs - 3:.1f}" y="{top + 6}" text-anchor="end" fill="#c0392b">seq_len {seq_len}</text>')
    out.append(f'<line x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}" stroke="#888"/>')
    for t in _ticks(seq_len):
        x = left + t / span * w
        out.append(f'<text x="{x:.1f}" y="{height - 8}" text-anchor="middle" fill="#555">{_num(t)}</text>')
    out.append("</svg>")
    return "".join(out)


def _ticks_between(lo: float, hi: float) -> list[float]:
    """Round tick values inside ``[lo, hi]`` (about five)."""
    step = _nice_max((hi - lo) / 5)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) // step) + 1)]


def _ticks(seq_len: int) -> list[int]:
    step = _nice_max(seq_len / 4)
    return [int(step * i) for i in range(int(seq_len // step) + 1)]


def paired_bars(rows: Sequence[tuple[str, float | None, float | None]], labels: tuple[str, str],
                title: str, width: int = 620) -> str:
    """Two horizontal bars per row (shares in [0, 1]): e.g. requested versus trained mixture share.
    A missing value (``None``) is drawn as no bar and labelled "-"."""
    right, top, bar, gap = 60, 40, 13, 12
    left = min(max(90, 16 + 7 * max((len(r[0]) for r in rows), default=0)), width // 2)  # room for the names
    h = top + len(rows) * (2 * bar + gap) + 20
    w = width - left - right
    out = [_open(width, h, title, "bars"), f'<text x="0" y="13" font-weight="600">{_e(title)}</text>']
    for i, label in enumerate(labels):
        x = left + i * 220
        out.append(f'<rect x="{x}" y="20" width="11" height="11" fill="{PALETTE[i]}"/>'
                   f'<text x="{x + 15}" y="29">{_e(label)}</text>')
    for frac in (0, 0.25, 0.5, 0.75, 1):
        out.append(f'<line x1="{left + frac * w:.1f}" x2="{left + frac * w:.1f}" y1="{top - 4}" y2="{h - 16}" '
                   f'stroke="#e3e6ea"/><text x="{left + frac * w:.1f}" y="{h - 4}" text-anchor="middle" '
                   f'fill="#555">{frac:.0%}</text>')
    for r, (name, a, b) in enumerate(rows):
        y = top + r * (2 * bar + gap)
        out.append(f'<text x="{left - 6}" y="{y + bar + 4}" text-anchor="end">{_e(name)}</text>')
        for i, v in enumerate((a, b)):
            yy = y + i * bar
            text = "-" if v is None else f"{v:.1%}"
            if v is not None:
                out.append(f'<rect class="bar" data-task="{_e(name)}" data-series="{i}" data-value="{v:.6f}" '
                           f'x="{left}" y="{yy}" width="{max(v * w, 0.5):.1f}" height="{bar - 2}" '
                           f'fill="{PALETTE[i]}"><title>{_e(name)}, {_e(labels[i])}: {text}</title></rect>')
            out.append(f'<text x="{left + (v or 0) * w + 4:.1f}" y="{yy + bar - 3}" fill="#333">{text}</text>')
    out.append("</svg>")
    return "".join(out)


def lines(series: Sequence[tuple[str, Sequence[tuple[float, float]], bool]], title: str, x_label: str,
          y_label: str, width: int = 620, height: int = 240) -> str:
    """A line chart: ``series`` of (name, points, dashed). One-point series are drawn as dots."""
    left, right, top, bottom = 48, 12, 40, 34
    w, h = width - left - right, height - top - bottom
    pts = [p for _, ps, _ in series for p in ps]
    x0, x1 = min((p[0] for p in pts), default=0), max((p[0] for p in pts), default=1)
    y1 = _nice_max(max((p[1] for p in pts), default=1))
    x1 = x1 if x1 > x0 else x0 + 1
    out = [_open(width, height, title, "lines"), f'<text x="0" y="13" font-weight="600">{_e(title)}</text>']
    lx = left
    for i, (name, _, dashed) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        dash = ' stroke-dasharray="5 3"' if dashed else ""
        out.append(f'<line x1="{lx}" x2="{lx + 16}" y1="25" y2="25" stroke="{color}" stroke-width="2"{dash}/>'
                   f'<text x="{lx + 20}" y="29">{_e(name)}</text>')
        lx += 28 + 7 * len(name)
    for frac in (0, 0.25, 0.5, 0.75, 1):
        y = top + h - frac * h
        out.append(f'<line x1="{left}" x2="{left + w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6ea"/>'
                   f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{_num(y1 * frac)}</text>')
    for i, (name, ps, dashed) in enumerate(series):
        color = PALETTE[i % len(PALETTE)]
        xy = [(left + (x - x0) / (x1 - x0) * w, top + h - y / y1 * h) for x, y in ps]
        if len(xy) > 1:
            dash = ' stroke-dasharray="5 3"' if dashed else ""
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
            out.append(f'<polyline class="series" data-name="{_e(name)}" data-points="{len(xy)}" points="{path}" '
                       f'fill="none" stroke="{color}" stroke-width="1.6"{dash}><title>{_e(name)}</title></polyline>')
        if len(xy) <= 30:
            for (x, y), (sx, sy) in zip(xy, ps):
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}">'
                           f"<title>{_e(name)}: {sy:.4f} at {_e(x_label)} {_num(sx)}</title></circle>")
    out.append(f'<line x1="{left}" x2="{left + w}" y1="{top + h}" y2="{top + h}" stroke="#888"/>')
    for t in _ticks_between(x0, x1):
        x = left + (t - x0) / (x1 - x0) * w
        out.append(f'<text x="{x:.1f}" y="{top + h + 14}" text-anchor="middle" fill="#555">{_num(t)}</text>')
    out.append(f'<text x="{left + w / 2:.1f}" y="{height - 4}" text-anchor="middle" fill="#555">{_e(x_label)}</text>'
               f'<text x="12" y="{top + h / 2:.1f}" text-anchor="middle" fill="#555" '
               f'transform="rotate(-90 12 {top + h / 2:.1f})">{_e(y_label)}</text>')
    out.append("</svg>")
    return "".join(out)


def meter(value: float, label: str, width: int = 300) -> str:
    """One bar filled to ``value`` (in [0, 1]): fill rate against padding."""
    v = min(max(value, 0.0), 1.0)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart meter" width="{width}" height="16" '
            f'viewBox="0 0 {width} 16" role="img" aria-label="{_e(label)}">'
            f'<rect x="0" y="2" width="{width}" height="12" rx="3" fill="#e9ecef"/>'
            f'<rect class="fill" data-value="{v:.6f}" x="0" y="2" width="{v * width:.1f}" height="12" rx="3" '
            f'fill="{PALETTE[2]}"><title>{_e(label)}</title></rect></svg>')
