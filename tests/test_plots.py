"""The figures np_jax draws: legible at a glance (size, scales, labels), checked on the returned
`Figure` objects and on the PNGs written. Synthetic inputs where the plot only draws them; the
memory ledger of a real mapping for the card heat map."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba

from models.config import get_config
from np_jax import plots
from np_jax.appliance.mapping import map_model
from np_jax.spec import GPU_POINTS

MIN_WIDTH_PX = 1200


@pytest.fixture(scope="module")
def mapping():
    return map_model(get_config("granite-3b-northpole"), "w4a4", users=28, context=2048)


def png_width(path) -> int:
    data = open(path, "rb").read(24)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big")  # IHDR: width, then height


def px_width(fig) -> float:
    return fig.get_size_inches()[0] * fig.dpi


# --- synthetic inputs ------------------------------------------------------------------------------

PRED = {"latency_ms": 0.99, "energy_tok_s_W": 42.0, "throughput_tok_s_card": 1770.0, "model": "granite-3b-northpole",
        "precision": "w4a4", "users": 28}
CURVE = [{"users": u, "latency_ms": 0.88 + u / 300, "energy_tok_s_W": 1.5 * u, "throughput_tok_s_card": 63.0 * u}
         for u in (2, 4, 8, 14)] + [PRED]


def metrics(n, first=1, seed=0):
    rng = np.random.default_rng(seed)
    return [{"step": first + i, "ce": float(3 + np.exp(-i / 8) + rng.normal(0, 0.2))} for i in range(n)]


def sweep(seed=0, n=400, bound=1.0):
    """A design sweep shaped like np_jax.cost.dse.sweep's result, with its Pareto front found by
    brute force."""
    rng = np.random.default_rng(seed)
    params = {"clock_hz": rng.choice([300e6, 600e6, 1e9], n), "sram_per_core_bytes": rng.choice([512.0, 768.0], n) * 1024,
              "n_cores": rng.choice([196.0, 256.0], n), "users": rng.choice([8.0, 28.0], n),
              "micro_batches": rng.choice([7.0, 14.0], n)}
    lat = np.exp(rng.uniform(np.log(0.3), np.log(10), n))
    energy = np.exp(rng.uniform(0, np.log(100), n))
    margin = rng.uniform(-1e5, 1e5, n)
    feas = (margin >= 0) & (lat <= bound) & (params["micro_batches"] <= params["users"])
    idx = np.flatnonzero(feas)
    front = [i for i in idx if not any(lat[j] <= lat[i] and energy[j] >= energy[i] and (lat[j], energy[j]) !=
                                       (lat[i], energy[i]) for j in idx)]
    front.sort(key=lambda i: lat[i])
    row = lambda i: {"params": {k: float(v[i]) for k, v in params.items()},  # noqa: E731
                     "metrics": {"latency_ms": float(lat[i]), "energy_tok_s_W": float(energy[i])}}
    return {"names": list(params), "params": params, "feasible": feas, "n_designs": n, "n_feasible": int(feas.sum()),
            "objective": "energy_tok_s_W", "latency_bound_ms": bound, "pareto": [row(i) for i in front],
            "metrics": {"latency_ms": lat, "energy_tok_s_W": energy, "fits_margin_bytes": margin}}


# --- every figure ------------------------------------------------------------------------------------

def test_every_figure_is_wide_and_titled(mapping, tmp_path):
    figs = [plots.card_figure(mapping, 0), *plots.perf_figures(PRED, CURVE).values(),
            plots.pareto_figure(sweep(), model="granite-3b-northpole w4a4"), plots.loss_figure(metrics(20))]
    for fig in figs:
        assert px_width(fig) >= MIN_WIDTH_PX
        titles = [fig.get_suptitle()] + [ax.get_title() for ax in fig.axes]
        assert any(t.strip() for t in titles)
        for ax in fig.axes:
            if ax.get_xlabel():  # every axis with data says what it is in, with a unit
                assert "(" in ax.get_xlabel() or "step" in ax.get_xlabel()
                assert "(" in ax.get_ylabel()
    # the written PNGs have the figures' size
    assert png_width(plots.plot_card(mapping, 0, tmp_path / "card")) >= MIN_WIDTH_PX
    assert png_width(plots.plot_loss(metrics(5), tmp_path / "loss.png")) >= MIN_WIDTH_PX
    for p in plots.plot_figures(PRED, tmp_path / "perf", curve=CURVE):
        assert png_width(p) >= MIN_WIDTH_PX
    assert png_width(plots.plot_pareto(sweep(), tmp_path / "dse", model="m")) >= MIN_WIDTH_PX


# --- the card heat map ---------------------------------------------------------------------------

def check_card(m, card):
    fig = plots.card_figure(m, card)
    heat, bars = fig.axes[0], fig.axes[2]
    mem = m.cards[card].memory
    cap = mem.capacity_bytes / 1024
    (im,) = heat.images
    assert im.get_clim() == (0.0, cap)  # colour = fullness: 0 to the core's capacity
    np.testing.assert_allclose(im.get_array(), mem.used_RxC / 1024)
    # the stacked bars, by kind, add up to each row's mean use in the ledger
    widths = np.zeros(mem.used_RxC.shape[0])
    for patch in bars.patches:
        widths[round(patch.get_y() + patch.get_height() / 2)] += patch.get_width()
    np.testing.assert_allclose(widths, mem.used_RxC.mean(axis=1) / 1024, rtol=1e-9)
    # every core labelled with its KiB, legibly
    labels = [t for t in heat.texts]
    assert len(labels) == mem.used_RxC.size and min(t.get_fontsize() for t in labels) >= 8
    assert sorted(int(t.get_text()) for t in labels) == sorted(np.rint(mem.used_RxC.ravel() / 1024).astype(int))
    return fig


def test_card_heat_map_scale_runs_from_zero_to_capacity(mapping):
    fig = check_card(mapping, 0)
    title = fig.get_suptitle()
    assert "layer 0" in title and "layers: layers" not in title
    assert "weights" in " ".join(t.get_text() for t in fig.axes[2].get_legend().get_texts())
    out = check_card(mapping, len(mapping.cards) - 1)
    assert "output layer" in out.get_suptitle()


def test_card_over_capacity_is_shown_on_the_same_scale():
    m = map_model(get_config("granite-3b-northpole"), "a8c8w4", users=28, context=2048, strict=False)
    card = next(c.card for c in m.cards if c.memory is not None and (c.memory.used_RxC > c.memory.capacity_bytes).any())
    fig = check_card(m, card)
    over = int((m.cards[card].memory.used_RxC > m.cards[card].memory.capacity_bytes).sum())
    assert f"over capacity: {over} cores" in fig.axes[0].get_legend().get_texts()[0].get_text()


@settings(max_examples=6)
@given(users=st.integers(1, 28), context=st.sampled_from([128, 512, 2048]), card=st.integers(0, 15))
def test_card_scale_property(users, context, card):
    m = map_model(get_config("smollm2-135m"), "w4a4", users=users, context=context, strict=False)
    card %= len(m.cards)
    if m.cards[card].memory is None:
        with pytest.raises(ValueError, match="nothing to plot"):
            plots.card_figure(m, card)
    else:
        check_card(m, card)


# --- Figs. 1-2 ----------------------------------------------------------------------------------

def series_colours(ax) -> dict[str, tuple]:
    out = {}
    for c in ax.collections:
        fc = c.get_facecolors()
        out[c.get_label()] = tuple(fc[0]) if len(fc) else tuple(c.get_edgecolors()[0])
    for line in ax.get_lines():
        out[line.get_label()] = to_rgba(line.get_color())
    return out


def test_perf_figures_read_at_a_glance():
    figs = plots.perf_figures(PRED, CURVE)
    for fname, key, _, _ in plots.PERF_FIGURES:
        fig = figs[fname]
        ax = fig.axes[0]
        colours = series_colours(ax)
        shown = [p for p in GPU_POINTS.values() if (p.energy_tok_s_w if key == "energy_tok_s_W" else
                                                    p.throughput_tok_s_card) is not None]
        gpu = [lbl for lbl in colours if any(lbl.startswith(f"{p.name} {p.gpu}") for p in shown)]
        assert len(gpu) == len(shown)
        assert len(set(colours.values())) == len(colours)  # every series its own colour
        # the users curve: each point labelled with its number of users
        texts = [t.get_text() for t in ax.texts]
        for c in CURVE:
            assert f"{c['users']} users" in texts
        # a point the paper gives no value for is named in a note, not silently dropped
        note = " ".join(t.get_text() for t in fig.texts)
        for p in GPU_POINTS.values():
            assert (p in shown) != (f"{p.name} {p.gpu}" in note)
        assert "better" in texts
        # the NorthPole points sit clear of the left edge (log axis, axes fraction)
        lo, hi = (math.log10(v) for v in ax.get_xlim())
        assert (math.log10(min(c["latency_ms"] for c in CURVE)) - lo) / (hi - lo) > 0.1
        # log axes labelled between the decades too
        for axis in (ax.xaxis, ax.yaxis):
            fmt = axis.get_minor_formatter()
            vmin, vmax = sorted(axis.get_view_interval())
            locs = [v for v in axis.get_minor_locator()() if vmin <= v <= vmax]
            assert any(fmt(v, i) for i, v in enumerate(locs))
    assert any("P4" in t.get_text() for t in figs["fig1_energy_vs_latency.png"].texts)  # P4: no energy figure


# --- the Pareto front ---------------------------------------------------------------------------

@settings(max_examples=4)
@given(seed=st.integers(0, 2**16))
def test_pareto_figure_names_model_objective_and_front(seed):
    sw = sweep(seed)
    fig = plots.pareto_figure(sw, model="granite-3b-northpole w4a4")
    title = fig.get_suptitle()
    assert "granite-3b-northpole w4a4" in title and plots.OBJECTIVE_LABELS["energy_tok_s_W"] in title
    # memory- and latency-infeasible designs in colours of their own, counted in the legend
    m, p, feas = sw["metrics"], sw["params"], sw["feasible"]
    memory = ~feas & (m["fits_margin_bytes"] < 0)
    mb = ~feas & ~memory & (p["micro_batches"] > p["users"])
    latency = ~feas & ~memory & ~mb
    colours = series_colours(fig.axes[0])
    expected = {"does not fit in core memory": memory, "more micro-batches than users": mb, "fits, but latency": latency,
                "feasible": feas}
    for name, mask in expected.items():
        labels = [lbl for lbl in colours if lbl.startswith(name)]
        assert labels == ([f"{lbl.split(' (')[0]} ({int(mask.sum()):,})" for lbl in labels] if mask.any() else [])
    assert len(set(colours.values())) == len(colours)
    # every front design numbered on the enlarged plot and listed with its parameters
    front = sw["pareto"]
    numbers = sorted(int(t.get_text()) for t in fig.axes[1].texts if t.get_text().isdigit())
    assert numbers == list(range(1, len(front) + 1))
    table = " ".join(t.get_text() for t in fig.texts)
    for i, d in enumerate(front, 1):
        assert f"{d['params']['clock_hz'] / 1e6:.4g}" in table and f"{d['metrics']['latency_ms']:.3f}" in table


# --- the loss curve -----------------------------------------------------------------------------

@settings(max_examples=12)
@given(n=st.integers(1, 400), first=st.integers(1, 5000))
def test_loss_steps_are_labelled_with_integers(n, first):
    ax = plots.loss_figure(metrics(n, first)).axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_validation_points_are_drawn_at_their_steps_with_kl_on_a_second_axis():
    rows = [{"step": s, "nll": 3.5 - 0.01 * s, "kl": 0.2 + 0.001 * s, "windows": 8} for s in (0, 5, 10)]
    fig = plots.loss_figure(metrics(10), held_out=rows, evals={"held-out NLL, float model": 3.0})
    ax, kl_ax = fig.axes
    val = next(ln for ln in ax.get_lines() if ln.get_label().startswith("validation cross-entropy (8 windows"))
    assert list(val.get_xdata()) == [0, 5, 10] and list(val.get_ydata()) == [r["nll"] for r in rows]
    assert [list(ln.get_ydata()) for ln in kl_ax.get_lines()] == [[r["kl"] for r in rows]]
    assert ax.get_xlim()[0] < 0 < 10 < ax.get_xlim()[1]  # step 0 (before training) in view
    assert not ax.texts  # no value labels beside the second axis's ticks: the legend has them
    without_kl = plots.loss_figure(metrics(10), held_out=[{k: v for k, v in r.items() if k != "kl"} for r in rows])
    assert len(without_kl.axes) == 1


def test_loss_reference_lines_stay_visible_when_they_coincide():
    evals = {"held-out NLL, w4a4 post-training quantized (plain)": 3.0, "held-out NLL, float model": 3.0,
             "held-out NLL, this run at step 4 (QAT w4a4)": 3.001}
    fig = plots.loss_figure(metrics(4), title="t", evals=evals)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    refs = [lines[f"{k}: {v:.3f}"] for k, v in evals.items()]
    # each its own colour, each drawn narrower than the one under it...
    colours = [to_rgba(ln.get_color()) for ln in refs]
    assert len(set(colours)) == 3
    widths = [ln.get_linewidth() for ln in refs]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 3
    # ...so that every one of them shows in the rendered image, though they coincide
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box = ax.get_window_extent()  # the plot area only: not the legend, not the value labels
    image = np.asarray(canvas.buffer_rgba())[::-1, :, :3]  # rows from the bottom, as display coordinates
    pixels = image[int(box.y0) + 3:int(box.y1) - 3, int(box.x0) + 3:int(box.x1) - 3].reshape(-1, 3).astype(int)
    for c in colours:
        assert (np.abs(pixels - np.round(np.array(c[:3]) * 255)).max(axis=1) <= 2).sum() > 100
    # the value labels at the right edge moved apart
    at = sorted(t.get_position()[1] for t in ax.texts)
    assert all(b - a >= 0.05 - 1e-9 for a, b in zip(at, at[1:]))
    with pytest.raises(ValueError, match="no training metrics"):
        plots.loss_figure([])
