"""The integer forward over whole windows (benchmarks/bench_forward.py): rows of two widths
quantized in one pass, and the weights of a window's products held in the faster exact dot form;
the same integers as the definitions, checked against numpy oracles."""

import re

import jax
import numpy as np
from hypothesis import given, settings, strategies as st

from np_jax.chip import dot_form
from np_jax.quant import ProductSpec, TensorQuant, act_codes, dynamic_step, quantized_product


def _np_codes(v, step, bits, signed):
    """clip(round_half_even(v / step)) in float32 numpy; NaN -> 0 (vector_unit.quantize's definition)."""
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.round(v.astype(np.float32) / np.asarray(step, np.float32))
    return np.clip(np.where(np.isnan(r), 0, r), lo, hi).astype(np.int64)


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), signed=st.booleans(), dynamic=st.booleans(), seed=st.integers(0, 2**31),
       shape=st.sampled_from([(5, 7), (2, 3, 6), (1, 4)]))
def test_sink_rows_quantize_in_one_pass(bits, signed, dynamic, seed, shape):
    """`act_codes` with sink rows: each row at its own step and width, as if quantized at both and
    chosen by row (NaN and +-inf included)."""
    if bits == 8 and not signed:
        bits = 4  # unsigned 8-bit codes do not fit the INT8 lanes
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(shape) * rng.choice([0.1, 3.0, 300.0], shape)).astype(np.float32)
    a.flat[rng.integers(0, a.size, 2)] = rng.choice([np.nan, np.inf, -np.inf], 2)
    sink = rng.random(shape[:-1]) < 0.4
    tq, tq0 = TensorQuant(bits, signed, dynamic=dynamic), TensorQuant(8 if signed else 4, signed)
    s_a, s_a0 = np.float32(rng.uniform(0.01, 2.0)), np.float32(rng.uniform(0.5, 50.0))
    spec = ProductSpec("linear", tq, TensorQuant(4), a0=tq0)
    codes, s_rows = jax.jit(lambda a, s, s0, m: act_codes(a, s, spec, s0, m))(a, s_a, s_a0, sink)

    if dynamic:  # the vector unit's per-row step (its own definition, lsq.dynamic_step)
        step = np.asarray(jax.jit(dynamic_step, static_argnums=1)(a, tq))
    else:
        step = np.full(shape[:-1] + (1,), s_a, np.float32)
    want = np.where(sink[..., None], _np_codes(a, s_a0, tq0.bits, signed), _np_codes(a, step, bits, signed))
    np.testing.assert_array_equal(np.asarray(codes, np.int64), want)
    np.testing.assert_array_equal(np.broadcast_to(np.asarray(s_rows), want.shape[:-1] + (1,)),
                                  np.where(sink[..., None], s_a0, step))


def _dot_dtypes(f, *args) -> set[str]:
    """The operand element types of every dot in `f`'s program (StableHLO)."""
    text = jax.jit(f).lower(*args).as_text()
    return {m for line in text.splitlines() if "dot_general" in line
            for m in re.findall(r"tensor<(?:\d+x)+(\w+)>", line.split("->")[0])}


def test_window_products_are_exact_in_the_faster_form():
    """The training form's linear product over a window holds its weights in `dot_form(rows)`
    (int8 from two rows on: one int8 dot over the whole K, also where a float32 dot would not be
    exact, w8a8's K = 1536) and equals the int64 oracle, at one row (float32) too."""
    rng = np.random.default_rng(0)
    k, n = 1536, 40
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 0] = 1.0  # a column of codes at the range end
    s_w = (np.abs(w).max(0) / 127).astype(np.float32)
    spec = ProductSpec("linear", TensorQuant(8), TensorQuant(8, per_channel=True))
    f = lambda x, w, s_x, s_w: quantized_product(x, w, s_x, s_w, spec)  # noqa: E731
    for rows in (1, 2, 256):
        x = (rng.standard_normal((rows, k)) * 4).astype(np.float32)
        x[0, :] = 1e6  # codes at the range end: |acc| up to 1536 * 127^2 > 2^24
        s_x = np.float32(0.05)
        got = np.asarray(jax.jit(f)(x, w, s_x, s_w))
        acc = _np_codes(x, s_x, 8, True) @ _np_codes(w, s_w, 8, True)
        assert np.abs(acc).max() > 2**24
        want = (acc.astype(np.float32) * (s_x * s_w)).astype(np.float16)
        np.testing.assert_array_equal(got, want)
        held = "i8" if dot_form(rows) == "int8" else "f32"
        assert held in _dot_dtypes(f, x, w, s_x, s_w), (rows, held)
    assert dot_form(1) == "float32" and dot_form(256) == "int8"

