"""Vector unit (fixed-order FP16 numerics) and activation unit (lookup table)."""

import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from np_jax.chip import activation_unit as au
from np_jax.chip import vector_unit as vu


@given(n=st.integers(1, 700), seed=st.integers(0, 2**31))
def test_tree_sum_close_to_float64_and_order_fixed(n, seed):
    x = np.random.default_rng(seed).standard_normal((3, n)).astype(np.float32)
    got = np.asarray(vu.tree_sum(jnp.asarray(x)))
    np.testing.assert_allclose(got, x.astype(np.float64).sum(-1), rtol=1e-5, atol=1e-4)
    # The pairwise order is explicit: compare with a numpy re-implementation bit for bit.
    p = 1 << max(0, (n - 1).bit_length())
    y = np.pad(x, ((0, 0), (0, p - n)))
    while y.shape[-1] > 1:
        y = y[:, : y.shape[-1] // 2] + y[:, y.shape[-1] // 2:]
    np.testing.assert_array_equal(got, y[:, 0])


def test_vector_unit_is_sharding_invariant():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 576)), jnp.float16)
    g = jnp.ones((576,), jnp.float16)
    f = jax.jit(lambda x: vu.rmsnorm(x, g, 1e-5))
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    np.testing.assert_array_equal(np.asarray(f(xs)), np.asarray(f(x)))
    assert f(x).dtype == jnp.float16


def test_softmax_masked_rows_sum_to_one():
    s = jnp.asarray(np.random.default_rng(2).standard_normal((4, 9)) * 5, jnp.float32)
    mask = jnp.tril(jnp.ones((4, 9), bool), k=2)
    p = np.asarray(vu.softmax(s, mask), np.float32)
    assert (p[~np.asarray(mask)] == 0).all()
    np.testing.assert_allclose(p.sum(-1), 1.0, atol=2e-3)


@given(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=1, max_size=30),
       st.sampled_from([2, 4, 8]), st.booleans())
def test_quantize_range_and_special_values(vals, bits, signed):
    v = np.array(vals, np.float32)
    if bits == 8 and not signed:  # 0..255 cannot be held in the int8 codes: a clear error
        with pytest.raises(ValueError, match="unsigned 8-bit"):
            vu.quantize(jnp.asarray(v), 0.5, bits, signed)
        return
    q = np.asarray(vu.quantize(jnp.asarray(v), 0.5, bits, signed))
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    assert q.dtype == np.int8 and (q >= lo).all() and (q <= hi).all()
    assert (q[np.isnan(v)] == 0).all()
    assert (q[v == np.inf] == hi).all() and (q[v == -np.inf] == lo).all()


@given(s_in=st.floats(0.005, 0.2), s_out=st.floats(0.005, 0.2))
def test_silu_lut_within_half_step_of_float(s_in, s_out):
    lut = au.build_lut(au.silu, s_in, s_out)
    q = jnp.arange(-128, 128, dtype=jnp.int8)
    codes = np.asarray(au.apply_lut(q, lut), np.int64)
    out = codes * np.float64(np.float32(s_out))
    xin = np.arange(-128, 128) * np.float64(np.float32(s_in))
    ref = xin / (1 + np.exp(-xin))
    inside = (ref >= -128 * s_out) & (ref <= 127 * s_out)
    assert np.all(np.abs(out - ref)[inside] <= s_out / 2 * (1 + 1e-5) + 1e-6)
    assert np.all(codes[~inside & (ref > 0)] == 127)  # saturates at the top code


def test_lut_is_deterministic_and_bit_exact_under_jit():
    lut = au.build_lut(au.silu, 0.05, 0.03)
    q = jnp.asarray(np.random.default_rng(0).integers(-128, 128, (1000,)), jnp.int8)
    a = au.apply_lut(q, lut)
    b = jax.jit(au.apply_lut)(q, jax.jit(lambda: au.build_lut(au.silu, 0.05, 0.03))())
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(lut)[np.asarray(q, np.int64) + 128])


# --- the CLI contract: one line, the Unix exit codes ------------------------------------------------

@pytest.mark.parametrize("exc,code,msg", [(KeyboardInterrupt, 130, "np-jax spec: interrupted"),
                                          (BrokenPipeError, 141, ""), (ValueError("bad thing"), 2, "bad thing")])
def test_cli_interrupts_and_errors_are_one_line(monkeypatch, capsys, exc, code, msg):
    from np_jax.cli import main
    from np_jax.commands import spec

    def boom(args):
        raise exc

    monkeypatch.setattr(spec, "spec_command", boom)
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # a pipe the reader closed is detached, not ours
    assert main(["spec"]) == code
    err = capsys.readouterr().err.strip()
    assert msg in err and "Traceback" not in err and "\n" not in err


def test_run_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path):
    from models.train import checkpoint

    logs = []
    with checkpoint.RunLock(tmp_path, log=logs.append):
        with pytest.raises(ValueError, match=f"in use by another training run \\(process {os.getpid()} on"):
            with checkpoint.RunLock(tmp_path, log=logs.append):
                pass
    assert not logs  # released cleanly: nothing to take over
    # a lock file left by a killed run (its holder recorded, the OS lock gone with the process)
    (tmp_path / checkpoint.LOCK).write_text(json.dumps({"host": "gone", "pid": 999_999_999}))
    with checkpoint.RunLock(tmp_path, log=logs.append):
        pass
    assert logs == [f"taking over the lock of {tmp_path} left by process 999999999 on gone, which is no longer running"]
