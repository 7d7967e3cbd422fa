"""ROC-style line plots as PNG: drawn with matplotlib when it is installed (``pip install
matplotlib``; pm_dist's ``bench`` extra has it), else with Pillow alone (a dependency), so a report never
needs matplotlib.

Log-scaled x axis by default (FAR / FPIR from the smallest measurable value to 1), linear y axis,
decade grid lines, one or more labelled curves. Both drawings are 720 × 540 pixels with the same
colours. ``PM_DIST_PLOT=pillow`` (or ``backend="pillow"``) forces the Pillow drawing.
"""

from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 720, 540
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 60
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable when Pillow has FreeType
    except TypeError:  # older Pillow: fixed bitmap font
        return ImageFont.load_default()


def _nice_ticks(lo: float, hi: float, target: int = 8) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 × 10^k) covering [lo, hi], about ``target`` of them."""
    raw = (hi - lo) / target
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _vertical_text(img: Image.Image, center: tuple[float, float], text: str, font) -> None:
    """Draw ``text`` rotated 90° (reading bottom to top) centred at ``center``."""
    box = ImageDraw.Draw(img).textbbox((0, 0), text, font=font)
    label = Image.new("RGB", (box[2] - box[0] + 4, box[3] - box[1] + 4), "white")
    ImageDraw.Draw(label).text((2 - box[0], 2 - box[1]), text, fill="black", font=font)
    label = label.rotate(90, expand=True)
    img.paste(label, (int(center[0] - label.width / 2), int(center[1] - label.height / 2)))


BACKENDS = ("auto", "matplotlib", "pillow")


def plot_backend(backend: str | None = None) -> str:
    """The drawing ``plot_curves`` uses: ``backend`` (else ``$PM_DIST_PLOT``, else ``auto``)
    resolved to ``matplotlib`` when it is importable, otherwise ``pillow``."""
    backend = backend or os.environ.get("PM_DIST_PLOT") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"plot backend {backend!r}: choose from {BACKENDS}")
    if backend == "pillow":
        return "pillow"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if backend == "matplotlib":
            raise ImportError("the matplotlib plot backend needs matplotlib: "
                              "pip install matplotlib") from None
        return "pillow"
    return "matplotlib"


def _points(series: list[dict], xscale: str) -> list[tuple[float, float]]:
    return [(x, y) for s in series for x, y in zip(s["x"], s["y"])
            if y is not None and (xscale != "log" or x > 0)]


def plot_curves(path: str, title: str, series: list[dict], xlabel: str, ylabel: str,
                xscale: str = "log", backend: str | None = None) -> str:
    """Write ``series`` (dicts with ``x``, ``y``, ``label``) as a PNG line plot at ``path``;
    returns the drawing used (``matplotlib`` or ``pillow``, see :func:`plot_backend`)."""
    if not _points(series, xscale):
        raise ValueError("nothing to plot")
    used = plot_backend(backend)
    if used == "matplotlib":
        _plot_matplotlib(path, title, series, xlabel, ylabel, xscale)
    else:
        _plot_pillow(path, title, series, xlabel, ylabel, xscale)
    return used


def _plot_matplotlib(path, title, series, xlabel, ylabel, xscale) -> None:
    """The figure API with the Agg canvas: no pyplot, so no global state or GUI backend is touched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH / 100, HEIGHT / 100), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for i, s in enumerate(series):
        pts = [(x, y) for x, y in zip(s["x"], s["y"]) if y is not None and (xscale != "log" or x > 0)]
        if not pts:
            continue
        xs, ys = zip(*pts)
        color = tuple(c / 255 for c in COLORS[i % len(COLORS)])
        ax.plot(xs, ys, color=color, linewidth=2, label=s.get("label", ""),
                marker="o" if len(pts) == 1 else None)
    if xscale == "log":
        ax.set_xscale("log")
    ys = [y for _, y in _points(series, xscale)]
    y_lo = max(0.0, math.floor(min(ys) * 10 - 1e-9) / 10)
    y_hi = 1.0 if max(ys) <= 1.0 else max(ys)
    ax.set_ylim(y_lo if y_hi - y_lo >= 0.05 else max(0.0, y_hi - 0.1), y_hi)
    ax.grid(True, which="major", color=(0.88, 0.88, 0.88))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if any(s.get("label") for s in series):
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, format="png")


def _plot_pillow(path, title, series, xlabel, ylabel, xscale) -> None:
    """The fallback drawing, Pillow only."""
    pts = _points(series, xscale)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if xscale == "log":
        x_lo, x_hi = math.floor(math.log10(min(xs)) + 1e-9), max(0, math.ceil(math.log10(max(xs)) - 1e-9))
        if x_hi <= x_lo:
            x_lo -= 1
        fx = lambda x: (math.log10(x) - x_lo) / (x_hi - x_lo)  # noqa: E731
        xticks = [(10.0 ** e, f"1e{e}" if e else "1") for e in range(x_lo, x_hi + 1)]
    else:
        x_lo, x_hi = min(xs), max(xs)
        if x_hi <= x_lo:
            x_hi = x_lo + 1
        fx = lambda x: (x - x_lo) / (x_hi - x_lo)  # noqa: E731
        xticks = [(v, f"{v:g}") for v in _nice_ticks(x_lo, x_hi)]
    y_lo = max(0.0, math.floor(min(ys) * 10 - 1e-9) / 10)
    y_hi = 1.0 if max(ys) <= 1.0 else max(ys)
    if y_hi - y_lo < 0.05:
        y_lo = max(0.0, y_hi - 0.1)
    fy = lambda y: (y - y_lo) / (y_hi - y_lo)  # noqa: E731

    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    small, big = _font(12), _font(15)
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    px = lambda x: LEFT + fx(x) * pw  # noqa: E731
    py = lambda y: TOP + (1 - fy(y)) * ph  # noqa: E731

    for value, text in xticks:
        x = px(value)
        draw.line([(x, TOP), (x, TOP + ph)], fill=(225, 225, 225))
        draw.text((x, TOP + ph + 6), text, fill="black", font=small, anchor="mt")
    for value in _nice_ticks(y_lo, y_hi):
        y = py(value)
        draw.line([(LEFT, y), (LEFT + pw, y)], fill=(225, 225, 225))
        draw.text((LEFT - 6, y), f"{value:.2f}", fill="black", font=small, anchor="rm")
    draw.rectangle([LEFT, TOP, LEFT + pw, TOP + ph], outline="black")
    draw.text((LEFT + pw / 2, 12), title, fill="black", font=big, anchor="mt")
    draw.text((LEFT + pw / 2, HEIGHT - 22), xlabel, fill="black", font=small, anchor="mt")
    _vertical_text(img, (16, TOP + ph / 2), ylabel, small)

    for i, s in enumerate(series):
        color = COLORS[i % len(COLORS)]
        line = [(px(x), py(y)) for x, y in zip(s["x"], s["y"]) if y is not None and (xscale != "log" or x > 0)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        elif line:
            draw.ellipse([line[0][0] - 3, line[0][1] - 3, line[0][0] + 3, line[0][1] + 3], fill=color)
        ly = TOP + ph - 18 * (len(series) - i)
        draw.line([(LEFT + pw - 200, ly), (LEFT + pw - 175, ly)], fill=color, width=3)
        draw.text((LEFT + pw - 168, ly), s.get("label", ""), fill="black", font=small, anchor="lm")
    img.save(path, format="PNG")
