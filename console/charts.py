"""Charts drawn on the server as inline SVG: no script, no library.

Each chart is a ``<figure>`` holding an ``<svg role="img">`` with its
``<title>`` and ``<desc>`` (named by ``aria-labelledby``), the figures
written as text beside the bars, and the same figures as a table in a
``<details>`` below it, for readers who cannot see the picture. Colours are
SVG presentation attributes (the console's policy allows no inline style).

- :func:`bars`: one horizontal bar per label (refusals by reason, top
  licensees);
- :func:`stacked`: one vertical bar per category (a day), made of one
  segment per series (calls per dataset, free against paid).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from markupsafe import Markup, escape

#: Series colours, distinguishable in colour-blind palettes (Okabe-Ito,
#: then greys for the rest).
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
OTHER = "#9aa5b1"
_INK = "#1f2933"
_MUTED = "#616e7c"
_GRID = "#d9e2ec"
_ids = itertools.count(1)


@dataclass(frozen=True)
class Series:
    """One segment of every bar: its name and a value per category."""

    name: str
    values: Sequence[int]
    colour: str = ""


def _id(prefix: str) -> str:
    return f"{prefix}-{next(_ids)}"


def _head(chart_id: str, title: str, desc: str, width: int, height: int) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {width} {height}" '
        f'width="100%" preserveAspectRatio="xMinYMin meet" font-family="inherit" font-size="12" '
        f'aria-labelledby="{chart_id}-t {chart_id}-d">'
        f'<title id="{chart_id}-t">{escape(title)}</title><desc id="{chart_id}-d">{escape(desc)}</desc>'
    )


def _figure(chart_id: str, title: str, svg: str, table: str, table_label: str) -> Markup:
    return Markup(  # noqa: S704 - every value in it is escaped above
        f'<figure class="chart" id="{chart_id}"><figcaption><b>{escape(title)}</b></figcaption>'
        f"{svg}<details><summary>{escape(table_label)}</summary>{table}</details></figure>"
    )


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def bars(
    title: str,
    desc: str,
    items: Sequence[tuple[str, int]],
    *,
    label_header: str,
    value_header: str,
    table_label: str,
    empty: str,
    chart_id: str = "",
    colour: str = PALETTE[0],
) -> Markup:
    """Horizontal bars, one per ``(label, value)``, longest first as given."""
    chart_id = chart_id or _id("bars")
    rows = "".join(
        f'<tr><th scope="row">{escape(label)}</th><td class="num">{value}</td></tr>' for label, value in items
    )
    table = (
        f'<table><thead><tr><th scope="col">{escape(label_header)}</th>'
        f'<th scope="col">{escape(value_header)}</th></tr></thead>'
        f"<tbody>{rows or f'<tr><td colspan=2 class=empty>{escape(empty)}</td></tr>'}</tbody></table>"
    )
    width, label_w, row_h = 760, 220, 24
    height = max(1, len(items)) * row_h + 10
    parts = [_head(chart_id, title, desc, width, height)]
    if not items:
        parts.append(f'<text x="0" y="18" fill="{_MUTED}">{escape(empty)}</text>')
    top = max((value for _, value in items), default=0) or 1
    room = width - label_w - 70
    for n, (label, value) in enumerate(items):
        y = 5 + n * row_h
        length = max(1.0, room * value / top) if value else 0.0
        parts.append(
            f'<g><text x="{label_w - 8}" y="{y + 15}" text-anchor="end" fill="{_INK}">'
            f"{escape(_clip(label, 28))}</text>"
            f'<rect x="{label_w}" y="{y + 2}" width="{length:.1f}" height="{row_h - 8}" fill="{colour}"/>'
            f'<text x="{label_w + length + 6:.1f}" y="{y + 15}" fill="{_INK}">{value}</text></g>'
        )
    parts.append("</svg>")
    return _figure(chart_id, title, "".join(parts), table, table_label)


def stacked(
    title: str,
    desc: str,
    categories: Sequence[str],
    series: Sequence[Series],
    *,
    category_header: str,
    total_header: str,
    table_label: str,
    empty: str,
    chart_id: str = "",
) -> Markup:
    """Vertical bars, one per category, stacked from ``series`` in order;
    each bar's total above it, a legend with each series' total below."""
    chart_id = chart_id or _id("stacked")
    coloured = [
        Series(s.name, s.values, s.colour or (PALETTE[n] if n < len(PALETTE) else OTHER))
        for n, s in enumerate(series)
    ]
    totals = [sum(s.values[i] for s in coloured) for i in range(len(categories))]
    head = "".join(f'<th scope="col">{escape(s.name)}</th>' for s in coloured)
    rows = "".join(
        f'<tr><th scope="row">{escape(cat)}</th>'
        + "".join(f'<td class="num">{s.values[i]}</td>' for s in coloured)
        + f'<td class="num">{totals[i]}</td></tr>'
        for i, cat in enumerate(categories)
        if totals[i]
    )
    table = (
        f'<table><thead><tr><th scope="col">{escape(category_header)}</th>{head}'
        f'<th scope="col">{escape(total_header)}</th></tr></thead>'
        f"<tbody>{rows or f'<tr><td colspan={len(coloured) + 2} class=empty>{escape(empty)}</td></tr>'}"
        "</tbody></table>"
    )
    width, left, right, plot_h, top_pad = 760, 40, 24, 180, 18
    legend_rows = (len(coloured) + 2) // 3
    height = top_pad + plot_h + 34 + legend_rows * 18
    parts = [_head(chart_id, title, desc, width, height)]
    peak = max(totals, default=0)
    base = top_pad + plot_h
    parts.append(
        f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="{_MUTED}"/>'
        f'<line x1="{left}" y1="{top_pad}" x2="{width - right}" y2="{top_pad}" stroke="{_GRID}"/>'
        f'<text x="{left - 4}" y="{top_pad + 4}" text-anchor="end" fill="{_MUTED}">{peak}</text>'
        f'<text x="{left - 4}" y="{base + 4}" text-anchor="end" fill="{_MUTED}">0</text>'
    )
    if not peak:
        parts.append(
            f'<text x="{(left + width) / 2:.0f}" y="{top_pad + plot_h / 2:.0f}" text-anchor="middle" '
            f'fill="{_MUTED}">{escape(empty)}</text>'
        )
    count = max(1, len(categories))
    step = (width - left - right) / count
    bar_w = max(2.0, step * 0.7)
    every = max(1, -(-count // 10))  # at most about ten labels under the axis
    for i, cat in enumerate(categories):
        x = left + i * step + (step - bar_w) / 2
        y = float(base)
        segments = []
        for s in coloured:
            value = s.values[i]
            if not value:
                continue
            h = plot_h * value / peak
            y -= h
            segments.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{h:.1f}" fill="{s.colour}">'
                f"<title>{escape(cat)} · {escape(s.name)}: {value}</title></rect>"
            )
        if totals[i]:
            parts.append(
                f'<g>{"".join(segments)}<text x="{x + bar_w / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle" '
                f'font-size="10" fill="{_INK}">{totals[i]}</text></g>'
            )
        if i % every == 0 or i == count - 1:
            parts.append(
                f'<text x="{x + bar_w / 2:.1f}" y="{base + 16}" text-anchor="middle" font-size="10" '
                f'fill="{_MUTED}">{escape(cat[-5:])}</text>'
            )
    for n, s in enumerate(coloured):
        lx = left + (n % 3) * 240
        ly = base + 34 + (n // 3) * 18
        parts.append(
            f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{s.colour}"/>'
            f'<text x="{lx + 18}" y="{ly}" fill="{_INK}">{escape(_clip(s.name, 26))} ({sum(s.values)})</text>'
        )
    parts.append("</svg>")
    return _figure(chart_id, title, "".join(parts), table, table_label)
