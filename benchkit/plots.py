"""Line charts as standalone inline SVG strings (no plotting library). Every text is escaped."""
from __future__ import annotations

import math
from html import escape

COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """About n round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten;
    whole steps with integer)."""
    if hi <= lo:
        lo, hi = lo - 1, hi + 1
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    step = max(step, 1) if integer else step
    start = math.floor(lo / step + 1e-9) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _num(v: float) -> str:
    return f"{v:g}"


def _errors(s: dict) -> list[tuple[float, float] | None]:
    """The series' per-point intervals, None where a point has none (or a NaN bound)."""
    errors = s.get("errors") or [None] * len(s["points"])
    if len(errors) != len(s["points"]):
        raise ValueError(f"series {s['label']!r}: {len(errors)} intervals for {len(s['points'])} points")
    return [None if e is None or any(v != v for v in e) else (float(e[0]), float(e[1])) for e in errors]


def line_chart(series: list[dict], *, title: str = "", x_label: str = "", y_label: str = "",
               y_range: tuple[float, float] | None = None, width: int = 460, height: int = 300) -> str:
    """series: [{"label": str, "points": [(x, y), ...], "dash": bool (optional), "errors": [(lo, hi) or
    None, ...] (optional, one per point)}]. Points are joined in x order and drawn as circles whose
    tooltip gives the values; a point's interval (e.g. its 95% CI) is a vertical error bar with caps
    (class "errorbar"). Returns an <svg> element."""
    pts = [p for s in series for p in s["points"]]
    if not pts:
        return ""
    bars = [e for s in series for e in _errors(s) if e is not None]
    left, right, top, bottom = 52, 16, 28 if title else 12, 44
    legend_h = 18 * len(series)
    plot_w, plot_h = width - left - right, height - top - bottom
    xs, ys = [p[0] for p in pts], [p[1] for p in pts] + [v for e in bars for v in e]
    xt = nice_ticks(min(xs), max(xs), integer=all(float(x).is_integer() for x in xs))
    yt = nice_ticks(*(y_range or (min(ys), max(ys))))
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]
    sx = lambda v: left + (v - x0) / (x1 - x0) * plot_w
    sy = lambda v: top + plot_h - (v - y0) / (y1 - y0) * plot_h
    total_h = height + legend_h
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{total_h}" '
           f'viewBox="0 0 {width} {total_h}" role="img" aria-label="{escape(title)}" '
           f'font-family="system-ui, sans-serif" font-size="11">']
    out.append(f"<title>{escape(title)}</title>")
    if title:
        out.append(f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-size="13" font-weight="600">{escape(title)}</text>')
    for v in yt:  # horizontal grid and y ticks
        y = sy(v)
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{escape(_num(v))}</text>')
    for v in xt:
        x = sx(v)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 5}" stroke="#444"/>')
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 17}" text-anchor="middle">{escape(_num(v))}</text>')
    out.append(f'<path d="M{left},{top} V{top + plot_h} H{left + plot_w}" fill="none" stroke="#444"/>')
    out.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 34}" text-anchor="middle">{escape(x_label)}</text>')
    out.append(f'<text transform="translate(14 {top + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>')
    with_bars = [i for i, s in enumerate(series) if any(e is not None for e in _errors(s))]
    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        # Series that share x values would draw their bars on top of each other: each is dodged a
        # few pixels sideways, centred on the point.
        dodge = 3.0 * (with_bars.index(i) - (len(with_bars) - 1) / 2) if i in with_bars else 0.0
        line = sorted(zip(s["points"], _errors(s)), key=lambda pe: pe[0])
        dash = ' stroke-dasharray="5 3"' if s.get("dash") else ""
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for (x, y), _ in line)
        out.append(f'<g class="series" data-label="{escape(s["label"])}">')
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for (x, y), err in line:
            if err is None:
                continue
            cx, lo, hi = sx(x) + dodge, sy(err[0]), sy(err[1])
            out.append(f'<path class="errorbar" d="M{cx:.1f},{lo:.1f} V{hi:.1f} M{cx - 4:.1f},{lo:.1f} H{cx + 4:.1f} '
                       f'M{cx - 4:.1f},{hi:.1f} H{cx + 4:.1f}" stroke="{color}" stroke-width="1.2" fill="none" '
                       f'data-lo="{err[0]:.4g}" data-hi="{err[1]:.4g}"><title>{escape(s["label"])}: {escape(x_label)} '
                       f'{escape(_num(x))}, interval [{err[0]:.2f}, {err[1]:.2f}]</title></path>')
        for (x, y), err in line:
            interval = "" if err is None else f" [{err[0]:.2f}, {err[1]:.2f}]"
            out.append(f'<circle class="point" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}">'
                       f'<title>{escape(s["label"])}: {escape(x_label)} {escape(_num(x))}, {y:.2f}{interval}</title></circle>')
        out.append("</g>")
        ly = height + 18 * i + 4
        out.append(f'<line x1="{left}" x2="{left + 22}" y1="{ly:.1f}" y2="{ly:.1f}" stroke="{color}" stroke-width="2"{dash}/>')
        out.append(f'<circle cx="{left + 11}" cy="{ly:.1f}" r="3.5" fill="{color}"/>')
        out.append(f'<text x="{left + 30}" y="{ly + 4:.1f}">{escape(s["label"])}</text>')
    out.append("</svg>")
    return "\n".join(out)
