"""The report's small SVG chart kit: a palette, number formats, axes with nice ticks, legends and
the :class:`Chart` a panel is, drawn as inline SVG (no script, font or image: the page must open
offline under a Content-Security-Policy that forbids them).
"""

from __future__ import annotations

import html
import math
import re
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


def fmt_cny_tick(v: float) -> str:
    """An amount on an axis: ¥500k rather than ¥500.0k (tick values are round)."""
    return "¥" + re.sub(r"\.0(?=[kMB]$)", "", fmt_num(v))


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


#: the 1-2-5 steps of a logarithmic axis, per decade
_LOG_STEPS = (1.0, 2.0, 5.0)


def _step_floor(v: float) -> float:
    """The largest 1, 2 or 5 × 10^k not above ``v`` (> 0)."""
    mag = 10.0 ** math.floor(math.log10(v))
    return max(m * mag for m in _LOG_STEPS if m * mag <= v * (1 + 1e-9))


def _step_ceil(v: float) -> float:
    """The smallest 1, 2 or 5 × 10^k not below ``v`` (> 0)."""
    mag = 10.0 ** math.floor(math.log10(v))
    return min(m * mag for m in (*_LOG_STEPS, 10.0) if m * mag >= v * (1 - 1e-9))


def log_ticks(lo: float, hi: float, n: int = 9) -> list[float]:
    """Tick values of a logarithmic axis over [lo, hi] (both > 0): the 1-2-5 steps between them, or
    only the powers of ten when that would be more than ``n`` ticks."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo <= 0 or hi <= lo:
        raise ValueError(f"log_ticks needs 0 < lo < hi, got {lo}, {hi}")
    out = []
    for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in _LOG_STEPS:
            v = round(m * 10.0 ** k, 12)
            if lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9):
                out.append(v)
    if len(out) > n:
        powers = [v for v in out if math.isclose(10 ** round(math.log10(v)), v)]
        out = sorted({out[0], *powers, out[-1]})
    return out


@dataclass(frozen=True)
class Scale:
    """A value axis over [lo, hi], linear or logarithmic: :meth:`frac` places a value on it (0 at lo,
    1 at hi). A value outside the domain (on a log axis: also any value <= 0) is drawn at the edge,
    so a chart must label it with its true value: :meth:`clipped` says which side."""

    kind: str  # "linear" or "log"
    lo: float
    hi: float
    ticks: tuple[float, ...]

    def frac(self, v: float) -> float:
        if self.kind == "log":
            if v <= self.lo:
                return 0.0
            return min(1.0, math.log(v / self.lo) / math.log(self.hi / self.lo))
        return max(0.0, min(1.0, (v - self.lo) / (self.hi - self.lo)))

    def clipped(self, v: float) -> int:
        """-1 when ``v`` is drawn at the low edge in its stead, 1 at the high edge, 0 when in range."""
        if v < self.lo * (1 - 1e-9) or (self.kind == "log" and v <= 0):
            return -1
        return 1 if v > self.hi * (1 + 1e-9) else 0

    @property
    def origin(self) -> float:
        """Where bars start: 0 on a linear axis, the low end of a log axis (which has no zero)."""
        return self.lo if self.kind == "log" else 0.0


def value_scale(values: Sequence[float], *, include: Sequence[float] = (), log_spread: float = 4.0,
                min_positive: float = 0.1) -> Scale:
    """The axis for ``values`` (plus ``include``, e.g. a threshold that must show).

    Linear from min(0, lowest) when the values are of one size; logarithmic when the largest is
    more than ``log_spread`` times the median of the positive ones (on a linear axis the typical
    bars would crowd its first fifth: 10 months next to 50, or 2,000). A log axis starts at the
    1-2-5 step below the smallest positive value (not below ``min_positive``) and ends at the one
    above the largest: values <= 0 fall off it and are clipped (and must be labelled)."""
    vals = [v for v in (*values, *include) if math.isfinite(v)]
    positive = sorted(v for v in vals if v > 0)
    if positive and max(positive) > log_spread * positive[len(positive) // 2]:
        lo = _step_floor(max(min(positive), min_positive))
        hi = _step_ceil(max(positive))
        if hi <= lo:
            hi = _step_ceil(lo * 1.01)
        return Scale("log", lo, hi, tuple(log_ticks(lo, hi)))
    lo = min([0.0, *vals])
    ticks = nice_ticks(max([*vals, lo + 1e-9]), lo=lo)
    return Scale("linear", ticks[0], ticks[-1], tuple(ticks))


def fmt_axis(v: float) -> str:
    """A tick value: 0.5, 2, 1,000 (no trailing zeros, no unit suffix below 10,000)."""
    return f"{v:g}" if abs(v) < 1000 else fmt_num(v)


def text_width(s: str, size: float = 11.0) -> float:
    """Rough rendered width of ``s`` in px (SVG text cannot be measured without a script): wide
    characters count double. Used to leave room so that a label is never cut off."""
    return sum(size * (1.1 if ord(ch) > 0x2E7F else 0.62) for ch in s)


def wrap(s: str, max_px: float, size: float = 11.0) -> list[str]:
    """``s`` broken at spaces into lines no wider than ``max_px`` (by :func:`text_width`)."""
    lines: list[str] = []
    for word in s.split():
        if lines and text_width(f"{lines[-1]} {word}", size) <= max_px:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def bin_points(points: Iterable[tuple[float, float]], cell: float = 2.0) -> list[tuple[float, float, int]]:
    """Points that would be drawn on top of one another, counted: (x, y, how many) per ``cell`` ×
    ``cell`` square of the data's units, at the mean of its points, largest count first. A scatter
    whose points coincide (contracts of one cycle judged on one day, none bought yet) shows one dot
    for hundreds of contracts; a dot per cell sized by its count shows how many there are."""
    cells: dict[tuple[int, int], list[float]] = {}
    for x, y in points:
        key = (math.floor(x / cell), math.floor(y / cell))
        acc = cells.setdefault(key, [0.0, 0.0, 0.0])
        acc[0] += x
        acc[1] += y
        acc[2] += 1
    out = [(sx / n, sy / n, int(n)) for sx, sy, n in cells.values()]
    return sorted(out, key=lambda p: (-p[2], p[0], p[1]))


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
