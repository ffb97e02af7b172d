"""LSQ quantizers, quantized products and the precision policy (issue: w4a4 LSQ)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from np_jax.quant import products as layers
from np_jax import quant
from np_jax.chip.array import TiledWeights
from np_jax.quant import TensorQuant
from np_jax.chip.vector_unit import quantize, dequantize

# every supported width/signedness; unsigned 8-bit (0..255) does not fit the INT8 lanes and is refused
tq_st = st.sampled_from([TensorQuant(b, signed=sg) for b in (2, 4, 8) for sg in (True, False) if (b, sg) != (8, False)])


def test_unsigned_8_bit_is_refused():
    with pytest.raises(ValueError, match="unsigned 8-bit"):
        TensorQuant(8, signed=False)


@given(tq=tq_st, shape=st.sampled_from([(7,), (3, 5), (2, 3, 4)]), per_channel=st.booleans(),
       seed=st.integers(0, 2**31), g=st.floats(0.01, 2.0))
def test_lsq_gradients_match_analytic_formulas(tq, shape, per_channel, seed, g):
    rng = np.random.default_rng(seed)
    v = (rng.standard_normal(shape) * 3).astype(np.float32)
    s_shape = (shape[-1],) if per_channel else ()
    s = rng.uniform(0.05, 1.0, s_shape).astype(np.float32)
    cot = rng.standard_normal(shape).astype(np.float32)
    dv, ds = jax.grad(lambda v, s: jnp.sum(cot * quant.lsq_fake_quant(v, s, tq, g)), argnums=(0, 1))(v, s)
    # Oracle: the LSQ paper's formulas, in float64 numpy.
    vs = v.astype(np.float64) / s.astype(np.float64)
    below, above = vs <= -tq.q_n, vs >= tq.q_p
    inside = ~(below | above)
    np.testing.assert_array_equal(np.asarray(dv), np.where(inside, cot, 0))
    elem = np.where(below, -tq.q_n, np.where(above, tq.q_p, np.round(vs) - vs)) * cot * g
    ref_ds = elem.reshape(-1, *s_shape).sum(0) if per_channel else elem.sum()
    np.testing.assert_allclose(np.asarray(ds), ref_ds, rtol=1e-4, atol=1e-4)


@given(tq=tq_st, seed=st.integers(0, 2**31), s=st.floats(1e-3, 10.0))
def test_quantize_range_idempotence_monotonicity(tq, seed, s):
    v = np.sort(np.random.default_rng(seed).standard_normal(64).astype(np.float32) * 20 * s)
    q = np.asarray(quantize(jnp.asarray(v), s, tq.bits, tq.signed))
    assert (q >= -tq.q_n).all() and (q <= tq.q_p).all()
    assert (np.diff(q.astype(np.int64)) >= 0).all()  # monotone non-decreasing
    q2 = np.asarray(quantize(dequantize(jnp.asarray(q), s), s, tq.bits, tq.signed))
    np.testing.assert_array_equal(q2, q)  # dequantize then quantize is the identity on codes
    vhat = np.asarray(quant.lsq_fake_quant(jnp.asarray(v), jnp.float32(s), tq, 1.0))
    inside = (v / np.float32(s) > -tq.q_n) & (v / np.float32(s) < tq.q_p)
    assert np.all(np.abs(vhat - v)[inside] <= np.float32(s) / 2 * (1 + 1e-5))


def test_grad_scale_and_init_step():
    tq = TensorQuant(4)
    assert quant.grad_scale(100, tq) == pytest.approx(1 / math.sqrt(100 * 7))
    assert quant.weight_grad_scale((64, 32), TensorQuant(4, per_channel=True)) == pytest.approx(1 / math.sqrt(64 * 7))
    assert quant.weight_grad_scale((64, 32), tq) == pytest.approx(1 / math.sqrt(64 * 32 * 7))
    assert quant.act_grad_scale((8, 10, 576), tq) == pytest.approx(1 / math.sqrt(576 * 7))
    v = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    np.testing.assert_allclose(quant.init_step(v, tq), 2 * np.abs(v).mean() / math.sqrt(7), rtol=1e-6)
    np.testing.assert_allclose(quant.init_step(v, TensorQuant(4, per_channel=True)),
                               2 * np.abs(v).mean(0) / math.sqrt(7), rtol=1e-6)
    assert float(quant.init_step(np.zeros(4), tq)) > 0


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([TensorQuant(4), TensorQuant(8), TensorQuant(4, signed=False), TensorQuant(8, per_channel=True)]),
       st.integers(0, 2 ** 31 - 1), st.floats(1e-3, 1e4))
def test_max_step_clips_nothing(tq, seed, scale):
    """`init_step_max`: the largest |value| (per channel) lands on the last code, and every value is
    within half a step of its code (against numpy)."""
    v = (np.random.default_rng(seed).standard_normal((40, 6)) * scale).astype(np.float32)
    if not tq.signed:
        v = np.abs(v)
    s = np.asarray(quant.init_step_max(v, tq))
    np.testing.assert_allclose(s, np.abs(v).max(0 if tq.per_channel else None) / tq.q_p, rtol=1e-6)
    err = np.abs(np.asarray(dequantize(quantize(v, s, tq.bits, tq.signed), s)) - v)
    assert (err <= 0.5 * s * (1 + 1e-5)).all()
    assert (quant.init_step_mse(v, tq) <= s * (1 + 1e-6)).all()  # the MSE step is one of max's fractions


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="bit width"):
        TensorQuant(3)
    with pytest.raises(ValueError, match="bit width"):
        TensorQuant(16)
    for bad in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="positive"):
            quant.check_step(np.array([0.1, bad]))
    with pytest.raises(ValueError, match="NaN or inf"):
        quant.init_step(np.array([1.0, np.nan]), TensorQuant(4))
    with pytest.raises(ValueError, match="unknown precision"):
        quant.get_policy("w3a3")
    p = {"w": jnp.ones((4, 4)), "s_w": jnp.array([0.1, 0.0, 0.1, 0.1]), "s_x": jnp.float32(0.1)}
    with pytest.raises(ValueError, match="positive"):
        layers.prepare_linear(p, TensorQuant(4, per_channel=True))


def test_nan_and_inf_inputs_have_documented_codes():
    v = jnp.array([np.nan, np.inf, -np.inf, 0.3], jnp.float32)
    np.testing.assert_array_equal(np.asarray(quantize(v, 0.1, 4)), [0, 7, -8, 3])


def test_policy_presets():
    w4a4 = quant.get_policy("w4a4")
    assert w4a4("layers.0.attn.q.w").bits == 4 and w4a4("layers.0.attn.q.w").per_channel
    assert w4a4("layers.3.mlp.down.x").bits == 4
    assert w4a4("layers.0.attn.kv").bits == 4
    assert w4a4("lm_head.w").bits == 8 and w4a4("lm_head.x").bits == 8
    assert w4a4("layers.7.mlp.silu").bits == 8
    assert not w4a4("layers.0.attn.probs").signed
    a8 = quant.get_policy("a8c8w4")
    assert a8("layers.0.attn.kv").bits == 8 and a8("layers.0.mlp.up.w").bits == 4 and a8("layers.0.mlp.up.x").bits == 8
    assert quant.get_policy("float")("anything").is_float and quant.get_policy("float").is_float
    custom = quant.PrecisionPolicy("w2", (("*.w", TensorQuant(2)), ("*", TensorQuant(8))))
    assert custom("layers.1.attn.o.w").bits == 2  # a new policy is data, not code


def _rand_layer(rng, k, n, tq_w, tq_x, bias=False):
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.1
    x = rng.standard_normal((3, 5, k)).astype(np.float32)
    p = {"w": jnp.asarray(w), "s_w": quant.init_step(w, tq_w), "s_x": quant.init_step(x, tq_x)}
    if bias:
        p["b"] = jnp.asarray(rng.standard_normal(n), jnp.float32)
    return x, p


@settings(max_examples=6)  # each example compiles new shapes
@given(k=st.integers(1, 70), n=st.integers(1, 40), wb=st.sampled_from([2, 4, 8]), xb=st.sampled_from([2, 4, 8]),
       bias=st.booleans(), seed=st.integers(0, 2**31))
def test_linear_integer_forward_matches_int64_oracle(k, n, wb, xb, bias, seed):
    tq_w, tq_x = TensorQuant(wb, per_channel=True), TensorQuant(xb)
    x, p = _rand_layer(np.random.default_rng(seed), k, n, tq_w, tq_x, bias)
    y = layers.linear(jnp.asarray(x), p, tq_x, tq_w)
    xq = np.asarray(quantize(jnp.asarray(x), p["s_x"], xb)).astype(np.int64)
    wq = np.asarray(quantize(p["w"], p["s_w"], wb)).astype(np.int64)
    acc = (xq @ wq).astype(np.float32)  # |acc| < 2^24 here, so float32 holds it exactly
    ref = (acc * (np.float32(p["s_x"]) * np.asarray(p["s_w"], np.float32))).astype(np.float16)
    if bias:
        ref = ref + np.asarray(p["b"]).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(y), ref)


def test_training_forward_equals_serving_forward_on_a_small_model():
    """A 3-layer SwiGLU-style MLP: training params (float weights) vs serving (tiled codes), jitted."""
    rng = np.random.default_rng(0)
    pol = quant.get_policy("w4a4")
    d, f = 48, 80
    x = jnp.asarray(rng.standard_normal((4, 6, d)), jnp.float32)
    names = {"gate": (d, f), "up": (d, f), "down": (f, d)}
    params = {}
    for name, (k, n) in names.items():
        w = rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k)
        params[name] = {"w": jnp.asarray(w), "s_w": quant.init_step(w, pol(f"mlp.{name}.w")),
                        "s_x": jnp.float32(0.2)}
    params["silu"] = {"s_in": jnp.float32(0.05), "s_out": jnp.float32(0.04)}

    def forward(p, x):
        role = lambda n, t: pol(f"layers.0.mlp.{n}.{t}")
        g = layers.linear(x, p["gate"], role("gate", "x"), role("gate", "w"))
        u = layers.linear(x, p["up"], role("up", "x"), role("up", "w"))
        h = layers.silu_lut(g, p["silu"]["s_in"], p["silu"]["s_out"], pol("layers.0.mlp.silu"))
        return layers.linear((h * u).astype(jnp.float16), p["down"], role("down", "x"), role("down", "w"))

    serving = {k: (layers.prepare_linear(v, pol(f"layers.0.mlp.{k}.w")) if k in names else v) for k, v in params.items()}
    assert isinstance(serving["gate"]["tw"], TiledWeights)
    y_train = jax.jit(forward)(params, x)
    y_serve = jax.jit(forward)(serving, x)
    np.testing.assert_array_equal(np.asarray(y_train), np.asarray(y_serve))
    # and the training forward is differentiable, with finite, non-zero step-size gradients
    loss = lambda p: jnp.mean(forward(p, x).astype(jnp.float32) ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    for name in names:
        assert np.isfinite(np.asarray(grads[name]["w"])).all() and np.abs(np.asarray(grads[name]["s_x"])) > 0
        assert np.abs(np.asarray(grads[name]["s_w"])).sum() > 0
    assert np.abs(float(grads["silu"]["s_out"])) > 0


@settings(max_examples=6)  # each example compiles new shapes
@given(seed=st.integers(0, 2**31), l=st.integers(1, 6), t=st.integers(1, 9), dh=st.integers(1, 16))
def test_attention_products_match_int64_oracle(seed, l, t, dh):
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 3, l, dh)).astype(np.float32), rng.standard_normal((2, 3, t, dh)).astype(np.float32)
    p = rng.uniform(0, 1, (2, 3, l, t)).astype(np.float32)
    tq, tp = TensorQuant(4), TensorQuant(4, signed=False)
    s_q, s_k, s_p = np.float32(0.3), np.float32(0.25), np.float32(1 / 15)
    scores = layers.quantized_product(jnp.asarray(q), jnp.asarray(k), s_q, s_k, layers.ProductSpec("qk", tq, tq))
    qq = np.asarray(quantize(jnp.asarray(q), s_q, 4)).astype(np.int64)
    kq = np.asarray(quantize(jnp.asarray(k), s_k, 4)).astype(np.int64)
    ref = (np.einsum("bhlk,bhtk->bhlt", qq, kq).astype(np.float32) * (s_q * s_k)).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(scores), ref)
    out = layers.quantized_product(jnp.asarray(p), jnp.asarray(k), s_p, s_k, layers.ProductSpec("pv", tp, tq))
    pq = np.asarray(quantize(jnp.asarray(p), s_p, 4, False)).astype(np.int64)
    assert pq.min() >= 0 and pq.max() <= 15
    ref = (np.einsum("bhlt,bhtk->bhlk", pq, kq).astype(np.float32) * (s_p * s_k)).astype(np.float16)
    np.testing.assert_array_equal(np.asarray(out), ref)


@settings(max_examples=3, deadline=None)  # each example compiles new shapes
@given(k=st.integers(1, 70), n=st.integers(1, 40), wb=st.sampled_from([2, 4, 8]), xb=st.sampled_from([2, 4, 8]),
       per_channel=st.booleans(), sink=st.booleans(), seed=st.integers(0, 2**31))
def test_product_gradients_are_the_fake_quant_gradients(k, n, wb, xb, per_channel, sink, seed):
    """The integer linear layer's forward equals the LSQ fake-quant product and its gradients are
    that product's, for every width, per-tensor or per-channel steps, shapes that pad the core
    tiling, and INT8 sink rows with their own step."""
    rng = np.random.default_rng(seed)
    tq_x, tq_w = TensorQuant(xb), TensorQuant(wb, per_channel=per_channel)
    x, p = _rand_layer(rng, k, n, tq_w, tq_x)
    a0 = TensorQuant(8) if sink else None
    spec = layers.ProductSpec("linear", tq_x, tq_w, jnp.float32, a0=a0)
    rows = jnp.asarray(rng.random(x.shape[:-1]) < 0.3) if sink else None
    args = (jnp.asarray(x), p["w"], p["s_x"], p["s_w"], p["s_x"] * 0.5)
    f_int = lambda x, w, sx, sw, sx0: jnp.sum(jnp.sin(layers.quantized_product(x, w, sx, sw, spec, sx0, rows)))
    f_fake = lambda x, w, sx, sw, sx0: jnp.sum(jnp.sin(layers._fake_product(x, w, sx, sw, spec, sx0, rows)))
    np.testing.assert_allclose(f_int(*args), f_fake(*args), rtol=1e-5, atol=1e-5)
    gi, gf = jax.grad(f_int, argnums=(0, 1, 2, 3, 4))(*args), jax.grad(f_fake, argnums=(0, 1, 2, 3, 4))(*args)
    used = 5 if sink else 4  # the sink step only has rows to act on with sink rows
    for a, b in zip(gi[:used], gf[:used]):
        scale = float(np.abs(np.asarray(b)).max())
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6 + 1e-5 * scale)
    assert float(np.abs(np.asarray(gi[1])).max()) > 0  # the weights get a gradient


def test_optimizer_groups_and_activation_step_warm_start():
    params = {"lin": {"w": jnp.ones((4, 4)), "s_w": jnp.ones((4,)), "s_x": jnp.float32(1.0), "b": jnp.ones((2, 4))},
              "norm": jnp.ones((2, 4))}  # stacked (2-D) biases and norms are still not decayed
    from np_jax.quant.optim import lsq_optimizer, param_groups
    groups = param_groups(params)
    assert groups == {"lin": {"w": "weights", "s_w": "weight_steps", "s_x": "act_steps", "b": "other"}, "norm": "other"}
    tx = lsq_optimizer(1e-3, weight_decay=0.1, act_step_warmup_steps=2, grad_clip=None)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    sizes = []
    for _ in range(3):
        upd, state = tx.update(grads, state, params)
        sizes.append((abs(float(upd["lin"]["s_x"])), abs(float(upd["lin"]["s_w"][0]))))
    assert sizes[0][0] == pytest.approx(200 * sizes[0][1], rel=1e-4)  # warm start: 200x
    assert sizes[1][0] == pytest.approx(200 * sizes[1][1], rel=1e-4)
    assert sizes[2][0] == pytest.approx(sizes[2][1], rel=1e-4)  # after the warm-up steps: 1x


def _adam_oracle(grads, b1=0.9, b2=0.95, eps=1e-8):
    """Adam's normalised direction at every step (numpy float64): optax.scale_by_adam's."""
    m = v = 0.0
    for t, g in enumerate(grads, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        yield (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)


@settings(max_examples=10, deadline=None)
@given(st.integers(0, 2 ** 31 - 1), st.floats(1e-3, 1e3))
def test_tensor_rms_adam_moves_each_element_by_its_own_gradient(seed, scale):
    """`scale_by_tensor_rms`: Adam's first moment per element over one second moment per tensor (the
    mean squared gradient); oracle in numpy float64, update by update. Within a tensor, an element
    with twice the gradient moves twice as far (element-wise Adam would move both alike), and the
    direction does not depend on the gradients' overall scale."""
    from np_jax.quant import scale_by_tensor_rms
    rng = np.random.default_rng(seed)
    shapes = {"a": (3, 4), "b": (5,)}
    grads = [{k: scale * rng.normal(size=sh) for k, sh in shapes.items()} for _ in range(4)]
    tx = scale_by_tensor_rms(b1=0.9, b2=0.95)
    state = tx.init({k: jnp.zeros(sh, jnp.float32) for k, sh in shapes.items()})
    m = {k: 0.0 for k in shapes}
    v = {k: 0.0 for k in shapes}
    for t, g in enumerate(grads, 1):
        upd, state = tx.update({k: jnp.asarray(x, jnp.float32) for k, x in g.items()}, state)
        for k, x in g.items():
            m[k], v[k] = 0.9 * m[k] + 0.1 * x, 0.95 * v[k] + 0.05 * np.mean(x * x)
            want = (m[k] / (1 - 0.9 ** t)) / np.sqrt(v[k] / (1 - 0.95 ** t))
            np.testing.assert_allclose(np.asarray(upd[k], np.float64), want, rtol=1e-4, atol=1e-6)
    g1 = {"a": jnp.asarray([[1.0, 2.0]]), "b": jnp.asarray([-3.0])}
    upd, _ = tx.update(g1, tx.init(g1))
    assert float(upd["a"][0, 1]) == pytest.approx(2 * float(upd["a"][0, 0]), rel=1e-6)


@settings(max_examples=12, deadline=None)
@given(st.lists(st.floats(1e-4, 1.0), min_size=3, max_size=3), st.integers(0, 2 ** 31 - 1),
       st.sampled_from([False, True]))
def test_relative_step_rate_moves_each_step_by_a_fraction_of_itself(sizes, seed, relative):
    """With `relative_steps`, a step size moves by rate x Adam's direction x |step| per update (Adam on
    log(step) to first order), so steps 10^4 apart move alike in proportion; without it, by rate x
    direction. Oracle: Adam in numpy float64, applied update by update; the weights' updates never
    depend on the mode."""
    from np_jax.quant.optim import lsq_optimizer
    rng = np.random.default_rng(seed)
    s_w, s_x = np.asarray(sizes[:2], np.float32), np.float32(sizes[2])
    params = {"w": jnp.asarray(rng.normal(size=(2, 2)), jnp.float32), "s_w": jnp.asarray(s_w), "s_x": jnp.asarray(s_x)}
    rate, mult, warm = 1e-2, 3.0, 2
    tx = lsq_optimizer(1e-3, step_learning_rate=rate, relative_steps=relative, act_step_lr_mult=mult,
                       act_step_warmup_steps=warm, grad_clip=None)
    absolute = lsq_optimizer(1e-3, step_learning_rate=rate, act_step_lr_mult=mult, act_step_warmup_steps=warm,
                             grad_clip=None)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=np.shape(p)), jnp.float32), params) for _ in range(4)]
    state, state_abs, p = tx.init(params), absolute.init(params), params
    want = {"s_w": s_w.astype(np.float64), "s_x": np.float64(s_x)}
    dirs = {k: _adam_oracle([np.asarray(g[k], np.float64) for g in grads]) for k in want}
    for t, g in enumerate(grads):
        upd, state = tx.update(g, state, p)
        upd_abs, state_abs = absolute.update(g, state_abs, p)
        np.testing.assert_array_equal(np.asarray(upd["w"]), np.asarray(upd_abs["w"]))
        for k in want:
            r = rate * (mult if k == "s_x" and t < warm else 1.0)
            want[k] = want[k] - r * next(dirs[k]) * (np.abs(want[k]) if relative else 1.0)
        p = jax.tree.map(lambda a, b: a + b, p, upd)
        for k in want:
            np.testing.assert_allclose(np.asarray(p[k], np.float64), want[k], rtol=2e-5, atol=1e-7 * (not relative))
