"""Performance, energy and space model (np_jax.cost), design-space exploration (np_jax.cost.dse),
scale-out planner, and the `perf`/`dse`/`plan` commands."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.config import get_config
from np_jax import cost
from np_jax.cost import dse
from np_jax.chip.array import Tiling, array_vmm_cost
from np_jax.appliance.mapping import map_model
from np_jax.spec import APPLIANCE, GPU_POINTS, PUBLISHED_RUN

G3B = get_config("granite-3b-northpole")
S3B = cost.ModelShape.from_decoder(G3B)
TRACES = []  # one entry per trace (compilation) of EVAL


def _evaluate(d, w, b, s):
    TRACES.append(s.name)
    return cost.evaluate(d, w, b, s)


EVAL = jax.jit(_evaluate)


def ev(d=None, w=None, b=None):
    return {k: float(v) for k, v in EVAL(d or cost.Design(), w or cost.Workload(), b or cost.Bits(), S3B).items()
            if jnp.ndim(v) == 0}


@pytest.fixture(scope="module")
def published():
    return cost.predict(G3B, "w4a4")


# --- formulas on hand-computed cases -------------------------------------------------------------

def test_schedule_hand_computed():
    # 2 layer stages of 100 us (sum 200 us), output layer 50 us, PCIe 1 GB/s + 1 us, host 10 us,
    # frames 1000 B/token, logits 2000 B/token; N = 4 users in M = 2 micro-batches of 2.
    d = cost.Design(pcie_bytes_s=1e9, pcie_latency_s=1e-6, host_s_per_microbatch=10e-6)
    w = cost.Workload(users=4.0, micro_batches=2.0, prompt_tokens=8.0, gen_tokens=11.0, cards=3.0)
    dec = cost.Stages(jnp.float32(200e-6), jnp.float32(100e-6), jnp.float32(50e-6))
    pre = cost.Stages(jnp.float32(400e-6), jnp.float32(200e-6), jnp.float32(50e-6))
    out = cost.schedule(d, w, n_stages=2.0, output_cards=1.0, dec=dec, pre=pre, chunk=4.0,
                        frame_bytes_per_token=1000.0, logits_bytes_per_token=2000.0)
    # decode: hops host->c0, c0->c1 (2 x (2000 B / 1e9 + 1 us) = 6 us), c1->head (3 us),
    # logits back (4000 B: 5 us) + host 10 us -> R = 200 + 50 + 6 + 3 + 5 + 10 = 274 us;
    # busy = 100 us; step = max(2 x 100, 274) = 274 us; 10 steps after the first token.
    assert float(out["inter_token_ms"]) == pytest.approx(0.274, rel=1e-5)
    assert float(out["token_gen_time_s"]) == pytest.approx(10 * 274e-6, rel=1e-5)
    # prefill: chunk 4 -> 2 passes x 2 micro-batches of 8 tokens (frames of 8000 B: 9 us a hop);
    # R = 400 + 2 x 9 + 3 + 50 + 5 + 10 = 486 us, busy = 200 us -> (4 - 1) x 200 + 486 = 1086 us
    assert float(out["prefill_passes"]) == 2
    assert float(out["prompt_time_s"]) == pytest.approx(1086e-6, rel=1e-5)
    t_sys = 4 * 11 / (1086e-6 + 2740e-6)
    assert float(out["system_throughput_tok_s"]) == pytest.approx(t_sys, rel=1e-5)
    assert float(out["throughput_tok_s_card"]) == pytest.approx(t_sys / 3, rel=1e-5)
    assert float(out["latency_ms"]) == pytest.approx(1e3 * 4 / t_sys, rel=1e-5)
    assert float(out["energy_tok_s_W"]) == pytest.approx(t_sys / 3 / 42.0, rel=1e-5)
    assert float(out["space_tok_s_per_transistor"]) == pytest.approx(t_sys / 3 / 22e9, rel=1e-4)
    # throughput-bound when M x busy exceeds the round trip
    out = cost.schedule(d, w.replace(micro_batches=1.0, users=2.0), n_stages=2.0, output_cards=1.0,
                        dec=cost.Stages(jnp.float32(200e-6), jnp.float32(100e-6), jnp.float32(50e-6)), pre=pre,
                        chunk=4.0, frame_bytes_per_token=1000.0, logits_bytes_per_token=2000.0)
    assert float(out["decode_throughput_bound"]) == 0.0


def test_layer_vmm_counts_match_the_core_array_cost():
    d = cost.Design()
    ph = cost.layer_phases(S3B, cost.Bits(), d, b=2, mb=2, users=28, context=2048, t=1536)
    qkv = sum(array_vmm_cost(2, Tiling(*G3B.layer_matrices()[m]), x_bits=4, w_bits=4).cycles
              for m in ("attn.q", "attn.k", "attn.v"))
    qkv_i, down_i = cost.PHASE_NAMES.index("qkv"), cost.PHASE_NAMES.index("down")
    assert float(ph.vmm_cycles[qkv_i]) == pytest.approx(qkv)
    down = array_vmm_cost(2, Tiling(*G3B.layer_matrices()["mlp.down"]), x_bits=4, w_bits=4)
    assert float(ph.vmm_cycles[down_i]) == pytest.approx(down.cycles)
    # per-core weight bytes read = the busiest core's block (Tiling.bytes_on_chip) + its bias
    t = Tiling(*G3B.layer_matrices()["mlp.down"])
    assert float(ph.sram_cycles[down_i]) * d.sram_bytes_per_cycle_per_core == pytest.approx(
        t.bytes_on_chip(4).max() + 2 * t.nb)
    # 13 TB/s at 400 MHz over 256 cores
    assert d.sram_bytes_per_cycle_per_core == pytest.approx(13e12 / 256 / 400e6)


def test_resident_bytes_match_the_mapping_ledger():
    m = map_model(G3B, "w4a4", users=28, context=2048)
    ph = cost.layer_phases(S3B, cost.Bits(), cost.Design(), b=2, mb=2, users=28, context=2048, t=1536)
    scratch = 2 * cost.scratch_bytes_per_token(S3B, cost.Bits(), cost.Design())
    fullest = m.cards[0].memory.fullest_core()[1]
    assert float(jnp.sum(ph.resident_bytes) + scratch) == pytest.approx(fullest, abs=64)  # norms spread: <64 B apart
    st_ = cost.mapping_structure(m)
    assert (st_["n_stages"], st_["layers_max"], st_["output_cards"], st_["out_cols"]) == (14, 1, 2, 24576)


@pytest.mark.parametrize("name,users", [("granite-3b-northpole", 28), ("smollm2-135m", 8), ("granite-3.3-8b", 4)])
def test_relaxed_head_cards_match_the_mapper(name, users):
    from np_jax.appliance.mapping import output_cards_needed
    from np_jax.quant import get_policy

    cfg = get_config(name)
    for prec in ("w4a4", "w8a8"):
        h, cols, need = cost.output_cards_relaxed(cost.ModelShape.from_decoder(cfg), cost.Bits.from_policy(prec),
                                                cost.Design(), 2.0)
        assert int(h) == output_cards_needed(cfg, get_policy(prec), 2) and float(need) <= cost.Design().sram_per_core_bytes


def test_reference_design_power_transistors_and_bits():
    d = cost.Design()
    assert float(d.transistors()) == pytest.approx(APPLIANCE.chip.transistors, rel=1e-6)
    assert float(d.power_w_per_card()) == pytest.approx(42.0, rel=1e-6)
    assert float(d.replace(clock_hz=800e6).power_w_per_card()) > 42.0
    assert cost.Bits.from_policy("w4a4") == cost.Bits(4, 4, 4, 4, 8, 8)
    assert cost.Bits.from_policy("a8c8w4") == cost.Bits(4, 8, 8, 8, 8, 8)
    with pytest.raises(ValueError, match="integers"):
        cost.Bits.from_policy("float")
    for name, f in cost.parameters().items():
        assert f["source"], name  # every parameter names its source


def test_ceil_ste_and_pack_layer():
    x = jnp.float32(2.3)
    assert float(cost.ceil_ste(x)) == 3.0 and float(cost.floor_ste(x)) == 2.0
    assert float(jax.grad(cost.ceil_ste)(x)) == 1.0
    # phases of 60, 30, 50 bytes (work 6, 3, 10 cycles, latency 1) on cards of 70 bytes:
    # card 0: 60 + 10 of 30 (work 1), card 1: 20 of 30 (work 2) + 50 -> [6+1 + 1+1, 2+1 + 10+1]
    assert cost.pack_layer([60, 30, 50], [6, 3, 10], 70, 1) == pytest.approx([9, 14])


# --- the calibrated model against HPEC24 -----------------------------------------------------------

def test_reproduces_the_published_northpole_row(published):
    res = cost.published_comparison(published)
    assert set(res) == {"system_throughput_tok_s", "latency_ms", "energy_tok_s_W", "space_tok_s_per_1e9_transistors"}
    for k, r in res.items():
        assert abs(r["residual"]) < 0.02, (k, r)
    assert published["fits"] and published["cards"] == 16 and published["micro_batches"] == 14
    # the GPU ratios the paper states follow from the prediction (within their rounding)
    for row in cost.gpu_table(published):
        for key, stated in row["stated_ratios"].items():
            assert row[f"ratio_{key}"] == pytest.approx(stated, rel=0.05), (row["point"], key)


def test_calibration_recovers_the_stored_parameter():
    lat = cost.calibrate(G3B, iters=30)
    assert lat == pytest.approx(cost.CALIBRATED_PHASE_LATENCY_CYCLES, rel=2e-3)


def test_relaxed_model_equals_the_mapping_model_at_the_published_point(published):
    r = ev()
    for k in ("system_throughput_tok_s", "latency_ms", "inter_token_ms", "prompt_time_s"):
        assert r[k] == pytest.approx(published[k], rel=1e-4), k
    assert r["fits"] == 1.0 and r["output_cards"] == 2 and r["layers_per_card"] == 1


def test_sensible_answers_when_inputs_change(published):
    p = lambda **kw: cost.predict(G3B, "w4a4", **kw)
    # HPEC24: M equal to the layer stages keeps the pipeline busy; fewer or more is slower
    m1, m7, m28 = p(micro_batches=1), p(micro_batches=7), p(micro_batches=28)
    assert published["system_throughput_tok_s"] > max(m1["system_throughput_tok_s"], m7["system_throughput_tok_s"],
                                                      m28["system_throughput_tok_s"])
    # fewer users: less throughput, and no worse latency
    few = p(users=14)
    assert few["system_throughput_tok_s"] < published["system_throughput_tok_s"]
    assert few["latency_ms"] <= published["latency_ms"]
    # an 8-bit KV cache at 28 users x 2048 does not fit (spec sec. 3): flagged, with the reason
    a8 = cost.predict(G3B, "a8c8w4")
    assert not a8["fits"] and "card 0" in a8["error"]
    # a smaller model is faster per token at the same users
    small = cost.predict(get_config("smollm2-135m"), "w4a4", users=28)
    assert small["fits"] and small["layer_ms_decode"] < published["layer_ms_decode"]
    # in the same context, more generated tokens amortise the prefill: throughput rises
    short = p(gen_tokens=256, context=2048)
    assert short["system_throughput_tok_s"] < published["system_throughput_tok_s"]
    # a 3072-position KV cache still fits, but leaves no core memory for prefill chunks: 1 token a
    # pass, and the prompt takes far longer; 4096 positions do not fit at all
    long = p(gen_tokens=2048, context=3072)
    assert long["fits"] and long["prefill_chunk"] == 1 and long["prompt_time_s"] > 5 * published["prompt_time_s"]
    assert not p(gen_tokens=3072, context=4096)["fits"]


def test_predict_rejects_bad_input():
    with pytest.raises(ValueError, match="users"):
        cost.predict(G3B, users=0)
    with pytest.raises(ValueError, match="context"):
        cost.predict(G3B, context=100)
    with pytest.raises(ValueError, match="integers"):
        cost.predict(G3B, "float")
    with pytest.raises(ValueError, match="micro-batches"):
        cost.predict(G3B, users=28, micro_batches=5)


# --- monotonicity ------------------------------------------------------------------------------------

designs = st.fixed_dictionaries({
    "clock_hz": st.floats(150e6, 1.2e9), "sram_per_core_bytes": st.floats(256 * 1024, 2 * 2**20),
    "n_cores": st.sampled_from([144.0, 196.0, 256.0, 324.0]), "pcie_bytes_s": st.floats(1e9, 64e9),
    "pcie_latency_s": st.floats(0.0, 20e-6)})
workloads = st.fixed_dictionaries({
    "users": st.sampled_from([4.0, 8.0, 14.0, 28.0, 56.0]), "micro_batches": st.sampled_from([1.0, 2.0, 4.0]),
    "prompt_tokens": st.sampled_from([64.0, 512.0, 1024.0]), "gen_tokens": st.sampled_from([16.0, 1024.0]),
    "cards": st.sampled_from([8.0, 16.0, 24.0])})


@settings(max_examples=25)
@given(designs, workloads, st.floats(1.01, 3.0))
def test_faster_clock_never_raises_latency(dp, wp, factor):
    d, w = cost.Design(**dp), cost.Workload(**wp)
    slow, fast = ev(d, w), ev(d.replace(clock_hz=dp["clock_hz"] * factor), w)
    assert fast["latency_ms"] <= slow["latency_ms"] * (1 + 1e-5)


@settings(max_examples=25)
@given(designs, workloads, st.floats(1.01, 4.0))
def test_more_pcie_bandwidth_or_less_pcie_latency_never_raises_latency(dp, wp, factor):
    d, w = cost.Design(**dp), cost.Workload(**wp)
    base = ev(d, w)["latency_ms"]
    assert ev(d.replace(pcie_bytes_s=dp["pcie_bytes_s"] * factor), w)["latency_ms"] <= base * (1 + 1e-5)
    assert ev(d.replace(pcie_latency_s=dp["pcie_latency_s"] / factor), w)["latency_ms"] <= base * (1 + 1e-5)


@settings(max_examples=25)
@given(designs, workloads, st.floats(1.0, 3.0))
def test_more_memory_per_core_never_stops_a_fitting_design_fitting(dp, wp, factor):
    d, w = cost.Design(**dp), cost.Workload(**wp)
    small = ev(d, w)
    big = ev(d.replace(sram_per_core_bytes=dp["sram_per_core_bytes"] * factor), w)
    if small["fits"]:
        assert big["fits"]
    # more memory never needs more output-layer cards (so never fewer layer cards)
    assert big["output_cards"] <= small["output_cards"] and big["layers_per_card"] <= small["layers_per_card"]
    if (big["output_cards"], big["layers_per_card"]) == (small["output_cards"], small["layers_per_card"]):
        # same structure: every byte added is a byte of margin
        added = dp["sram_per_core_bytes"] * (factor - 1)
        assert big["fits_margin_bytes"] == pytest.approx(small["fits_margin_bytes"] + added, rel=1e-4, abs=1.0)


@settings(max_examples=10)
@given(st.sampled_from([8, 14, 28]), st.sampled_from([512, 1024, 2048]), st.floats(1.0, 1.5))
def test_more_memory_per_core_keeps_the_real_mapping_fitting(users, context, factor):
    chip = APPLIANCE.chip
    app = dataclasses.replace(APPLIANCE, chip=dataclasses.replace(chip, core_sram_bytes=int(chip.core_sram_bytes * factor)))
    base = map_model(G3B, "w4a4", users=users, context=context, strict=False)
    bigger = map_model(G3B, "w4a4", users=users, context=context, appliance=app, strict=False,
                       output_cards=len(base.output_cards))
    assert bigger.fits or not base.fits


@settings(max_examples=15)
@given(workloads, st.sampled_from([1.5, 2.0, 4.0]))
def test_longer_context_never_helps_fitting(wp, factor):
    w = cost.Workload(**wp)
    ctx = wp["prompt_tokens"] + wp["gen_tokens"]
    a, b = ev(w=w.replace(context=ctx)), ev(w=w.replace(context=ctx * factor))
    assert b["fits_margin_bytes"] <= a["fits_margin_bytes"] + 1e-6


# --- gradients ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["clock_hz", "pcie_bytes_s", "pcie_latency_s", "host_s_per_microbatch",
                                  "phase_latency_cycles", "sram_bytes_per_cycle_per_core"])
def test_grad_matches_finite_differences(name):
    d0 = cost.Design()

    def log_tsys(logp):
        out = cost.evaluate(d0.replace(**{name: jnp.exp(logp)}), cost.Workload(), cost.Bits(), S3B)
        return jnp.log(out["system_throughput_tok_s"])

    x = jnp.log(jnp.float32(getattr(d0, name)))
    g = float(jax.grad(log_tsys)(x))
    h = 1e-2
    fd = (float(log_tsys(x + h)) - float(log_tsys(x - h))) / (2 * h)
    assert g == pytest.approx(fd, rel=2e-2, abs=1e-4)
    assert np.isfinite(g)


# The next three tests call the search functions as `np-jax dse --grid small --steps 60 --starts 3`
# does (test_cli_plan_and_dse_json, later in this file): the command then finds their programs in
# the suite's compilation cache.

def test_sensitivities_signs():
    s = dse.sensitivities(G3B, bits=cost.Bits.from_policy("w4a4"))
    t = s["system_throughput_tok_s"]
    assert t["clock_hz"] > 0 and t["pcie_latency_s"] < 0 and t["phase_latency_cycles"] < 0 and t["users"] > 0
    # a relaxed (traced) width is not checked against the chip's widths: it stays differentiable
    assert t["bits.w"] < 0
    assert s["latency_ms"]["clock_hz"] == pytest.approx(-t["clock_hz"], rel=1e-4)


# --- design-space exploration -------------------------------------------------------------------------

def test_sweep_evaluates_every_design_and_finds_the_pareto_front():
    r = dse.sweep(G3B, dse.SMALL_GRID, latency_bound_ms=1.2, bits=cost.Bits.from_policy("w4a4"))
    assert r["n_designs"] == 48 and r["designs_per_s"] > 0
    lat, en = r["metrics"]["latency_ms"], r["metrics"]["energy_tok_s_W"]
    # the published design is one of the grid points: the vmapped result equals a single evaluation
    d = cost.Design()
    i = next(i for i in range(48) if tuple(float(r["params"][n][i]) for n in r["names"]) == (
        400e6, float(np.float32(d.sram_per_core_bytes)), float(d.n_cores), 28.0, 14.0))
    assert lat[i] == pytest.approx(ev()["latency_ms"], rel=1e-5)
    best = r["best"]["metrics"]["energy_tok_s_W"]
    assert best == pytest.approx(en[r["feasible"]].max())
    front = r["pareto"]
    assert all(a["metrics"]["latency_ms"] <= b["metrics"]["latency_ms"] and
               a["metrics"]["energy_tok_s_W"] < b["metrics"]["energy_tok_s_W"] for a, b in zip(front, front[1:]))
    f = r["feasible"]
    for p in front:  # nothing feasible dominates a front point
        pl, pe = p["metrics"]["latency_ms"], p["metrics"]["energy_tok_s_W"]
        assert not np.any(f & (lat < pl * (1 - 1e-6)) & (en > pe * (1 + 1e-6)))


def test_pareto_front_hand_case():
    lat = np.array([1.0, 2.0, 3.0, 1.5, 2.5])
    val = np.array([1.0, 3.0, 2.0, 0.5, 4.0])
    assert dse.pareto_front(lat, val).tolist() == [0, 1, 4]


def test_gradient_search_improves_on_the_published_design_within_its_constraints():
    r = dse.gradient_search(G3B, steps=60, starts=3, latency_bound_ms=1.0, bits=cost.Bits.from_policy("w4a4"))
    base = ev()["energy_tok_s_W"]
    c = r["continuous"]
    assert c["feasible"] and c["metrics"]["latency_ms"] <= 1.0 and c["metrics"]["fits_margin_bytes"] >= 0
    assert c["metrics"]["energy_tok_s_W"] > base
    assert r["loss_history"][-1] < r["loss_history"][0]
    s = r["snapped"]["params"]
    assert s["users"] == round(s["users"]) and s["users"] % s["micro_batches"] == 0
    assert math.isqrt(int(s["n_cores"])) ** 2 == s["n_cores"]
    for n, (lo, hi) in dse.DEFAULT_BOUNDS.items():
        if n in c["params"]:
            assert lo * 0.999 <= c["params"][n] <= hi * 1.001
    with pytest.raises(ValueError, match="objective"):
        dse.gradient_search(G3B, objective="speed")


# --- planner -----------------------------------------------------------------------------------------

def test_planner_uses_the_fewest_cards_that_fit():
    for name, prec in (("granite-3.3-8b", "a8c8w4"), ("llama-70b", "a8c8w4"), ("granite-3b-northpole", "w4a4")):
        r = cost.plan_instance(get_config(name), prec, micro_batches=28 if "70b" in name else None)
        room = r["core_bytes"] - r["micro_batch_size"] * float(cost.scratch_bytes_per_token(
            cost.ModelShape.from_decoder(get_config(name)), cost.Bits.from_policy(prec), cost.Design()))
        k = r["cards_per_layer"]
        assert r["layer_bytes_per_core"] / k <= room  # fits
        assert k == 1 or r["layer_bytes_per_core"] / (k - 1) > room  # one card fewer would not
        assert r["cards_per_instance"] * r["instances"] <= r["total_cards"] < r["cards_per_instance"] * (r["instances"] + 1)
    # the 3B at 16 cards per instance stays inside one server: no Ethernet hop
    assert cost.plan_instance(G3B, "w4a4")["ethernet_hops"] == 0
    with pytest.raises(ValueError, match="does not fit|needs"):
        cost.plan_instance(get_config("llama-70b"), "a8c8w4", total_cards=64)


# --- command line ------------------------------------------------------------------------------------

def test_cli_perf_json_and_plots(tmp_path, capsys):
    from np_jax.cli import main

    assert main(["perf", "--json", "--plot", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("system_throughput_tok_s", "throughput_tok_s_card", "latency_ms", "energy_tok_s_W",
              "space_tok_s_per_transistor"):
        assert isinstance(out[k], float)
    assert out["system_throughput_tok_s"] == pytest.approx(PUBLISHED_RUN.system_throughput_tok_s, rel=0.02)
    assert [r["point"] for r in out["table"]] == list(GPU_POINTS)
    assert len(out["plots"]) == 2
    for p in out["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_cli_perf_text_and_errors(capsys):
    from np_jax.cli import main

    assert main(["perf", "--users", "14"]) == 0
    text = capsys.readouterr().out
    assert "Table I" in text and "P2 H100" in text
    assert main(["perf", "--users", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("np-jax perf: error:") and "\n" not in err


def test_cli_plan_and_dse_json(tmp_path, capsys):
    from np_jax.cli import main

    assert main(["plan", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("cards_per_instance", "instances", "latency_ms", "throughput_tok_s_instance"):
        assert k in out
    png = tmp_path / "pareto.png"
    assert main(["dse", "--json", "--grid", "small", "--steps", "60", "--starts", "3", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sweep"]["n_designs"] == 48 and out["sweep"]["designs_per_s"] > 0
    assert "continuous" in out["gradient_search"] and "sensitivities" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_design_and_workload_reject_impossible_values_but_not_tracers():
    with pytest.raises(ValueError, match="Design.clock_hz must be finite and > 0, got -400000000.0"):
        cost.Design(clock_hz=-4e8)
    with pytest.raises(ValueError, match="Workload.users"):
        cost.Workload(users=0)
    with pytest.raises(ValueError, match="Design"):
        cost.Design(clock_hz=float("nan"))
    # under jit/grad the fields are tracers: not checked, the DSE differentiates through them
    g = jax.grad(lambda c: EVAL(cost.Design(clock_hz=c), cost.Workload(), cost.Bits(),
                                S3B)["system_throughput_tok_s"])(4e8)
    assert np.isfinite(g) and g > 0
    with pytest.raises(ValueError, match="Design.clock_hz must be a number, got 'fast'"):
        cost.Design(clock_hz="fast")
    with pytest.raises(ValueError, match="Workload.micro_batches must be <= users"):
        cost.Workload(users=2, micro_batches=28)
    # a fractional micro-batch size is the relaxation the DSE searches: accepted
    assert cost.Workload(users=14, micro_batches=4).micro_batch_size == 3.5
    for bad in (0, -4, 3.0, 16):
        with pytest.raises(ValueError, match=r"Bits.w must be one of \(2, 4, 8\)"):
            cost.Bits(w=bad)
    # JAX rebuilds records with placeholder leaves (None, masks, abstract values): not checked
    jax.tree.map(lambda x: x < 0, cost.Design())
    jax.tree.map(lambda x: np.ones(2, bool), cost.Bits())
    jax.tree.map(lambda x: None, cost.Workload(users=2.0, micro_batches=1.0))
    jax.eval_shape(lambda b: b, cost.Bits())


@settings(max_examples=60)
@given(st.sampled_from([f.name for f in dataclasses.fields(cost.Bits) if f.name not in cost.Bits.FLAGS]),
       st.one_of(st.integers(-9, 17), st.floats(allow_nan=True, allow_infinity=True)))
def test_bits_accept_exactly_the_chips_widths(field, width):
    if width in (2, 4, 8):
        assert getattr(cost.Bits(**{field: width}), field) == width
    else:
        with pytest.raises(ValueError, match=f"Bits.{field}"):
            cost.Bits(**{field: width})


@settings(max_examples=30)
@given(st.sampled_from(cost.Bits.FLAGS), st.one_of(st.integers(-3, 3), st.floats(allow_nan=True, allow_infinity=True)))
def test_dynamic_steps_are_flags_charged_one_max_per_value(name, flag):
    if flag not in (0, 1):
        with pytest.raises(ValueError, match=f"Bits.{name} must be 0 or 1"):
            cost.Bits(**{name: flag})
        return
    kw = dict(b=2, mb=2, users=28, context=2048, t=1536)
    d = cost.Design()
    base = cost.layer_phases(S3B, cost.Bits(), d, **kw)
    dyn = cost.layer_phases(S3B, cost.Bits(**{name: flag}), d, **kw)
    extra = np.asarray(dyn.vector_cycles) - np.asarray(base.vector_cycles)
    s = cost.ModelShape.from_decoder(S3B)
    # one max per probability, or per element of each token's input vector, spread over the cores
    k_in = {"probs_dynamic": s.n_heads * kw["t"], "attn_x_dynamic": s.d_model, "o_x_dynamic": s.q_dim,
            "mlp_x_dynamic": s.d_model, "down_x_dynamic": s.d_ff}[name]
    want = flag * kw["b"] * k_in / d.n_cores / d.vector_ops_per_cycle_per_core
    assert np.count_nonzero(extra) == (1 if flag else 0)
    assert float(extra.sum()) == pytest.approx(want, rel=1e-6)


def test_the_policy_says_which_steps_are_dynamic():
    assert all(getattr(cost.Bits.from_policy("w8a8"), f) == 0.0 for f in cost.Bits.FLAGS)
    pdd = cost.Bits.from_policy("w8a8-pdd")
    assert [f for f in cost.Bits.FLAGS if getattr(pdd, f)] == ["probs_dynamic", "down_x_dynamic"]
    dyn = cost.Bits.from_policy("w8a8-dyn")
    assert [f for f in cost.Bits.FLAGS if getattr(dyn, f)] == ["attn_x_dynamic", "o_x_dynamic", "mlp_x_dynamic",
                                                              "down_x_dynamic"]


@settings(max_examples=60)
@given(st.floats(0.5, 1e4), st.floats(0.5, 1e4))
def test_workload_accepts_micro_batches_up_to_the_users(users, micro_batches):
    if micro_batches <= users:
        assert cost.Workload(users=users, micro_batches=micro_batches).micro_batch_size >= 1.0
    else:
        with pytest.raises(ValueError, match="micro_batches"):
            cost.Workload(users=users, micro_batches=micro_batches)


def test_model_name_is_no_part_of_the_compiled_programs_key():
    renamed = dataclasses.replace(S3B, name="granite-3b-renamed")
    assert renamed == S3B and hash(renamed) == hash(S3B) and renamed.name != S3B.name
    args = (cost.Design(), cost.Workload(), cost.Bits())
    first = EVAL(*args, S3B)
    n = len(TRACES)
    again = EVAL(*args, renamed)
    assert len(TRACES) == n  # the cost model was not traced (compiled) again for the new name
    assert float(again["latency_ms"]) == float(first["latency_ms"])
    # other dimensions are another program (a cheap function: the cache key alone is under test)
    seen = []
    key = jax.jit(lambda x, s: (seen.append(s.name), x * s.n_layers)[1])
    key(1.0, S3B), key(1.0, renamed)
    assert len(seen) == 1
    key(1.0, dataclasses.replace(S3B, n_layers=S3B.n_layers + 1))
    assert len(seen) == 2


def _refuse_work(*_, **__):
    pytest.fail("the command worked before refusing its input")


@pytest.mark.parametrize("argv,says", [
    (["dse", "--steps", "1000000000"], "limit of 10,000,000 value-and-gradient evaluations"),
    (["dse", "--starts", "1000000000"], "limit of 1,024"),
    (["dse", "--steps", str(dse.MAX_EVALUATIONS // 8 + 1)], "steps x starts"),
    (["dse", "--seed", str(2**63)], "64-bit"),
    (["plan", "--cards", "1000000000"], "limit of 288 (the largest published NorthPole system"),
    (["plan", "--cards", "32", "--cards-per-server", "33"], "limit of 32"),
    (["plan", "--gen-tokens", "0"], "--gen-tokens: must be >= 1"),
    (["plan", "--prompt-tokens", "0"], "--prompt-tokens: must be >= 1"),
    (["dse", "--plot", "{file}/pareto.png"], "cannot write the plot"),
    (["perf", "--plot", "{file}/plots"], "cannot write the plot"),
])
def test_cli_refuses_oversized_or_unwritable_requests_before_any_work(argv, says, tmp_path, capsys, monkeypatch):
    from np_jax.cli import main
    from np_jax.commands import perf as perf_cmd

    for mod, name in ((cost, "evaluate"), (cost, "plan_instance"), (dse, "sweep"), (dse, "gradient_search"),
                      (perf_cmd, "_predict")):
        monkeypatch.setattr(mod, name, _refuse_work)
    (tmp_path / "file").write_text("a file, not a folder")
    assert main([a.format(file=tmp_path / "file") for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"np-jax {argv[0]}: error:") and "\n" not in err and says in err, err


def test_search_limits_are_inclusive():
    kw = dict(objective="energy_tok_s_W", latency_bound_ms=1.0)
    dse.check_search(**kw, steps=dse.MAX_EVALUATIONS // dse.MAX_STARTS, starts=dse.MAX_STARTS)
    dse.check_search(**kw, steps=dse.MAX_EVALUATIONS, starts=1, seed=2**63 - 1)
    for bad in (dict(starts=dse.MAX_STARTS + 1), dict(steps=dse.MAX_EVALUATIONS + 1), dict(seed=-2**63 - 1)):
        with pytest.raises(ValueError):
            dse.check_search(**kw, **bad)


@pytest.mark.parametrize("command", ["perf", "dse", "plan"])
def test_help_states_every_default_and_the_choices(command):
    from np_jax.cli import build_parser
    from np_jax.cli import PRECISIONS
    from np_jax.quant.policy import POLICIES, get_policy

    assert set(PRECISIONS) == {n for n in POLICIES if not get_policy(n).is_float}
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    fmt = parser.formatter_class(parser.prog)
    for a in parser._actions:
        if a.option_strings and a.nargs != 0:  # flags that take a value
            assert "default" in fmt._get_help_string(a) % {**vars(a), "prog": parser.prog}, a.dest
    text = parser.format_help()
    for name in ("--precision", "--model"):
        assert all(p in text for p in PRECISIONS) and "granite-3b-northpole" in text, name
