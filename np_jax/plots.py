"""Every PNG np_jax draws, in one place: a card's per-core memory, the HPEC24-style Figs. 1-2,
the design-space Pareto front, and a training loss curve.

Each figure has a `*_figure` function that builds it and returns the matplotlib `Figure`, and a
`plot_*` function that writes it and returns the path(s) written. Figures are built with the
object-oriented API (no pyplot state, nothing to close; PNGs render with Agg), are at least
1200 pixels wide, and carry a title, units on every axis and a legend.
"""

from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path

import numpy as np

from np_jax.spec import APPLIANCE, GPU_POINTS, PUBLISHED_RUN

DPI = 120

# How each kind of core-memory allocation (np_jax.chip.memory.Allocation.kind) is drawn.
KIND_STYLE = {"weights": ("weights", "tab:blue"), "kv_cache": ("KV cache", "tab:orange"),
              "activations": ("activations", "tab:green"), "other": ("other", "tab:gray")}

# GPU points, in GPU_POINTS order: a colour and a marker each, none shared with NorthPole's
# (blue curve, red star, black square).
GPU_STYLES = [("tab:purple", "o"), ("tab:green", "D"), ("tab:orange", "^"), ("tab:brown", "v"),
              ("tab:pink", "P"), ("tab:olive", "X"), ("tab:cyan", "s")]

OBJECTIVE_LABELS = {
    "energy_tok_s_W": "energy metric (tokens/s/W)",
    "space_tok_s_per_transistor": "space metric (tokens/s per transistor)",
    "system_throughput_tok_s": "system throughput (tokens/s)",
    "throughput_tok_s_card": "throughput per card (tokens/s/card)",
}

OBJECTIVE_COLUMNS = {"energy_tok_s_W": ("energy", "tok/s/W"), "space_tok_s_per_transistor": ("space", "tok/s/tr."),
                     "system_throughput_tok_s": ("throughput", "tok/s"),
                     "throughput_tok_s_card": ("per card", "tok/s/card")}

# Design parameters of the sweep, as the Pareto table prints them: heading, divisor, unit.
PARAM_COLUMNS = {"clock_hz": ("clock", 1e6, "MHz"), "sram_per_core_bytes": ("SRAM/core", 1024, "KiB"),
                 "n_cores": ("cores", 1, ""), "users": ("users", 1, ""), "micro_batches": ("M", 1, "")}


def _figure(width_in: float, height_in: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=DPI)


def _png_path(path: str | os.PathLike) -> Path:
    """`path` with a .png suffix (added when missing), its folder created."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        p = p.with_name(p.name + ".png")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _save(fig, path: str | os.PathLike) -> Path:
    """Write `fig` as a PNG with a 256-colour palette: a few colours and their anti-aliased edges
    fit in it, and the file is about a third of an RGBA one (these PNGs are committed in docs/)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    out = _png_path(path)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    image = Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB")
    image.quantize(256, dither=0).save(out, optimize=True)  # 0: no dithering, flat colours stay flat
    return out


def _log_axis(axis) -> None:
    """Log scale labelled in plain numbers at each decade and, smaller, in between: at 2x and 5x,
    or at every minor tick where the axis spans less than a decade. A reader should not have to
    interpolate a whole decade by eye."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    def minor(v, _):
        lo, hi = sorted(axis.get_view_interval())
        lead = round(v / 10 ** math.floor(math.log10(v) + 1e-9))
        return f"{v:,g}" if hi < 10 * lo or lead in (2, 5) else ""

    axis.set_major_locator(LogLocator(base=10))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,g}"))
    axis.set_minor_locator(LogLocator(base=10, subs=np.arange(2, 10)))
    axis.set_minor_formatter(FuncFormatter(minor))
    axis.set_tick_params(which="minor", labelsize=8)
    axis.set_tick_params(which="major", labelsize=10)


def _log_limits(values, pad: float = 2.0) -> tuple[float, float]:
    """Log-axis limits around positive `values`, `pad` times beyond the extremes on each side."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x) and x > 0], float)
    return float(v.min()) / pad, float(v.max()) * pad


def _better_arrow(ax, xy_data) -> None:
    """An arrow labelled "better" pointing to lower x and higher y, put where the data is sparsest."""
    to_axes = ax.transData + ax.transAxes.inverted()
    pts = to_axes.transform(np.asarray(xy_data, float).reshape(-1, 2))
    pts = pts[np.isfinite(pts).all(axis=1)]
    cands = np.array([(x, y) for x in np.linspace(0.18, 0.9, 10) for y in np.linspace(0.1, 0.8, 10)])
    # the arrow spans its candidate point (tail, with the text) to 0.08 left and 0.1 up (head)
    mid = cands + np.array([-0.04, 0.05])
    clearance = np.min(np.hypot(mid[:, None, 0] - pts[None, :, 0], mid[:, None, 1] - pts[None, :, 1]), axis=1,
                       initial=np.inf)
    x, y = cands[int(np.argmax(clearance))]
    ax.annotate("better", xy=(x - 0.08, y + 0.1), xytext=(x, y), xycoords="axes fraction", textcoords="axes fraction",
                ha="left", va="top", fontsize=10, fontweight="bold", color="0.25",
                arrowprops=dict(arrowstyle="-|>,head_width=0.4,head_length=0.8", lw=2, color="0.25"))


# --- a card's memory --------------------------------------------------------------------------------

def _card_holds(mapping, card: int) -> str:
    plan = mapping.cards[card]
    if plan.parts:
        return f"part of layer {plan.layers[0]}"
    if plan.layers:
        a, b = plan.layers[0], plan.layers[-1]
        return f"layer {a}" if a == b else f"layers {a}-{b}"
    if plan.vocab_slice:
        a, b = plan.vocab_slice
        return f"output layer, vocabulary entries {a:,}-{b - 1:,}"
    return plan.role


def card_figure(mapping, card: int):
    """One card's cores: a heat map of each core's memory use on a colour scale from 0 to the
    core's capacity (colour = fullness), each core labelled with its KiB, and beside it, per
    core row, the mean KiB per core split into weights, KV cache and activations."""
    from matplotlib import colormaps

    plan = mapping.cards[card]
    if plan.memory is None:
        raise ValueError(f"card {card} is {'idle' if plan.role == 'idle' else 'not memory-planned'}: nothing to plot")
    mem = plan.memory
    used = mem.used_RxC / 1024
    cap = mem.capacity_bytes / 1024
    rows, cols = used.shape
    fig = _figure(14.0, 8.4)
    ax = fig.add_axes((0.045, 0.2, 0.4, 0.66))
    cax = fig.add_axes((0.455, 0.2, 0.013, 0.66))
    bars = fig.add_axes((0.6, 0.2, 0.38, 0.66))

    im = ax.imshow(used, cmap=colormaps["viridis"].with_extremes(over="tab:red"), vmin=0.0, vmax=cap)
    ticks = np.linspace(0, cap, 5)
    cb = fig.colorbar(im, cax=cax, ticks=ticks, extend="max" if (used > cap).any() else "neither")
    cb.ax.set_yticklabels([f"{t:.0f} ({100 * t / cap:.0f} %)" for t in ticks])
    cb.set_label(f"KiB used per core (of {cap:.0f} KiB)")
    if rows * cols <= 256:
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, f"{used[r, c]:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if used[r, c] < 0.6 * cap or used[r, c] > cap else "black")
    if (used > cap).any():
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="tab:red", label=f"over capacity: {int((used > cap).sum())} cores")],
                  loc="upper center", bbox_to_anchor=(0.5, -0.1), fontsize=9)
    ax.set_xlabel("core column (core index)")
    ax.set_ylabel("core row (core index)")
    ax.set_title("KiB used per core", fontsize=10)

    by_kind: dict[str, np.ndarray] = {}
    for a in mem.allocations:
        by_kind[a.kind] = by_kind.get(a.kind, 0) + a.bytes_RxC / 1024
    y = np.arange(rows)
    left = np.zeros(rows)
    for kind in sorted(by_kind, key=lambda k: list(KIND_STYLE).index(k) if k in KIND_STYLE else len(KIND_STYLE)):
        name, color = KIND_STYLE.get(kind, (kind, None))
        row_mean = by_kind[kind].mean(axis=1)
        bars.barh(y, row_mean, left=left, height=0.75, color=color,
                  label=f"{name}: {by_kind[kind].sum() / 1024:.1f} MiB on the card")
        left += row_mean
    bars.scatter(used.max(axis=1), y, marker="|", s=140, color="black", zorder=3, label="fullest core of the row")
    bars.axvline(cap, color="tab:red", lw=1.5, ls="--", label=f"capacity {cap:.0f} KiB per core")
    bars.set_ylim(rows - 0.5, -0.5)  # row 0 on top, as in the heat map
    bars.set_yticks(y[::2] if rows > 16 else y)
    bars.set_xlim(0, max(cap, used.max()) * 1.08)
    bars.set_xlabel(f"memory per core (KiB), mean over the row's {cols} cores")
    bars.set_ylabel("core row (core index)")
    bars.set_title("what fills each row", fontsize=10)
    bars.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    bars.grid(axis="x", alpha=0.3)

    lo, hi = float(used.min()), float(used.max())
    fig.suptitle(f"{mapping.model} {mapping.policy}, card {card} of {len(mapping.cards)}: {_card_holds(mapping, card)}\n"
                 f"fullest core {hi:.1f} KiB of {cap:.0f} KiB ({100 * hi / cap:.1f} %), emptiest {lo:.1f} KiB; "
                 f"card total {mem.used_RxC.sum() / 2**20:.1f} MiB of {mem.capacity_bytes * used.size / 2**20:.0f} MiB",
                 fontsize=11)
    return fig


def plot_card(mapping, card: int, path: str | os.PathLike) -> str:
    """Write `card_figure(mapping, card)` to `path` (.png added when missing); returns the path."""
    return str(_save(card_figure(mapping, card), path))


# --- HPEC24 Figs. 1-2 ------------------------------------------------------------------------------

PERF_FIGURES = (("fig1_energy_vs_latency.png", "energy_tok_s_W", "energy metric (tokens/s/W)",
                 "Energy metric vs latency"),
                ("fig2_throughput_vs_latency.png", "throughput_tok_s_card", "throughput per card (tokens/s/card)",
                 "Throughput per card vs latency"))


def perf_figures(pred: dict, curve: list[dict] | None = None) -> dict:
    """HPEC24-style Figs. 1 and 2, file name -> `Figure`: NorthPole (predicted, and HPEC24's
    measured row) beside the GPU points, log axes. `curve`: further NorthPole predictions (e.g.
    other numbers of users) drawn as a line, each point labelled with its users."""
    r = PUBLISHED_RUN
    pub = {"latency_ms": r.latency_ms, "energy_tok_s_W": r.energy_tok_s_w,
           "throughput_tok_s_card": r.system_throughput_tok_s / APPLIANCE.cards}
    figs = {}
    for fname, key, ylabel, title in PERF_FIGURES:
        fig = _figure(12.0, 7.0)
        ax = fig.add_axes((0.07, 0.13, 0.6, 0.8))
        xy, missing = [], []
        for i, p in enumerate(GPU_POINTS.values()):
            color, marker = GPU_STYLES[i % len(GPU_STYLES)]
            y = p.energy_tok_s_w if key == "energy_tok_s_W" else p.throughput_tok_s_card
            if y is None:
                missing.append(p)
                continue
            ax.scatter(p.latency_ms, y, s=70, color=color, marker=marker, zorder=3,
                       label=textwrap.fill(f"{p.name} {p.gpu}: {p.meaning}", 48))
            ax.annotate(f"{p.name} {p.gpu}", (p.latency_ms, y), textcoords="offset points", xytext=(7, 5), fontsize=9)
            xy.append((p.latency_ms, y))
        if curve:
            pts = sorted(curve, key=lambda c: c["users"])
            ax.plot([c["latency_ms"] for c in pts], [c[key] for c in pts], "-o", ms=4, color="tab:blue", lw=1.2,
                    alpha=0.8, label="NorthPole predicted, other numbers of users")
            for c in pts:
                ax.annotate(f"{c['users']} users", (c["latency_ms"], c[key]), textcoords="offset points",
                            xytext=(-10, 0), ha="right", va="center", fontsize=9, color="tab:blue")
                xy.append((c["latency_ms"], c[key]))
        ax.scatter(pub["latency_ms"], pub[key], marker="s", s=110, facecolors="none", edgecolors="k", lw=1.5,
                   zorder=4, label=f"NorthPole HPEC24, measured ({r.users} users)")
        ax.scatter(pred["latency_ms"], pred[key], marker="*", s=200, color="tab:red", zorder=5,
                   label=f"NorthPole predicted, this run ({pred.get('users', '?')} users)")
        xy += [(pub["latency_ms"], pub[key]), (pred["latency_ms"], pred[key])]
        ax.set_xscale("log")
        ax.set_yscale("log")
        xs, ys = zip(*xy)
        ax.set_xlim(*_log_limits(xs, 2.5))  # room for the users labels left of the NorthPole curve
        ax.set_ylim(*_log_limits(ys, 1.8))
        _log_axis(ax.xaxis)
        _log_axis(ax.yaxis)
        ax.set_xlabel("latency (ms/token, per user)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {pred.get('model', '')} {pred.get('precision', '')}", fontsize=12)
        ax.grid(True, which="major", alpha=0.4)
        ax.grid(True, which="minor", alpha=0.15)
        _better_arrow(ax, xy)
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.03, 1.0), borderaxespad=0.0, labelspacing=0.9)
        if missing:
            fig.text(0.07, 0.025, "Not shown: " + "; ".join(
                f"{p.name} {p.gpu} ({p.meaning}): HPEC24 gives no {ylabel.split(' (')[0]} for it" for p in missing)
                + ".", fontsize=9, style="italic")
        figs[fname] = fig
    return figs


def plot_figures(pred: dict, out_dir: str | os.PathLike, curve: list[dict] | None = None) -> list[str]:
    """Write `perf_figures(pred, curve)` into `out_dir`; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    return [str(_save(fig, os.path.join(out_dir, fname))) for fname, fig in perf_figures(pred, curve).items()]


# --- design-space Pareto front ----------------------------------------------------------------------

def _infeasible_kinds(sweep_result: dict) -> list[tuple[str, str, np.ndarray]]:
    """The infeasible designs by first reason: core memory, then micro-batches > users, then
    latency (over the bound or not finite). (label, colour, mask); the masks cover every
    infeasible design once."""
    m, p, feas = sweep_result["metrics"], sweep_result["params"], np.asarray(sweep_result["feasible"])
    memory = ~feas & (np.asarray(m["fits_margin_bytes"]) < 0)
    mb = np.zeros_like(feas)
    if "micro_batches" in p and "users" in p:
        mb = ~feas & ~memory & (np.asarray(p["micro_batches"]) > np.asarray(p["users"]))
    latency = ~feas & ~memory & ~mb
    bound = sweep_result["latency_bound_ms"]
    return [("does not fit in core memory", "#f2a65a", memory),
            ("more micro-batches than users", "#b39ddb", mb),
            (f"fits, but latency over {bound:g} ms", "0.72", latency)]


def pareto_figure(sweep_result: dict, *, model: str, search: dict | None = None, baseline: dict | None = None):
    """The swept designs (feasible in blue, infeasible coloured by reason) with the Pareto front,
    log axes: all of them on the left, the front enlarged on the right with its designs
    numbered, and the numbered designs' parameters listed beside it. `model`: what was swept,
    for the title (e.g. "granite-3b-northpole w4a4")."""
    obj = sweep_result["objective"]
    m = sweep_result["metrics"]
    feas = np.asarray(sweep_result["feasible"])
    lat, val = np.asarray(m["latency_ms"]), np.asarray(m[obj])
    ok = np.isfinite(lat) & np.isfinite(val) & (lat > 0) & (val > 0)
    front = sweep_result["pareto"]
    bound = sweep_result["latency_bound_ms"]
    every = max(1, math.ceil(len(front) / 36))  # the table beside the plots holds about 36 rows
    numbered = list(enumerate(front, 1))[::every]
    fig = _figure(18.0, 8.4)
    ax = fig.add_axes((0.045, 0.09, 0.33, 0.78))
    zoom = fig.add_axes((0.425, 0.09, 0.33, 0.78)) if front else None
    for a in filter(None, (ax, zoom)):
        for label, color, mask in _infeasible_kinds(sweep_result):
            if mask.any():
                a.scatter(lat[mask], val[mask], s=5, color=color, lw=0, label=f"{label} ({int(mask.sum()):,})")
        a.scatter(lat[feas], val[feas], s=7, color="tab:blue", lw=0, label=f"feasible ({int(feas.sum()):,})")
        if front:
            a.plot([p["metrics"]["latency_ms"] for p in front], [p["metrics"][obj] for p in front], "-o", ms=3.5,
                   color="tab:red", lw=1.6, zorder=4, label=f"Pareto front ({len(front)} designs)")
        if baseline is not None:
            a.scatter(baseline["latency_ms"], baseline[obj], marker="s", s=80, facecolors="none", edgecolors="k",
                      lw=1.5, zorder=5, label="published design")
        if search is not None:
            sp = search["snapped"]["metrics"]
            a.scatter(sp["latency_ms"], sp[obj], marker="*", s=200, color="tab:green", zorder=6,
                      label="gradient search (snapped)")
        a.axvline(bound, color="k", ls=":", lw=1.0, label=f"latency bound {bound:g} ms")
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("latency (ms/token, per user)")
        a.set_ylabel(OBJECTIVE_LABELS.get(obj, obj))
        a.grid(True, which="major", alpha=0.4)
        a.grid(True, which="minor", alpha=0.15)
    ax.set_xlim(*_log_limits([*lat[ok], bound], 1.15))
    ax.set_ylim(*_log_limits(val[ok], 1.3))
    ax.set_title(f"all {sweep_result['n_designs']:,} designs swept, {sweep_result['n_feasible']:,} feasible", fontsize=10)
    _better_arrow(ax, np.column_stack([lat[ok], val[ok]]))
    leg = fig.legend(*ax.get_legend_handles_labels(), fontsize=8.5, loc="upper left", bbox_to_anchor=(0.775, 0.87))
    for h in leg.legend_handles:
        if hasattr(h, "set_sizes") and max(h.get_sizes(), default=0) < 20:
            h.set_sizes([30])  # the designs' dots, legible in the legend
    if zoom is not None:
        fx = [p["metrics"]["latency_ms"] for p in front] + [bound]
        fy = [p["metrics"][obj] for p in front]
        for d in filter(None, (baseline, search and search["snapped"]["metrics"])):
            fx.append(d["latency_ms"])
            fy.append(d[obj])
        zoom.set_xlim(min(fx) / 1.06, max(fx) * 1.04)
        zoom.set_ylim(min(fy) / 1.6, max(fy) * 1.3)
        zoom.set_title("the Pareto front enlarged; its designs numbered as in the table", fontsize=10)
        ax.indicate_inset_zoom(zoom, edgecolor="0.3")
        _number_front(zoom, [(p["metrics"]["latency_ms"], p["metrics"][obj], str(i)) for i, p in numbered],
                      avoid=list(zip(fx[len(front) + 1:], fy[len(front):])))
    for a in filter(None, (ax, zoom)):
        _log_axis(a.xaxis)
        _log_axis(a.yaxis)
    fig.suptitle(f"Design space of {model}: maximise {OBJECTIVE_LABELS.get(obj, obj)} subject to fitting in core "
                 f"memory and latency <= {bound:g} ms/token", fontsize=12, y=0.965)
    if not front:
        fig.text(0.59, 0.5, "no feasible design: no Pareto front", ha="center", fontsize=12, style="italic")
    if numbered:
        fig.text(0.775, 0.55, _front_table(sweep_result, numbered, every), family="monospace", fontsize=7.8,
                 va="top", ha="left")
    return fig


def _front_table(sweep_result: dict, numbered: list[tuple[int, dict]], every: int) -> str:
    """The numbered Pareto-front designs as a fixed-width table: parameters, latency, objective."""
    obj = sweep_result["objective"]
    names = [n for n in sweep_result["names"] if n in numbered[0][1]["params"]]
    cols = [("#", "", [str(i) for i, _ in numbered])]
    for n in names:
        head, div, unit = PARAM_COLUMNS.get(n, (n, 1, ""))
        cols.append((head, unit, [f"{p['params'][n] / div:.4g}" for _, p in numbered]))
    cols.append(("latency", "ms", [f"{p['metrics']['latency_ms']:.3f}" for _, p in numbered]))
    head, unit = OBJECTIVE_COLUMNS.get(obj, (obj, ""))
    cols.append((head, unit, [f"{p['metrics'][obj]:.4g}" for _, p in numbered]))
    widths = [max(len(h), len(u), *map(len, v)) for h, u, v in cols]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    rows = [line([h for h, _, _ in cols]), line([u for _, u, _ in cols])]
    rows += [line([v[i] for _, _, v in cols]) for i in range(len(numbered))]
    return ("Pareto-front designs" + (f" (every {every}th)" if every > 1 else "") + ", by latency:\n"
            + "\n".join(rows))


def _number_front(ax, points: list[tuple[float, float, str]], avoid: list[tuple[float, float]] = ()) -> None:
    """Label the points of a Pareto front (rising to the right) on its empty side: out along the
    front's normal, up and to the left, the dominated side being full of other designs. A label
    that would overlap earlier ones, a point, or a big marker at `avoid` moves further out,
    joined to its point by a leader line."""
    px = ax.transData.transform(np.array([(x, y) for x, y, _ in points], float))
    placed: list[tuple[float, float, float, float]] = [  # boxes to keep clear, pixels
        (x - r, y - r, x + r, y + r) for r, pts in ((4, px), (14, ax.transData.transform(np.reshape(avoid, (-1, 2)))))
        for x, y in pts]
    char_w, h = 0.62 * 8 * DPI / 72, 1.25 * 8 * DPI / 72
    for i, (x, y, text) in enumerate(points):
        tx, ty = px[min(i + 1, len(px) - 1)] - px[max(i - 1, 0)]
        nx, ny = (-ty, tx) if (tx, ty) != (0, 0) else (-1.0, 1.0)
        nx, ny = np.array([nx, ny]) / np.hypot(nx, ny) * (1 if ny >= 0 else -1)
        w = char_w * len(text) + 5  # a gap between neighbours
        for r in np.arange(10, 400, 4):
            cx, cy = px[i, 0] + nx * r, px[i, 1] + ny * r
            box = (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)
            if not any(b[0] < box[2] and box[0] < b[2] and b[1] < box[3] and box[1] < b[3] for b in placed):
                break
        placed.append(box)
        ax.annotate(text, (x, y), xytext=(cx - px[i, 0], cy - px[i, 1]), textcoords="offset pixels", ha="center",
                    va="center", fontsize=8, color="darkred", zorder=7,
                    arrowprops=dict(arrowstyle="-", lw=0.5, color="darkred", shrinkA=1, shrinkB=2))


def plot_pareto(sweep_result: dict, path: str | os.PathLike, *, model: str, search: dict | None = None,
                baseline: dict | None = None) -> str:
    """Write `pareto_figure(...)` to `path` (.png added when missing); returns the path."""
    return str(_save(pareto_figure(sweep_result, model=model, search=search, baseline=baseline), path))


# --- training loss ----------------------------------------------------------------------------------

# Reference lines, in the order given: colour, dash pattern, width. Each is drawn narrower than the
# one before it, so a line that coincides with an earlier one still shows inside it.
REFERENCE_STYLES = [("tab:red", (0, (7, 3)), 3.2), ("tab:orange", (0, (1.5, 1.5)), 2.2),
                    ("tab:green", (0, (8, 3, 2, 3)), 1.6), ("tab:purple", (0, (3, 2)), 1.2),
                    ("tab:brown", (0, (1, 3)), 1.0)]


def loss_figure(metrics: list[dict], title: str = "", smooth: int = 10, evals: dict[str, float] | None = None,
                held_out: list[dict] | None = None):
    """Training cross-entropy vs optimizer step (raw and a moving average); `evals`: horizontal
    reference lines (e.g. held-out NLLs, nats/token), each labelled at the right edge with its
    value, labels moved apart where the lines are close; `held_out`: validation rows (`step`,
    `nll`, `windows`; with `kl`, a second axis of it) drawn as points along the steps."""
    from matplotlib.ticker import MaxNLocator

    if not metrics:
        raise ValueError("no training metrics to plot")
    steps = np.array([r["step"] for r in metrics])
    loss = np.array([r["ce"] for r in metrics])
    fig = _figure(12.0, 7.0)
    ax = fig.add_axes((0.07, 0.25, 0.85, 0.67))
    ax.plot(steps, loss, "-o" if len(loss) < 30 else "-", ms=3, lw=0.9, alpha=0.45, color="C0",
            label="training cross-entropy, per step")
    if len(loss) >= smooth > 1:
        k = np.ones(smooth) / smooth
        ax.plot(steps[smooth - 1:], np.convolve(loss, k, "valid"), lw=2.0, color="C0",
                label=f"training cross-entropy, mean of the last {smooth} steps")
    twin = False
    if held_out:
        vs, vn = [r["step"] for r in held_out], [r["nll"] for r in held_out]
        # colours of their own: the reference lines take red, orange, green, purple and brown
        ax.plot(vs, vn, "s-", ms=5, lw=1.4, color="0.2",
                label=f"validation cross-entropy ({held_out[-1].get('windows', '?')} windows from the last held-out files)")
        twin = all(r.get("kl") is not None for r in held_out)
        if twin:
            ax2 = ax.twinx()
            ax2.plot(vs, [r["kl"] for r in held_out], "^--", ms=5, lw=1.2, color="tab:cyan")
            ax2.set_ylabel("validation KL(float base || model), nats/token", color="tab:cyan")
            ax2.tick_params(axis="y", colors="tab:cyan")
            ax.plot([], [], "^--", ms=5, lw=1.2, color="tab:cyan", label="validation KL to the float base (right axis)")
        steps = np.concatenate([steps, vs])
    refs = list((evals or {}).items())
    styles = [REFERENCE_STYLES[i % len(REFERENCE_STYLES)] for i in range(len(refs))]
    for (name, v), (color, dash, lw) in zip(refs, styles):
        ax.axhline(v, color=color, ls=dash, lw=lw, label=f"{name}: {v:.3f}")
    pad = max(1.0, 0.03 * (steps.max() - steps.min()))  # two whole steps in view at least: integer ticks
    ax.set_xlim(steps.min() - pad, steps.max() + pad)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "training loss", fontsize=12)
    ax.grid(alpha=0.3)
    ax.margins(y=0.08)
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2)
    if refs and not twin:
        # direct labels at the right edge, at least 5 % of the height apart, joined to their lines
        # (not beside a second axis's ticks: the legend has the values)
        lo, hi = ax.get_ylim()
        frac = [(v - lo) / (hi - lo) for _, v in refs]
        order = np.argsort(frac)
        at = np.array(frac, float)
        for a, b in zip(order, order[1:]):
            at[b] = max(at[b], at[a] + 0.05)
        at -= max(0.0, at.max() - 0.98)
        for a, b in zip(order[::-1], order[::-1][1:]):
            at[b] = min(at[b], at[a] - 0.05)
        for (name, v), (color, _, _), t in zip(refs, styles, at):
            ax.annotate(f"{v:.3f}", (1.0, v), xycoords=ax.get_yaxis_transform(), xytext=(1.005, t),
                        textcoords="axes fraction", va="center", fontsize=8.5, color=color,
                        arrowprops=dict(arrowstyle="-", lw=0.8, color=color, shrinkA=0, shrinkB=0))
    return fig


def plot_loss(metrics: list[dict], path: str | os.PathLike, title: str = "", smooth: int = 10,
              evals: dict[str, float] | None = None, held_out: list[dict] | None = None) -> Path:
    """Write `loss_figure(...)` to `path` (.png added when missing); returns the path."""
    return _save(loss_figure(metrics, title=title, smooth=smooth, evals=evals, held_out=held_out), path)
