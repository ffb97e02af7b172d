"""Every PNG np_jax draws, in one place: a card's per-core memory, the HPEC24-style Figs. 1-2,
the design-space Pareto front, and a training loss curve.

Figures are about 1000 x 700 pixels, with titles, units on every axis, and legends; matplotlib
runs headless (Agg). Each function writes one file (or two) and returns the path(s) written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from np_jax.spec import APPLIANCE, GPU_POINTS, PUBLISHED_RUN

DPI = 120


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png_path(path: str | os.PathLike) -> Path:
    """`path` with a .png suffix (added when missing), its folder created."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        p = p.with_name(p.name + ".png")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def plot_card(mapping, card: int, path: str | os.PathLike) -> str:
    """A 16 x 16 heat map of one card's per-core memory use (KiB), on a colour scale spanning the
    cores' own range (so small differences show), each core annotated with its KiB; the title
    gives the range against the 768 KiB capacity and the bytes by kind."""
    plt = _plt()
    plan = mapping.cards[card]
    if plan.memory is None:
        raise ValueError(f"card {card} is {'idle' if plan.role == 'idle' else 'not memory-planned'}: nothing to plot")
    used = plan.memory.used_RxC / 1024
    cap = plan.memory.capacity_bytes / 1024
    lo, hi = float(used.min()), float(used.max())
    fig, ax = plt.subplots(figsize=(8.4, 7.0))
    im = ax.imshow(used, cmap="viridis", vmin=lo, vmax=hi if hi > lo else lo + 1)
    fig.colorbar(im, ax=ax, label=f"KiB used per core (capacity {cap:.0f} KiB)")
    rows, cols = used.shape
    if rows * cols <= 256:
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, f"{used[r, c]:.0f}", ha="center", va="center", fontsize=5.5,
                        color="white" if used[r, c] < (lo + hi) / 2 else "black")
    over = np.argwhere(used > cap)
    if len(over):
        ax.scatter(over[:, 1], over[:, 0], marker="x", s=60, color="red", label="over capacity")
        ax.legend(loc="upper right")
    kinds = plan.memory.bytes_by_kind()
    desc = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in kinds.items())
    what = f"layers {plan.layers[0]}-{plan.layers[-1]}" if plan.layers else (
        f"vocabulary {plan.vocab_slice[0]}-{plan.vocab_slice[1]}" if plan.vocab_slice else plan.role)
    ax.set_title(f"{mapping.model} {mapping.policy}, card {card} ({plan.role}: {what})\n"
                 f"per-core use {lo:.1f}-{hi:.1f} KiB of {cap:.0f} KiB ({100 * hi / cap:.1f} % at the fullest core)\n"
                 f"{desc}", fontsize=9)
    ax.set_xlabel("core column")
    ax.set_ylabel("core row")
    fig.tight_layout()
    out = _png_path(path)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return str(out)


def plot_figures(pred: dict, out_dir: str | os.PathLike, curve: list[dict] | None = None) -> list[str]:
    """Write `fig1_energy_vs_latency.png` and `fig2_throughput_vs_latency.png` to `out_dir`:
    NorthPole (predicted, and HPEC24's measured row) beside the GPU points, log axes. `curve`:
    optional further NorthPole predictions (e.g. a sweep over users) drawn as a line."""
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    r = PUBLISHED_RUN
    pub = {"latency_ms": r.latency_ms, "energy_tok_s_W": r.energy_tok_s_w,
           "throughput_tok_s_card": r.system_throughput_tok_s / APPLIANCE.cards}
    paths = []
    for fname, key, ylabel, title in (
            ("fig1_energy_vs_latency.png", "energy_tok_s_W", "energy metric (tokens/s/W)", "Energy metric vs latency"),
            ("fig2_throughput_vs_latency.png", "throughput_tok_s_card", "throughput per card (tokens/s/card)",
             "Throughput per card vs latency")):
        fig, ax = plt.subplots(figsize=(8.0, 5.8))
        colors = {"H100": "tab:green", "A100": "tab:orange", "L4": "tab:purple"}
        for p in GPU_POINTS.values():
            y = p.energy_tok_s_w if key == "energy_tok_s_W" else p.throughput_tok_s_card
            if y is None:
                continue
            ax.scatter(p.latency_ms, y, s=50, color=colors.get(p.gpu, "gray"), zorder=3)
            ax.annotate(f"{p.name} {p.gpu}", (p.latency_ms, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
        if curve:
            pts = sorted(curve, key=lambda c: c["latency_ms"])
            ax.plot([c["latency_ms"] for c in pts], [c[key] for c in pts], "-", color="tab:blue", lw=1.2, alpha=0.6,
                    label="NorthPole predicted, other numbers of users")
            ax.scatter([c["latency_ms"] for c in pts], [c[key] for c in pts], s=14, color="tab:blue", alpha=0.6)
        ax.scatter(pub["latency_ms"], pub[key], marker="s", s=80, facecolors="none", edgecolors="k", zorder=4,
                   label="NorthPole HPEC24 (measured)")
        ax.scatter(pred["latency_ms"], pred[key], marker="*", s=160, color="tab:red", zorder=5,
                   label="NorthPole predicted (this model)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("latency (ms/token, per user)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {pred.get('model', '')} {pred.get('precision', '')}", fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=9, loc="best")
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=DPI)
        plt.close(fig)
        paths.append(path)
    return paths


OBJECTIVE_LABELS = {
    "energy_tok_s_W": "energy metric (tokens/s/W)",
    "space_tok_s_per_transistor": "space metric (tokens/s per transistor)",
    "system_throughput_tok_s": "system throughput (tokens/s)",
    "throughput_tok_s_card": "throughput per card (tokens/s/card)",
}


def plot_pareto(sweep_result: dict, path: str | os.PathLike, search: dict | None = None,
                baseline: dict | None = None) -> str:
    """Scatter of the swept designs (feasible in colour) with the Pareto front, log axes."""
    plt = _plt()
    obj = sweep_result["objective"]
    m = sweep_result["metrics"]
    feas = sweep_result["feasible"]
    fig, ax = plt.subplots(figsize=(8.0, 5.8))
    ax.scatter(m["latency_ms"][~feas], m[obj][~feas], s=4, color="0.8", label="infeasible (memory / latency)")
    ax.scatter(m["latency_ms"][feas], m[obj][feas], s=6, color="tab:blue", alpha=0.5, label="feasible")
    front = sweep_result["pareto"]
    if front:
        ax.plot([p["metrics"]["latency_ms"] for p in front], [p["metrics"][obj] for p in front], "-o", ms=3,
                color="tab:red", lw=1.4, label="Pareto front")
    if baseline is not None:
        ax.scatter(baseline["latency_ms"], baseline[obj], marker="s", s=70, facecolors="none", edgecolors="k",
                   zorder=5, label="published design")
    if search is not None:
        sp = search["snapped"]["metrics"]
        ax.scatter(sp["latency_ms"], sp[obj], marker="*", s=160, color="tab:green", zorder=6,
                   label="gradient search (snapped)")
    ax.axvline(sweep_result["latency_bound_ms"], color="k", ls=":", lw=0.9, label="latency bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("latency (ms/token, per user)")
    ax.set_ylabel(OBJECTIVE_LABELS.get(obj, obj))
    ax.set_title(f"Design-space sweep: {sweep_result['n_designs']:,} designs, {sweep_result['n_feasible']:,} feasible; "
                 f"latency bound {sweep_result['latency_bound_ms']} ms", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    out = _png_path(path)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return str(out)


def plot_loss(metrics: list[dict], path: str | os.PathLike, title: str = "", smooth: int = 10,
              evals: dict[str, float] | None = None) -> Path:
    """Training cross-entropy vs optimizer step (raw and a moving average); `evals`: horizontal
    reference lines (e.g. held-out NLLs), in nats/token."""
    plt = _plt()
    if not metrics:
        raise ValueError("no training metrics to plot")
    steps = np.array([r["step"] for r in metrics])
    loss = np.array([r["ce"] for r in metrics])
    fig, ax = plt.subplots(figsize=(8.0, 4.8))
    ax.plot(steps, loss, lw=0.8, alpha=0.4, color="C0", label="training cross-entropy (per step)")
    if len(loss) >= smooth > 1:
        k = np.ones(smooth) / smooth
        ax.plot(steps[smooth - 1:], np.convolve(loss, k, "valid"), lw=1.8, color="C0", label=f"{smooth}-step mean")
    for i, (name, v) in enumerate((evals or {}).items()):
        ax.axhline(v, ls="--", lw=1, color=f"C{i + 1}", label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=11)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = _png_path(path)
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out
