"""Quantization recipes (models.recipe), the prepared-model cache (models.prepared), and what the
mapping and the cost model make of the online rotations; on the tiny model (fast)."""

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models import llama, prepared, recipe as R
from models.config import get_config
from models.io.load import load_model
from np_jax import cost
from np_jax.appliance.mapping import map_model
from np_jax.quant import get_policy, gptq, hadamard

# d_ff 96: the down rotation is H12 (x) H8, a Paley factor and a Sylvester one
CFG = get_config("tiny").replace(d_ff=96)
TOKS = np.asarray(jax.random.randint(jax.random.key(3), (3, 14), 0, CFG.vocab_size))


@pytest.fixture(scope="module")
def base():
    p = llama.init_params(CFG, jax.random.key(0))
    k = jax.random.split(jax.random.key(1), 3)
    lay = dict(p["layers"])  # norm gains away from 1, so that folding them has something to do
    lay["attn_norm"] = 1 + 0.3 * jax.random.normal(k[0], lay["attn_norm"].shape)
    lay["mlp_norm"] = 1 + 0.3 * jax.random.normal(k[1], lay["mlp_norm"].shape)
    return {**p, "layers": lay, "final_norm": 1 + 0.3 * jax.random.normal(k[2], p["final_norm"].shape)}


# rotate-gptq (every transform on, GPTQ weights, the sink prefix) on 2 calibration windows
RECIPE = dataclasses.replace(R.get_recipe("rotate-gptq"), calib_windows=2)


@pytest.fixture(scope="module")
def model(base):
    """The tiny model as `prepare` sees a model file (a file hash makes it cacheable)."""
    return dataclasses.replace(load_model("tiny"), cfg=CFG, params=base, sha256="0" * 64)


@pytest.fixture(scope="module")
def quantized(model):
    """RECIPE at w4a4 on the training split's first windows, as `prepare` makes it."""
    return R.apply(model.params, CFG, RECIPE, "w4a4", prepared.calibration_windows(model, RECIPE.calib_windows))


def test_transforms_keep_the_float_function(base):
    ref = np.asarray(llama.forward(base, TOKS, CFG, "float"))
    cfg, p = R.transform(base, CFG, "rotate-gptq", "w4a4")
    assert cfg.down_rotation == (12, 8) and cfg.qk_rotation and cfg.sink_positions == 1 and not cfg.tied_embeddings
    assert cfg == R.transformed_config(CFG, "rotate-gptq", "w4a4")  # what map/perf see before loading weights
    got = np.asarray(llama.forward(p, TOKS, cfg, "float"))
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max())
    # each transform alone is exact too, and the residual rotation really changed the weights
    for step in ("fold_norms", "rotate_residual", "rotate_vo", "down_rotation"):
        rec = R.Recipe("one", fold_norms=True, rotate_residual=step == "rotate_residual",
                       rotate_vo=step == "rotate_vo", qk_rotation=False, down_rotation=step == "down_rotation", sink=0)
        c1, p1 = R.transform(base, CFG, rec, "w4a4")
        np.testing.assert_allclose(np.asarray(llama.forward(p1, TOKS, c1, "float")), ref,
                                   atol=2e-4 * np.abs(ref).max(), err_msg=step)
    assert not np.allclose(np.asarray(p["layers"]["attn"]["q"]["w"]), np.asarray(base["layers"]["attn"]["q"]["w"]))


def test_recipe_validation():
    with pytest.raises(ValueError, match="unknown recipe"):
        R.get_recipe("rotate-everything")
    with pytest.raises(ValueError, match="need folded norms"):
        R.Recipe("x", fold_norms=False)
    with pytest.raises(ValueError, match="gptq or rtn"):
        R.Recipe("x", weights="awq")
    # the QK rotation is automatic: on when the KV cache is narrower than 8 bits
    assert all(R.get_recipe("rotate-gptq").qk_rotation_for(p) for p in ("w4a4", "w8a8", "w8a8-pdd"))
    assert not R.get_recipe("rotate-gptq").qk_rotation_for("float")
    assert R.get_recipe("plain").steps("w4a4") == ["weights:rtn", "activations:mse"]


def test_transformed_model_is_bit_exact_across_training_serving_and_decode(quantized):
    """(Its gradients: tests/test_appliance.py, whose model has the same online transforms.)"""
    cfg, q = quantized
    f = jax.jit(lambda p, t: llama.forward(p, t, cfg, "w4a4"))
    train_out = np.asarray(f(q, TOKS))
    serving = llama.prepare_serving(q, cfg, "w4a4")
    np.testing.assert_array_equal(np.asarray(f(serving, TOKS)), train_out)  # training forward == serving forward
    # prefill 9 positions (the sink prefix inside), then decode 5, each bit-equal to the full forward
    cache = llama.init_cache(cfg, 3, 32, "w4a4")
    step = jax.jit(lambda p, t, pos, c: llama.step(p, t, pos, c, cfg, "w4a4"))
    out, cache = step(serving, TOKS[:, :9], jnp.broadcast_to(jnp.arange(9), (3, 9)), cache)
    outs = [out]
    for t in range(9, 14):
        o, cache = step(serving, TOKS[:, t:t + 1], jnp.full((3, 1), t), cache)
        outs.append(o)
    np.testing.assert_array_equal(np.asarray(jnp.concatenate(outs, 1)), train_out)


def test_online_rotations_are_mapped_and_charged():
    """`np-jax map` places the ±1 matrices as INT2 weights; `np-jax perf` charges their VMMs."""
    smol = get_config("smollm2-135m")
    plain = map_model(smol, "w4a4", users=4, context=512)
    rot_cfg = R.transformed_config(smol, "rotate-gptq", "w4a4")
    rot = map_model(rot_cfg, "w4a4", users=4, context=512)
    assert rot_cfg.down_rotation == hadamard.factors(1536) == (12, 128) and rot_cfg.qk_rotation
    names = set(rot.tilings) - set(plain.tilings)
    assert {n.split(".rot")[0] for n in names} == {"attn", "mlp"}, names
    weights = lambda m: sum(c.summary()["weights_bytes"] for c in m.layer_cards)  # noqa: E731
    # the ±1 matrices at 2 bits, on the cores their tilings name, once per layer (30 layers)
    rot_bytes = sum(int(rot.tilings[n].bytes_on_chip(2).sum()) for n in names)
    assert rot_bytes >= (64 * 64 + 12 * 12 + 128 * 128) * 2 // 8
    assert weights(rot) - weights(plain) == 30 * rot_bytes
    run = dict(users=4, context=512, prompt_tokens=256, gen_tokens=256)
    t_plain = cost.predict(smol, "w4a4", mapping=plain, **run)
    t_rot = cost.predict(rot_cfg, "w4a4", mapping=rot, **run)
    assert t_rot["layer_work_cycles_decode"] > t_plain["layer_work_cycles_decode"]
    assert t_rot["system_throughput_tok_s"] <= t_plain["system_throughput_tok_s"]


def test_the_qk_rotation_is_charged_at_every_cache_width(capsys):
    """The recipe rotates q and k whenever the KV cache is quantized (`wants_qk_rotation`), and
    `--rotations recipe` charges what it runs: at an 8-bit cache as at a 4-bit one, more VMM work and
    never more throughput than the model as published; the shape is the recipe's own config."""
    from np_jax.cli import main, shape_with_rotations

    def perf(precision, rotations):
        assert main(["perf", "--model", "smollm2-135m", "--users", "28", "--precision", precision, "--rotations",
                     rotations, "--json"]) == 0
        return json.loads(capsys.readouterr().out)

    smol = get_config("smollm2-135m")
    for precision in ("w4a4", "w8a8-pdd"):
        bare, rec = perf(precision, "none"), perf(precision, "recipe")
        assert rec["layer_work_cycles_decode"] > bare["layer_work_cycles_decode"]
        assert rec["system_throughput_tok_s"] <= bare["system_throughput_tok_s"]
        on = R.transformed_config(smol, R.get_recipe("rotate-gptq"), precision)
        shape = shape_with_rotations(smol, precision, "recipe")
        assert (shape.qk_rotation, shape.down_rotation) == (on.qk_rotation, on.down_rotation) == (True, (12, 128))
    off = R.transformed_config(smol, dataclasses.replace(R.get_recipe("rotate-gptq"), qk_rotation=False), "w8a8")
    assert not off.qk_rotation and not shape_with_rotations(smol, "float", "recipe").qk_rotation


def test_prepared_cache_round_trip_and_corrupt_entry(model, quantized, tmp_path, monkeypatch):
    monkeypatch.setenv("NP_JAX_CACHE", str(tmp_path))
    leaves = lambda t: [np.asarray(x) for x in jax.tree.leaves(t)]  # noqa: E731
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))  # noqa: E731
    logs = []
    cfg1, p1, info1 = prepared.prepare(model, RECIPE, "w4a4", log=logs.append)
    assert not info1["cached"] and info1["calibration"]["seq_len"] == CFG.max_seq_len
    assert cfg1 == quantized[0] and same(p1, quantized[1])  # prepare = the recipe on the training split
    cfg2, p2, info2 = prepared.prepare(model, RECIPE, "w4a4", log=logs.append)
    assert info2["cached"] and cfg2 == cfg1 and same(p2, p1)
    # read ahead (np-jax run reads it while it plans): the same entry, quietly, and prepare takes it
    ahead = prepared.read_cached(model, RECIPE, "w4a4")
    assert ahead[0] == cfg1 and same(ahead[1], p1) and ahead[2] >= 0
    cfg_a, p_a, info_a = prepared.prepare(model, RECIPE, "w4a4", log=logs.append, cached=ahead)
    assert info_a["cached"] and cfg_a == cfg1 and p_a is ahead[1]
    assert prepared.read_cached(model, RECIPE, "w4a4", seed=1) is None  # no entry: prepare makes it
    # another calibration seed, or another recipe, is another entry
    key_a, _ = prepared.cache_key(model, RECIPE, "w4a4")
    assert key_a != prepared.cache_key(model, RECIPE, "w4a4", seed=1)[0]
    assert key_a != prepared.cache_key(model, R.get_recipe("rotate"), "w4a4")[0]
    # a damaged entry is reported and rebuilt, never used
    d = tmp_path / "prepared" / key_a
    meta = json.loads((d / "meta.json").read_text())
    meta["sha256"] = "f" * 64
    (d / "meta.json").write_text(json.dumps(meta))
    n_logs = len(logs)
    assert prepared.read_cached(model, RECIPE, "w4a4") is None and len(logs) == n_logs  # damaged: left to prepare
    cfg3, p3, info3 = prepared.prepare(model, RECIPE, "w4a4", log=logs.append)
    assert not info3["cached"] and any("damaged" in m for m in logs) and same(p3, p1)
    (d / "arrays.bin").write_bytes(b"not the arrays")
    assert not prepared.prepare(model, RECIPE, "w4a4", log=logs.append)[2]["cached"]


def test_the_learned_rotation_is_orthogonal_lowers_its_loss_keeps_the_float_function_and_caches(model, tmp_path,
                                                                                                monkeypatch):
    """`learn_rotation`: the rows it learns on are every layer's normed attention and MLP inputs
    beyond the sink; R is orthogonal and lowers their fourth moment below the Hadamard's (R = I);
    folded, the model computes the float function; the recipe folds it, and a prepared entry keeps
    R beside the codes, recomputes the embedding and the output layer through it, and reads back
    bit for bit. Off, the switch leaves the cache keys of the recipes before it unchanged."""
    # round-to-nearest weights: GPTQ is not this test's subject
    on = dataclasses.replace(RECIPE, learn_rotation=12, learn_rotation_lr=1e-2, weights="rtn")
    windows = prepared.calibration_windows(model, 2)
    cfg, f = R.transform(model.params, CFG, on, "w4a4")
    x = R.rotation_inputs(f, cfg, windows, sample=16, batch=1)
    assert x.shape == (cfg.n_layers * 2 * 2 * 16, cfg.d_model)
    ms = np.mean(x.astype(np.float64) ** 2, axis=-1)  # normed: RMS 1 per row but for the norm's epsilon
    assert np.all(ms > 0.9) and np.all(ms < 1.001)
    h0 = np.asarray(jax.vmap(lambda e: e * jax.lax.rsqrt(jnp.mean(e * e, -1, keepdims=True) + cfg.rms_eps))(
        llama.embed(f, jnp.asarray(windows[:1]), llama.resolve("float", cfg)).astype(jnp.float32)))[0]
    first = x[:16]  # layer 0's attention input in the first window: normed embeddings at positions >= the sink
    gap = np.abs(first[:, None, :] - h0[None, :, :]).max(-1)
    assert np.all((gap[:, cfg.sink_positions:] < 1e-5).any(1))  # (a token at the sink may recur past it)
    r = R.learn_residual_rotation(x, on.learn_rotation, on.learn_rotation_lr)
    assert r.dtype == np.float64 and np.abs(r.T @ r - np.eye(cfg.d_model)).max() < 1e-12
    assert float(R.rotation_loss(jnp.asarray(r, jnp.float32), jnp.asarray(x))) < \
        float(R.rotation_loss(jnp.eye(cfg.d_model), jnp.asarray(x))) - 0.01
    c = R.cayley(jax.random.normal(jax.random.key(5), (cfg.d_model, cfg.d_model)) * 0.1)
    np.testing.assert_allclose(np.asarray(c.T @ c), np.eye(cfg.d_model), atol=1e-5)
    ref = np.asarray(llama.forward(model.params, TOKS, CFG, "float"))
    got = np.asarray(llama.forward(R.rotate_residual_by(f, r), TOKS, cfg, "float"))
    np.testing.assert_allclose(got, ref, atol=2e-4 * np.abs(ref).max())
    # the recipe learns it on its windows and folds it (the embedding: the Hadamard's times R)
    monkeypatch.setenv("NP_JAX_CACHE", str(tmp_path))
    cfg1, p1, info1 = prepared.prepare(model, on, "w4a4")
    assert not info1["cached"] and "learn_rotation:12" in info1["steps"]
    meta = json.loads(next((tmp_path / "prepared").glob("*/meta.json")).read_text())
    rec = {".".join(x["path"]): x for x in meta["leaves"]}
    assert rec["embed"]["codec"] == "rotated" and rec["embed"]["rotation"]["learned"] == "residual_rotation"
    assert rec["lm_head.w"]["codec"] == "head" and meta["arrays"]["residual_rotation"]["shape"] == [cfg.d_model] * 2
    spec = meta["arrays"]["residual_rotation"]  # where in arrays.bin, as meta.json records it
    blob = (next((tmp_path / "prepared").iterdir()) / "arrays.bin").read_bytes()
    stored = np.frombuffer(blob, spec["dtype"], count=cfg.d_model ** 2, offset=spec["offset"]).reshape(cfg.d_model, -1)
    np.testing.assert_array_equal(np.asarray(p1["embed"]), np.asarray(f["embed"] @ jnp.asarray(stored)))
    assert not np.allclose(stored, np.eye(cfg.d_model), atol=1e-3)
    cfg2, p2, info2 = prepared.prepare(model, on, "w4a4")
    assert info2["cached"] and cfg2 == cfg1
    assert all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
               for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True))
    assert "learn_rotation" not in RECIPE.to_json() and on.to_json()["learn_rotation"] == 12
    for bad in (dict(learn_rotation=-1), dict(learn_rotation=3, rotate_residual=False, rotate_vo=False)):
        with pytest.raises(ValueError, match="learn_rotation"):
            dataclasses.replace(RECIPE, **bad)


def test_block_reconstruction_keeps_the_codes_and_fits_the_float_layers(model, quantized):
    """Every layer's steps are fitted to the float layer's output: the relative error of the layers'
    outputs falls, each matrix keeps its integer codes (on its grid, as the cache stores it), and the
    result still serves as it trains."""
    cfg, q = quantized
    _, f = R.transform(model.params, CFG, RECIPE, "w4a4")
    errors: list = []
    r = R.reconstruct(q, f, cfg, "w4a4", prepared.calibration_windows(model, 2), 8, errors=errors)
    assert len(errors) == cfg.n_layers and np.mean([a for _, a in errors]) < np.mean([b for b, _ in errors])
    for name in llama.LINEARS:
        blk, lin = name.split(".")
        (w0, s0), (w1, s1) = [(np.asarray(p["layers"][blk][lin]["w"]), np.asarray(p["layers"][blk][lin]["s_w"]))
                              for p in (q, r)]
        codes = np.rint(w1 / s1[:, None, :])
        np.testing.assert_array_equal(codes, np.rint(w0 / s0[:, None, :]))  # the GPTQ codes, kept
        np.testing.assert_array_equal(codes.astype(np.float32) * s1[:, None, :], w1)  # on the grid: codes x step
    assert not np.array_equal(np.asarray(r["layers"]["attn"]["s_x"]), np.asarray(q["layers"]["attn"]["s_x"]))
    f_q = jax.jit(lambda p, t: llama.forward(p, t, cfg, "w4a4"))
    np.testing.assert_array_equal(np.asarray(f_q(llama.prepare_serving(r, cfg, "w4a4"), TOKS)), np.asarray(f_q(r, TOKS)))


def test_reconstruction_of_the_narrow_steps_keeps_the_wide_ones(model, quantized):
    """`max_bits=4`: the 4-bit roles' steps are fitted, the INT8 ones (SiLU, the sink's twins) keep
    their calibration exactly; with every step fitted (8) they move too."""
    cfg, q = quantized
    _, f = R.transform(model.params, CFG, RECIPE, "w4a4")
    windows = prepared.calibration_windows(model, 2)
    fits = {b: R.reconstruct(q, f, cfg, "w4a4", windows, 8, max_bits=b)["layers"] for b in (4, 8)}
    q = q["layers"]
    wide = [("mlp", "s_in"), ("mlp", "s_out"), ("attn", "s_x0"), ("mlp", "down", "s_x0")]
    narrow = [("attn", "s_x"), ("mlp", "down", "s_x"), ("attn", "q", "s_w"), ("mlp", "down", "s_w")]
    for path in wide + narrow:
        a, b4, b8 = (np.asarray(functools.reduce(lambda t, k: t[k], path, t)) for t in (q, fits[4], fits[8]))
        assert np.array_equal(a, b4) == (path in wide), path
        assert not np.array_equal(a, b8), path


def _first_layer_outputs(f, r, cfg, windows):
    """The float model's first layer output and the reconstructed one's on its quantized input (the
    pair the reconstruction's first loss compares), with the positions."""
    prec = llama.resolve("w4a4", cfg)
    fprec = llama.Precision(get_policy("float"), jnp.float32, prec.tilings)
    tokens = jnp.asarray(windows)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    y = llama.layer(llama.unstack_layers(f["layers"])[0], llama.embed(f, tokens, fprec).astype(jnp.float32), pos,
                    None, cfg, fprec)[0]
    out = llama.layer(llama.unstack_layers(r["layers"])[0], llama.embed(r, tokens, prec), pos, None, cfg,
                      prec.at(0))[0].astype(jnp.float32)
    return y, out, pos


def test_reconstruction_of_the_codes_rounds_to_the_grid_it_measured(model, quantized):
    """`codes_lr`: the codes of the fitted matrices move off GPTQ's (some, not all), stay integers on
    their role's grid, and the kept layer is the one the last loss measured: the first layer's
    relative output error, recomputed from the result (the ordinary rows' plus `sink_weight` times
    the sink rows'), is the reported one and below the start's."""
    cfg, q = quantized
    _, f = R.transform(model.params, CFG, RECIPE, "w4a4")
    windows = prepared.calibration_windows(model, 2)
    errors: list = []
    r = R.reconstruct(q, f, cfg, "w4a4", windows, 8, codes_lr=0.1, sink_weight=0.5, errors=errors)
    moved = 0
    for name in llama.LINEARS:
        blk, lin = name.split(".")
        (w0, s0), (w1, s1) = [(np.asarray(p["layers"][blk][lin]["w"]), np.asarray(p["layers"][blk][lin]["s_w"]))
                              for p in (q, r)]
        codes = np.rint(w1 / s1[:, None, :])
        np.testing.assert_array_equal(codes.astype(np.float32) * s1[:, None, :], w1)  # codes x step
        tq = get_policy("w4a4").layer(f"{name}.w")
        assert codes.min() >= -tq.q_n and codes.max() <= tq.q_p, name
        changed = codes != np.rint(w0 / s0[:, None, :])
        assert changed.mean() < 0.5, name  # a code moves where the error says so, not everywhere
        moved += changed.sum()
    assert moved > 0
    y, out, pos = _first_layer_outputs(f, r, cfg, windows)
    rel = lambda rows: float(jnp.sum(jnp.where(rows, (out - y) ** 2, 0)) / jnp.sum(jnp.where(rows, y ** 2, 0)))  # noqa: E731
    keep = (pos >= cfg.sink_positions)[..., None]
    err = rel(keep) + 0.5 * rel(~keep)
    assert err == pytest.approx(errors[0][1], rel=1e-4) and err < errors[0][0]


def test_layer_output_fisher_is_the_squared_loss_gradient(model):
    """`layer_output_fisher` against an independent oracle: the float model run layer by layer in
    python, a perturbation added after one layer, the next-token loss differentiated with respect
    to it (in 2-window batches it is the same as in one)."""
    cfg, f = R.transform(model.params, CFG, RECIPE, "w4a4")
    windows = prepared.calibration_windows(model, 3)[:, :12]
    got = np.asarray(R.layer_output_fisher(f, cfg, windows))
    assert got.shape == (cfg.n_layers, 3, 12, cfg.d_model)
    tokens = jnp.asarray(windows)
    pos = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    layers = llama.unstack_layers(f["layers"])

    def loss(d, at):
        x = llama.embed(f, tokens, llama.resolve("float", cfg)).astype(jnp.float32)
        for i, lp in enumerate(layers):
            x = llama.layer(lp, x, pos, None, cfg, llama.resolve("float", cfg))[0] + (d if i == at else 0)
        logits = llama.head(f, x, cfg, llama.resolve("float", cfg))
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    for at in range(cfg.n_layers):
        want = np.asarray(jax.grad(loss)(jnp.zeros(tokens.shape + (cfg.d_model,)), at)) ** 2
        np.testing.assert_allclose(got[at], want, rtol=2e-3, atol=1e-6 * want.max())
        assert want.max() > 0


def test_fisher_weighted_reconstruction_weighs_each_element_by_it(model, quantized, monkeypatch):
    """`fisher=True`: the reported errors are the Fisher-weighted relative errors (recomputed here for
    the first layer from the result), and the switch reaches it from the recipe."""
    cfg, q = quantized
    _, f = R.transform(model.params, CFG, RECIPE, "w4a4")
    windows = prepared.calibration_windows(model, 2)
    errors: list = []
    r = R.reconstruct(q, f, cfg, "w4a4", windows, 4, fisher=True, errors=errors)
    weight = R.layer_output_fisher(f, cfg, windows)[0]
    y, out, pos = _first_layer_outputs(f, r, cfg, windows)
    keep = (pos >= cfg.sink_positions)[..., None]
    err = float(jnp.sum(jnp.where(keep, weight * (out - y) ** 2, 0)) / jnp.sum(jnp.where(keep, weight * y ** 2, 0)))
    plain = float(jnp.sum(jnp.where(keep, (out - y) ** 2, 0)) / jnp.sum(jnp.where(keep, y ** 2, 0)))
    assert err == pytest.approx(errors[0][1], rel=1e-4) and err != pytest.approx(plain, rel=1e-3)
    assert R.with_options(RECIPE, ["reconstruct=2", "reconstruct_fisher=true"]).steps("w4a4")[-1] == \
        "reconstruct:2:fisher"


def test_reconstruction_on_its_own_input_fits_each_layer_to_the_float_layer_there(model, quantized):
    """`own_input`: the second layer's reported starting error is its error against the float layer
    run on the same (quantized) input, recomputed here from the result's first layer; without it,
    against the float model's own second-layer output, which differs."""
    cfg, q = quantized
    _, f = R.transform(model.params, CFG, RECIPE, "w4a4")
    windows = prepared.calibration_windows(model, 2)
    prec = llama.resolve("w4a4", cfg)
    fprec = llama.Precision(get_policy("float"), jnp.float32, prec.tilings)
    tokens = jnp.asarray(windows)
    pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    keep = (pos >= cfg.sink_positions)[..., None]
    rel = lambda a, b: float(jnp.sum(jnp.where(keep, (a - b) ** 2, 0)) / jnp.sum(jnp.where(keep, b ** 2, 0)))  # noqa: E731
    fl = llama.unstack_layers(f["layers"])
    y_f = llama.layer(fl[1], llama.layer(fl[0], llama.embed(f, tokens, fprec).astype(jnp.float32), pos, None, cfg,
                                         fprec)[0], pos, None, cfg, fprec)[0]
    for own in (True, False):
        errors: list = []
        r = R.reconstruct(q, f, cfg, "w4a4", windows, 2, own_input=own, errors=errors)
        rl = llama.unstack_layers(r["layers"])
        x1 = llama.layer(rl[0], llama.embed(r, tokens, prec), pos, None, cfg, prec.at(0))[0]
        start = llama.layer(llama.unstack_layers(q["layers"])[1], x1, pos, None, cfg, prec.at(1))[0].astype(jnp.float32)
        e_own, e_float = rel(start, llama.layer(fl[1], x1.astype(jnp.float32), pos, None, cfg, fprec)[0]), rel(start, y_f)
        # the integer forward rounds: a step recomputed as exp(log(step)) may move a few codes (0.5 %
        # on one jax version), far less than the two targets differ
        want, other = (e_own, e_float) if own else (e_float, e_own)
        assert abs(errors[1][0] - want) < 0.01 * want and abs(errors[1][0] - other) > 0.05 * want, own


def test_the_recipe_switch_runs_the_reconstruction_on_its_windows(model, monkeypatch):
    calls = []
    monkeypatch.setattr(R, "reconstruct", lambda p, fp, cfg, pol, w, iters, lr, log=None, max_bits=8, codes_lr=0.0,
                        sink_weight=0.0, fisher=False, own_input=False: calls.append(
                            (fp, np.asarray(w), iters, lr, max_bits, codes_lr, sink_weight, fisher, own_input)) or p)
    on = dataclasses.replace(RECIPE, reconstruct=3, reconstruct_windows=1, reconstruct_lr=0.5)
    windows = prepared.calibration_windows(model, 2)
    R.apply(model.params, CFG, on, "w4a4", windows)
    R.apply(model.params, CFG, dataclasses.replace(on, reconstruct_max_bits=4, reconstruct_codes_lr=0.1,
                                                   reconstruct_sink_weight=2.0, reconstruct_fisher=True,
                                                   reconstruct_own_input=True), "w4a4", windows)
    (fp, w, iters, lr, max_bits, codes_lr, sink_weight, fisher, own), narrow = calls
    np.testing.assert_array_equal(w, windows[:1])
    assert (iters, lr, max_bits, codes_lr, sink_weight, fisher, own) == (3, 0.5, 8, 0.0, 0.0, False, False)
    assert narrow[-5:] == (4, 0.1, 2.0, True, True)
    assert on.steps("w4a4")[-1] == "reconstruct:3"
    assert (R.with_options(on, ["reconstruct_max_bits=4", "reconstruct_codes_lr=0.1", "reconstruct_sink_weight=2"])
            .steps("w4a4")[-1] == "reconstruct:3:max-bits-4:codes-0.1:sink-weight-2")
    with pytest.raises(ValueError, match="reconstruct_max_bits must be 2, 4 or 8"):
        R.with_options(on, ["reconstruct_max_bits=6"])
    _, want = R.transform(model.params, CFG, on, "w4a4")  # the reference is the transformed float model
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fp), jax.tree.leaves(want), strict=True))
    # the switch off leaves the cache key of the recipes made before it existed unchanged
    assert "reconstruct" not in RECIPE.to_json() and "reconstruct" in on.to_json()
    assert "reconstruct_max_bits" not in on.to_json()  # all steps fitted: the key of the entries made before
    assert dataclasses.replace(on, reconstruct_max_bits=4).to_json()["reconstruct_max_bits"] == 4
    assert "reconstruct_codes_lr" not in on.to_json()  # the codes kept: the key of the entries made before
    assert dataclasses.replace(on, reconstruct_codes_lr=0.1).to_json()["reconstruct_codes_lr"] == 0.1
    assert "reconstruct_sink_weight" not in on.to_json()
    assert dataclasses.replace(on, reconstruct_sink_weight=2.0).to_json()["reconstruct_sink_weight"] == 2.0
    assert "reconstruct_fisher" not in on.to_json()
    assert dataclasses.replace(on, reconstruct_fisher=True).to_json()["reconstruct_fisher"] is True
    assert "reconstruct_own_input" not in on.to_json()
    assert dataclasses.replace(on, reconstruct_own_input=True).to_json()["reconstruct_own_input"] is True
    assert prepared.cache_key(model, on, "w4a4")[0] != prepared.cache_key(model, RECIPE, "w4a4")[0]
    with pytest.raises(ValueError, match="reconstruct"):
        R.Recipe("x", reconstruct=-1)
    with pytest.raises(ValueError, match="reconstruct_codes_lr must be in"):
        R.Recipe("x", reconstruct=1, reconstruct_codes_lr=-0.1)
    with pytest.raises(ValueError, match="reconstruct_sink_weight .*needs a sink"):
        R.Recipe("x", reconstruct=1, sink=0, reconstruct_sink_weight=1.0)


def test_the_sink_steps_have_their_own_calibration(model, monkeypatch):
    """The recipe calibrates the sink rows' steps by their largest value (`sink_activations`): the
    other steps are untouched, and no sink step is smaller than the MSE one (which clips)."""
    cfg, p = R.transform(model.params, CFG, RECIPE, "w4a4")
    windows = jnp.asarray(prepared.calibration_windows(model, 2))
    got = {m: llama.calibrate(p, windows, cfg, "w4a4", "mse", weights=False, sink_method=m)["layers"]
           for m in ("mse", "max")}
    get = lambda tree, path: np.asarray(functools.reduce(lambda t, k: t[k], path, tree))  # noqa: E731
    sink = [path for path, role in llama.act_steps(cfg).items() if role == "sink"]
    assert len(sink) >= 8 and ("attn", "s_k0") in sink and ("attn", "s_p0") in sink
    for path in llama.act_steps(cfg):
        mse, mx = get(got["mse"], path), get(got["max"], path)
        if path in sink:
            assert (mx >= mse).all(), path
        else:
            np.testing.assert_array_equal(mx, mse)
    assert any((get(got["max"], path) > get(got["mse"], path)).any() for path in sink)
    # every sink value is seen, however few of a tensor's they are (no strided sample)
    monkeypatch.setattr(llama, "CALIB_SAMPLE", 64)
    small = llama.calibrate(p, windows, cfg, "w4a4", "mse", weights=False, sink_method="max")["layers"]
    for path in sink:
        np.testing.assert_array_equal(get(small, path), get(got["max"], path))
    # the rule is part of the recipe and of its cache key; the earlier rule (None) is left out of it
    assert RECIPE.sink_activations == "max" and "sink1:max" in RECIPE.steps("w4a4")
    old = dataclasses.replace(RECIPE, sink_activations=None)
    assert "sink_activations" not in old.to_json() and "sink_activations" in RECIPE.to_json()
    assert prepared.cache_key(model, old, "w4a4")[0] != prepared.cache_key(model, RECIPE, "w4a4")[0]
    with pytest.raises(ValueError, match="activations"):
        R.Recipe("x", sink_activations="median")


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.integers(0, 3))
def test_outlier_tokens_are_the_spikes_beyond_the_sink(seed, sink):
    rng = np.random.default_rng(seed)
    m = rng.uniform(0.5, 2.0, (3, 2, 10))  # [layers, windows, positions], median about 1.25
    spikes = {(int(rng.integers(3)), int(rng.integers(2)), int(rng.integers(10))) for _ in range(rng.integers(0, 4))}
    for l, w, t in spikes:
        m[l, w, t] = 1e3  # > 64 x any median here
    want = sorted(s for s in spikes if s[2] >= sink)
    assert sorted(R.outlier_tokens(m, sink)) == want
    line = R.describe_outliers(R.outlier_tokens(m, sink), np.zeros((2, 10), np.int32), sink)
    assert ("none in 20" in line) == (not want)


def test_calibration_reports_each_tokens_down_input_maximum(base):
    cfg, p = R.transform(base, CFG, RECIPE, "w4a4")
    stats = {}
    llama.calibrate(p, jnp.asarray(TOKS), cfg, "w4a4", "mse", stats=stats)
    m = stats["down_input_token_max"]
    assert m.shape == (CFG.n_layers, *TOKS.shape) and np.all(m >= 0) and np.all(np.isfinite(m))
    # the oracle: the float forward's own down-projection input, taken layer by layer
    prec = dataclasses.replace(llama.resolve("w4a4", cfg), compute_dtype=jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(TOKS.shape[1]), TOKS.shape)
    x = llama.embed(p, jnp.asarray(TOKS), llama.resolve("float"))
    class Recorder:  # what the layer shows a calibration: each quantization point's float tensor
        def __init__(self):
            self.seen = {}

        def see(self, path, v, tq, sink=None):
            self.seen[path] = v

        def see_sink(self, path, v):
            self.seen[path] = v

    for i, lp in enumerate(llama.unstack_layers(p["layers"])):
        c = Recorder()
        x, _ = llama.layer(lp, x, pos, None, cfg, prec, c)
        want = np.abs(np.asarray(c.seen[("mlp", "down", "s_x")], np.float32)).max(-1)
        np.testing.assert_allclose(m[i], want, rtol=1e-5)


def test_gptq_switches_reach_every_matrix(model):
    """The recipe's GPTQ switches act on every layer matrix: refitted steps never raise a matrix's
    output error on its calibration Hessian (same codes, better step), act order and damping change
    the codes; each switch is part of the cache key, its earlier setting left out of it."""
    cfg, p = R.transform(model.params, CFG, RECIPE, "w4a4")
    hess = R.layer_hessians(p, cfg, prepared.calibration_windows(model, 2))
    quiet = lambda m: None  # noqa: E731

    def weights(**kw):
        lay = R.quantize_weights(p, cfg, "w4a4", "gptq", hess, quiet, **kw)["layers"]
        return {n: (np.asarray(lay[a][b]["w"], np.float64), np.asarray(lay[a][b]["s_w"], np.float64))
                for n in ("attn.q", "attn.o", "mlp.gate", "mlp.down") for a, b in [n.split(".")]}

    hpath = {n: h for h, names in (((("attn", "s_x"), ("attn.q",)), (("attn", "o", "s_x"), ("attn.o",)),
                                    (("mlp", "s_x"), ("mlp.gate",)), (("mlp", "down", "s_x"), ("mlp.down",))))
             for n in names}
    plain, refit = weights(), weights(refit_steps=True)
    ordered, damped = weights(act_order=True), weights(damp=0.5)
    for n, (w_q, s_q) in plain.items():
        a, b = n.split(".")
        w = np.asarray(p["layers"][a][b]["w"], np.float64)
        np.testing.assert_array_equal(np.rint(refit[n][0] / refit[n][1][:, None, :]), np.rint(w_q / s_q[:, None, :]))
        for i in range(cfg.n_layers):
            h = hess[hpath[n]][i]
            err = lambda wq: np.einsum("kn,kn->n", h @ (w[i] - wq[i]), w[i] - wq[i])  # noqa: E731,B023
            assert (err(refit[n][0]) <= err(w_q) * (1 + 1e-6) + 1e-12).all(), (n, i)
        assert not np.array_equal(ordered[n][0], w_q) or not np.array_equal(damped[n][0], w_q), n
    assert any(not np.array_equal(refit[n][0], plain[n][0]) for n in plain)
    old = dataclasses.replace(RECIPE, act_order=False, refit_steps=False, gptq_damp=0.01)
    assert not {"act_order", "refit_steps", "gptq_damp"} & set(old.to_json())
    for k, v in (("act_order", True), ("refit_steps", True), ("gptq_damp", 0.1)):
        one = dataclasses.replace(old, **{k: v})
        assert k in one.to_json() and prepared.cache_key(model, one, "w4a4")[0] != prepared.cache_key(model, old, "w4a4")[0]
    with pytest.raises(ValueError, match="gptq_damp"):
        R.Recipe("x", gptq_damp=0.0)
    # the dampening chosen per matrix: the halves' Hessians add up to the whole, each matrix gets one
    # of the candidates (logged), and the choice is in the key (the unused fixed damping is not)
    full, (h0, h1) = R.layer_hessians(p, cfg, prepared.calibration_windows(model, 2), halves=True)
    for k in hess:
        np.testing.assert_allclose(h0[k].astype(np.float64) + h1[k], full[k], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(full[k], hess[k], atol=1e-5 * np.abs(hess[k]).max())  # other batches: other rounding
        assert not np.allclose(h0[k], h1[k])
    lines: list[str] = []
    R.quantize_weights(p, cfg, "w4a4", "gptq", hess, lines.append, halves=(h0, h1))
    counts = [int(c) for c in re.findall(r" x(\d+)", lines[-1])]
    assert "chosen per matrix" in lines[-1] and sum(counts) == 7 * cfg.n_layers
    sel = dataclasses.replace(RECIPE, gptq_damp_select=True)
    assert "gptq_damp" not in sel.to_json() and sel.to_json()["gptq_damp_candidates"] == list(R.GPTQ_DAMPS)
    assert "gptq_damp_select" not in RECIPE.to_json()
    assert prepared.cache_key(model, sel, "w4a4")[0] != prepared.cache_key(model, RECIPE, "w4a4")[0]


def test_sink_rows_weigh_in_the_hessians_as_asked(model):
    """`gptq_sink_weight`: every input's Hessian gains weight x the sink rows' own X^T X (the sink
    rows, position 0, taken from the layer inputs by an independent layer-by-layer forward), GPTQ's
    dampening stays H's (the factor), the codes change (at weight 0 they do not), and the weight is
    in the cache key (0, the rule so far, is not)."""
    cfg, p = R.transform(model.params, CFG, RECIPE, "w4a4")
    windows = prepared.calibration_windows(model, 2)
    plain, with_sink = R.layer_hessians(p, cfg, windows), R.layer_hessians(p, cfg, windows, sink_rows=True)
    keys = [("attn", "s_x"), ("attn", "o", "s_x"), ("mlp", "s_x"), ("mlp", "down", "s_x")]  # every linear's input
    assert set(plain) == set(keys) and set(with_sink) == set(keys) | {k + ("sink",) for k in keys}

    class Recorder:  # what the layer shows a calibration: each quantization point's float input
        def see(self, path, v, tq, sink=None):
            self.seen[path] = v

        def see_sink(self, path, v):
            pass

    # the sink rows' X^T X from the layers' inputs (position 0), by the float forward layer by layer
    fprec = llama.Precision(get_policy("float"), jnp.float32, llama.resolve("float", cfg).tilings)
    rec = Recorder()
    x = llama.embed(p, jnp.asarray(windows), fprec)
    pos = jnp.broadcast_to(jnp.arange(windows.shape[1]), windows.shape)
    want: dict = {k: [] for k in keys}
    for lp in llama.unstack_layers(p["layers"]):
        rec.seen = {}
        x_next, _ = llama.layer(lp, x, pos, None, cfg, fprec, rec)
        for k in keys:
            rows = np.asarray(rec.seen[k], np.float64)[:, 0].reshape(len(windows), -1)
            want[k].append(rows.T @ rows)
        x = x_next.astype(jnp.float32)
    for k in keys:
        np.testing.assert_allclose(with_sink[k + ("sink",)], np.stack(want[k]), rtol=1e-4,
                                   atol=1e-6 * np.abs(want[k]).max())
    weighed, zero = R.weigh_sink_rows(with_sink, 50.0), R.weigh_sink_rows(with_sink, 0.0)
    trace = lambda a: np.trace(a, axis1=-2, axis2=-1)  # noqa: E731
    for k in keys:
        np.testing.assert_allclose(weighed[k], with_sink[k] + 50.0 * with_sink[k + ("sink",)], rtol=1e-12)
        np.testing.assert_allclose(weighed[k + ("damp",)] * trace(weighed[k]), trace(plain[k]), rtol=1e-5)
        assert (weighed[k + ("damp",)] < 1).all() and (zero[k + ("damp",)] == 1).all()
    quiet = lambda m: None  # noqa: E731
    a, b, c = (R.quantize_weights(p, cfg, "w4a4", "gptq", h, quiet)["layers"] for h in (with_sink, weighed, zero))
    for n in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"):
        i, j = n.split(".")
        assert not np.array_equal(np.asarray(a[i][j]["w"]), np.asarray(b[i][j]["w"])), n
        np.testing.assert_array_equal(np.asarray(a[i][j]["w"]), np.asarray(c[i][j]["w"]))
    # layer by layer too (each layer's Hessians from the quantized layers before it): the weight moves the codes
    seq = [R.quantize_weights_sequential(p, cfg, "w4a4", windows, quiet, sink_weight=w)["layers"] for w in (0.0, 50.0)]
    assert not np.array_equal(np.asarray(seq[0]["attn"]["v"]["w"]), np.asarray(seq[1]["attn"]["v"]["w"]))
    one = dataclasses.replace(RECIPE, gptq_sink_weight=50.0)
    assert "gptq_sink_weight" not in RECIPE.to_json() and one.to_json()["gptq_sink_weight"] == 50.0
    assert prepared.cache_key(model, one, "w4a4")[0] != prepared.cache_key(model, RECIPE, "w4a4")[0]
    # the default recipe is this switch at 16 on rotate-gptq: the same prepared model but for its name
    assert R.get_recipe(R.DEFAULT_RECIPE) == dataclasses.replace(R.get_recipe("rotate-gptq"), gptq_sink_weight=16.0,
                                                                 name=R.DEFAULT_RECIPE,
                                                                 description=R.get_recipe(R.DEFAULT_RECIPE).description)
    reworded = dataclasses.replace(one, description="other words")  # words are not part of the key
    assert prepared.cache_key(model, reworded, "w4a4")[0] == prepared.cache_key(model, one, "w4a4")[0]
    for bad in (dict(gptq_sink_weight=-1.0), dict(gptq_sink_weight=1.0, sink=0),
                dict(gptq_sink_weight=1.0, gptq_damp_select=True)):
        with pytest.raises(ValueError, match="gptq_sink_weight"):
            dataclasses.replace(RECIPE, **bad)


def test_sequential_gptq_sees_the_quantized_layers_inputs(model):
    """`gptq_sequential`: layer i's q, k, v codes are GPTQ's for the Hessian of the inputs that the
    quantized layers before it give (recomputed here in one pass over the finished model), not the
    float model's; layer 0 (whose input is the embedding) is as in one pass."""
    cfg, p = R.transform(model.params, CFG, RECIPE, "w4a4")
    windows = prepared.calibration_windows(model, 2)
    quiet = lambda m: None  # noqa: E731
    seq = R.quantize_weights_sequential(p, cfg, "w4a4", windows, quiet, act_order=True, refit_steps=True, damp=0.1)
    seen = R.layer_hessians(seq, cfg, windows)  # layer i's attention input depends only on layers < i
    kw = dict(act_order=True, refit_steps=True, damp=0.1)
    float_h = R.layer_hessians(p, cfg, windows)
    want = R.quantize_weights(p, cfg, "w4a4", "gptq", {**float_h, ("attn", "s_x"): seen[("attn", "s_x")]}, quiet, **kw)
    one_pass = R.quantize_weights(p, cfg, "w4a4", "gptq", float_h, quiet, **kw)
    codes = lambda q, n: np.rint(np.asarray(q["layers"]["attn"][n]["w"]) / np.asarray(  # noqa: E731
        q["layers"]["attn"][n]["s_w"])[:, None, :])
    for n in ("q", "k", "v"):
        same = codes(seq, n) == codes(want, n)
        assert same.mean() > 0.999, (n, same.mean())  # float sums in another order may flip a tie
        assert (codes(seq, n)[0] == codes(one_pass, n)[0]).mean() > 0.999
    assert any((codes(seq, n)[1:] != codes(one_pass, n)[1:]).any() for n in ("q", "k", "v"))
    np.testing.assert_array_equal(np.asarray(seq["lm_head"]["w"]), np.asarray(one_pass["lm_head"]["w"]))


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), refit=st.booleans())
def test_damp_choice_is_the_best_on_the_other_windows(seed, refit):
    """`choose_damp`: each candidate's error is the float64 output error ||X_check (W - Q S)||^2 of
    the codes (and steps) made on the other windows' Hessian, and the choice is the smallest."""
    rng = np.random.default_rng(seed)
    k, n = 24, 6
    x = rng.standard_normal((96, k)) * rng.uniform(0.05, 3.0, k)  # inputs of uneven scale, as a layer's
    x[:, :2] += 4 * rng.standard_normal((96, 1))  # two correlated large channels
    fit, check = x[:48], x[48:]
    w = rng.standard_normal((k, n))
    s = np.asarray(gptq.mse_steps(w, 4), np.float32)
    d, errors = R.choose_damp(w, s, 4, fit.T @ fit, check.T @ check, act_order=True, refit_steps=refit)
    assert set(errors) == set(R.GPTQ_DAMPS) and d == min(errors, key=errors.get)
    for c, err in errors.items():
        codes = np.asarray(gptq.gptq(w, fit.T @ fit, s, 4, percdamp=c, act_order=True), np.float64)
        sc = gptq.refit_steps(w, codes, fit.T @ fit, s) if refit else s
        want = np.sum((check @ (w - codes * np.asarray(sc, np.float64))) ** 2)
        assert err == pytest.approx(want, rel=1e-9)


def test_recipe_options_set_fields_by_their_types():
    """`eval --recipe-option KEY=VALUE`: every settable field round-trips from its own value written
    as text; bad keys, values and results are refused with the choices named."""
    base = R.get_recipe("rotate-gptq-learned")  # every switch on: each field below differs from it
    flipped = dict(fold_norms=True, rotate_residual=False, rotate_vo=False, qk_rotation=True, down_rotation=False,
                   sink=2, weights="rtn", act_order=False, refit_steps=False, gptq_damp=0.03,
                   gptq_sequential=True, gptq_asymmetric=True, gptq_damp_select=False, gptq_sink_weight=8.0,
                   activations="lsq",
                   sink_activations=None, calib_windows=7, seed=3, reconstruct=4, reconstruct_windows=2,
                   reconstruct_lr=0.25, reconstruct_max_bits=4, reconstruct_codes_lr=0.05,
                   reconstruct_sink_weight=2.0, reconstruct_fisher=True, reconstruct_own_input=True, learn_rotation=0,
                   learn_rotation_lr=0.01)
    settable = {f.name for f in dataclasses.fields(R.Recipe)} - {"name", "description"}
    assert set(flipped) == settable
    got = R.with_options("rotate-gptq-learned", [f"{k.replace('_', '-')}={v}" for k, v in flipped.items()])
    assert got == dataclasses.replace(base, **flipped)
    assert R.with_options(base, []) == base
    assert R.with_options(base, ["act_order=off", "qk_rotation=none"]).act_order is False
    for bad, match in (("damp=1", "KEY one of .*gptq_damp"), ("gptq_damp", "not KEY=VALUE"),
                       ("act_order=maybe", "not a bool"), ("calib_windows=1.5", "not an int"),
                       ("name=x", "KEY one of"), ("gptq_damp=0", "gptq_damp must be"), ("weights=awq", "gptq or rtn")):
        with pytest.raises(ValueError, match=match):
            R.with_options(base, [bad])
