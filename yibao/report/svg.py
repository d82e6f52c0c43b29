"""The report's small SVG chart kit: a palette, number formats, axes with nice ticks, legends and
the :class:`Chart` a panel is, drawn as inline SVG (no script, font or image: the page must open
offline under a Content-Security-Policy that forbids them).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

# Tableau 10: distinguishable, print- and colour-blind-friendlier than rainbow palettes.
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f", "#bab0ac")
OTHER_COLOR = "#9aa0a6"
WARN_COLOR = "#d62728"
OK_COLOR = "#2ca02c"
LATE_COLOR = "#f2a93b"
PENDING_COLOR = "#c9ced6"

WIDTH = 960


# --- rendering helpers --------------------------------------------------------------------------

def esc(v: object) -> str:
    """Text for HTML and inline SVG: every value from the database passes through here."""
    return html.escape(str(v), quote=True)


def fmt_num(v: float, digits: int = 1) -> str:
    """Compact number: 1,234 / 12.3k / 4.5M / 1.2B (amounts span fen to billions)."""
    a = abs(v)
    for limit, unit, suffix in ((1e9, 1e9, "B"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if a >= limit:
            return f"{v / unit:,.{digits}f}{suffix}"
    if float(v).is_integer() or a >= 100:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def fmt_cny(v: float) -> str:
    return f"¥{fmt_num(v)}"


def nice_ticks(hi: float, n: int = 5, lo: float = 0.0) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2, 2.5 or 5 × 10^k)."""
    if not math.isfinite(hi) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = mag
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        step = m * mag
        if (hi - lo) / step <= n:
            break
    start = math.floor(lo / step) * step
    count = math.ceil((hi - start) / step - 1e-9)
    return [round(start + i * step, 10) for i in range(count + 1)]


def color_map(names: Sequence[str]) -> dict[str, str]:
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def text(x: float, y: float, content: str, *, anchor: str = "start", cls: str = "", extra: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{c}{extra}>{esc(content)}</text>'


def clip(text: str, n: int = 28) -> str:
    """Shorten a label drawn in a fixed margin (the full text stays in the mark's tooltip)."""
    return text if len(text) <= n else text[: n - 1] + "…"


def svg_doc(height: int, body: Iterable[str], label: str) -> str:
    return (f'<svg viewBox="0 0 {WIDTH} {height}" width="100%" role="img" aria-label="{esc(label)}" '
            f'preserveAspectRatio="xMidYMin meet">' + "".join(body) + "</svg>")


def legend_html(items: Iterable[tuple[str, str, str]]) -> str:
    """HTML legend of (label, colour, shape: box|line|dash|outline|dot)."""
    out = []
    for label, color, shape in items:
        out.append(f'<li><span class="sw sw-{shape}" style="--c:{esc(color)}"></span>{esc(label)}</li>')
    return '<ul class="legend">' + "".join(out) + "</ul>"


@dataclass
class Chart:
    """One figure of the report: id, title, subtitle, the SVG (or None when there is no data)."""

    key: str
    title: str
    subtitle: str
    svg: str | None
    legend: str = ""
    empty_reason: str = "no data"

    def html(self) -> str:
        state = "ok" if self.svg is not None else "empty"
        body = self.svg if self.svg is not None else _empty_svg(self.empty_reason)
        return (f'<figure class="chart" id="chart-{esc(self.key)}" data-chart="{esc(self.key)}" '
                f'data-state="{state}"><figcaption><h2>{esc(self.title)}</h2>'
                f'<p class="sub">{esc(self.subtitle)}</p></figcaption>{body}{self.legend}</figure>')


def _empty_svg(reason: str) -> str:
    return svg_doc(120, [
        '<rect x="1" y="1" width="958" height="118" rx="6" class="empty-frame"/>',
        text(WIDTH / 2, 56, "No data", anchor="middle", cls="empty-title"),
        text(WIDTH / 2, 82, reason, anchor="middle", cls="empty-reason"),
    ], f"no data: {reason}")


def x_axis(ticks: Sequence[float], x: Callable[[float], float], y0: float, y1: float,
            label: str, fmt: Callable[[float], str] = fmt_num) -> list[str]:
    """Vertical grid lines with values below, and the axis title."""
    out = []
    for t in ticks:
        out.append(f'<line x1="{x(t):.1f}" y1="{y0:.1f}" x2="{x(t):.1f}" y2="{y1:.1f}" class="grid"/>')
        out.append(text(x(t), y1 + 16, fmt(t), anchor="middle", cls="tick"))
    mid = (x(ticks[0]) + x(ticks[-1])) / 2
    out.append(text(mid, y1 + 36, label, anchor="middle", cls="axis-title"))
    return out


def y_axis(ticks: Sequence[float], y: Callable[[float], float], x0: float, x1: float,
            label: str, fmt: Callable[[float], str] = fmt_num) -> list[str]:
    """Horizontal grid lines with values on the left, and the (rotated) axis title."""
    out = []
    for t in ticks:
        out.append(f'<line x1="{x0:.1f}" y1="{y(t):.1f}" x2="{x1:.1f}" y2="{y(t):.1f}" class="grid"/>')
        out.append(text(x0 - 8, y(t) + 4, fmt(t), anchor="end", cls="tick"))
    mid = (y(ticks[0]) + y(ticks[-1])) / 2
    out.append(f'<text x="16" y="{mid:.1f}" text-anchor="middle" class="axis-title" '
               f'transform="rotate(-90 16 {mid:.1f})">{esc(label)}</text>')
    return out
