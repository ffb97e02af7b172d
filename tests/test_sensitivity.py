"""Per-layer 8->4-bit sensitivity (models.sensitivity, np-jax sensitivity) on the tiny config.

Oracles: per-window gradients taken one window at a time with a loss written here (the Fisher
diagonal); the policy with one rule at 4 bits (the measurement's 8-bit-grid form of it);
scipy's Spearman correlation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image
from scipy.stats import spearmanr

from models import llama, sensitivity as S
from models.config import get_config
from np_jax.cli import main

CFG = get_config("tiny")


@pytest.fixture(scope="module")
def model():
    p = llama.init_params(CFG, jax.random.key(0))
    windows = np.asarray(jax.random.randint(jax.random.key(1), (3, 9), 0, CFG.vocab_size), np.int32)
    p = llama.calibrate(p, jnp.asarray(windows), CFG, "w8a8", method="mse")
    return p, windows


@pytest.fixture(scope="module")
def fisher(model):
    p, windows = model
    return S.fisher_diagonal(p, CFG, "w8a8", windows, batch_size=2)  # 3 windows: one padded batch


def test_fisher_is_mean_squared_per_window_gradient(model, fisher):
    p, windows = model

    def loss(params, toks):  # mean next-token NLL of one window
        logits = llama.forward(params, toks[None, :-1], CFG, "w8a8")[0]
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), toks[1:, None], 1))

    grad = jax.jit(jax.grad(loss))
    gs = [grad(p, jnp.asarray(w)) for w in windows]
    for r in S.ROLES:
        blk, lin, _ = r.split(".")
        want = np.mean([np.square(np.asarray(g["layers"][blk][lin]["w"], np.float64)) for g in gs], 0)
        np.testing.assert_allclose(fisher[r], want, rtol=2e-3, atol=1e-12 * want.max())
        assert want.max() > 0


def test_estimates_nonnegative_and_zero_where_codes_coincide(model, fisher):
    p, _ = model
    # layer 0's down projection on a 4-bit grid of step 2^-5, each column reaching code 7: its
    # MSE 4-bit step is that step, and its 8-bit step a sixteenth of it holds the same values
    w = np.asarray(p["layers"]["mlp"]["down"]["w"])
    codes = np.array(jax.random.randint(jax.random.key(2), w.shape[1:], -8, 8))
    codes[0] = 7
    grid = p["layers"]["mlp"]["down"]
    grid = {**grid, "w": grid["w"].at[0].set(codes * 2.0 ** -5), "s_w": grid["s_w"].at[0].set(2.0 ** -9)}
    q = {**p, "layers": {**p["layers"], "mlp": {**p["layers"]["mlp"], "down": grid}}}
    d, _, s4 = S.weight_deltas(grid["w"][0], grid["s_w"][0])
    np.testing.assert_array_equal(np.asarray(s4), 2.0 ** -5)
    assert not np.any(np.asarray(d))
    est = S.estimates(q, CFG, fisher, 8)
    assert est.shape == (CFG.n_layers, len(S.ROLES))
    assert np.all(est >= 0)
    assert est[0, S.ROLES.index("mlp.down.w")] == 0
    assert np.all(np.delete(est.ravel(), S.ROLES.index("mlp.down.w")) > 0)  # random weights: off any grid


@pytest.mark.parametrize("layer,role", [(0, "mlp.down.w"), (1, "attn.k.w")])
def test_lowered_is_the_policy_with_that_entry_at_4_bits(model, layer, role):
    p, windows = model
    toks = jnp.asarray(windows[:2, :-1])
    blk, lin, _ = role.split(".")
    _, _, s4 = S.weight_deltas(p["layers"][blk][lin]["w"][layer], p["layers"][blk][lin]["s_w"][layer])
    at4 = p["layers"][blk][lin]
    at4 = {**at4, "s_w": at4["s_w"].at[layer].set(s4)}
    q = {**p, "layers": {**p["layers"], blk: {**p["layers"][blk], lin: at4}}}
    want = llama.forward(q, toks, CFG, S.lowered_policy("w8a8", layer, role))
    got = llama.forward(S.lowered(p, layer, role), toks, CFG, "w8a8")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not np.array_equal(np.asarray(got), np.asarray(llama.forward(p, toks, CFG, "w8a8")))


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # constant sides: both NaN
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.floats(-1, 1, allow_nan=False)), min_size=3, max_size=12))
def test_spearman_matches_scipy(pairs):
    a, b = zip(*pairs)
    want = spearmanr(a, b).statistic
    got = S.spearman(a, b)
    assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 7), st.integers(1, 42), st.integers(0, 1000))
def test_sample_spans_the_estimates(layers, roles, n, seed):
    est = np.random.default_rng(seed).random((layers, roles))
    picks = S.sample_entries(est, min(n, est.size))
    assert len(set(picks)) == len(picks) == min(n, est.size)
    vals = [est[i, j] for i, j in picks]
    if n >= 2:
        assert min(vals) == est.min() and max(vals) == est.max()


def test_command_writes_every_entry_and_the_heat_map(tmp_path, capsys):
    out, png = tmp_path / "s.json", tmp_path / "s.png"
    rc = main(["sensitivity", "--model", "tiny", "--recipe", "plain", "--seq-len", "16", "--fisher-windows", "2",
               "--windows", "2", "--sample", "3", "--out", str(out), "--plot", str(png), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    r = json.loads(out.read_text())
    assert json.loads(captured.out) == r
    assert {(e["layer"], e["role"]) for e in r["entries"]} == {(i, x) for i in range(CFG.n_layers) for x in S.ROLES}
    assert sum("measured" in e for e in r["entries"]) == r["sampled"] == 3
    assert all(e["estimate"] >= 0 for e in r["entries"])
    assert r["command"].startswith("np-jax sensitivity --model tiny")
    assert Image.open(png).size[0] >= 1200


@pytest.mark.parametrize("flags,msg", [
    (["--sample", "0"], "--sample"),
    (["--sample", "99"], "exceeds the 14 entries"),
    (["--precision", "w4a4"], "8-bit per-channel weights"),
    (["--seq-len", "4096"], "exceeds the context"),
    (["--recipe", "none"], "--recipe"),
])
def test_bad_flags_refused_before_work(tmp_path, capsys, flags, msg):
    rc = main(["sensitivity", "--model", "tiny", "--out", str(tmp_path / "s.json"), "--plot", str(tmp_path / "s.png"),
               *flags])
    assert rc == 2
    err = capsys.readouterr().err
    assert msg in err and "preparing" not in err
    assert not (tmp_path / "s.json").exists()


def test_unwritable_output_refused(tmp_path, capsys):
    (tmp_path / "d.json").mkdir()
    assert main(["sensitivity", "--model", "tiny", "--out", str(tmp_path / "d.json")]) == 2
    assert "is a directory" in capsys.readouterr().err
