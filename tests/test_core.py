"""A core's VMM, saturation, compact storage: against a numpy int64 oracle."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from np_jax.chip import core
from np_jax.chip.core import INT32_MAX, INT32_MIN

bits_st = st.sampled_from(core.SUPPORTED_BITS)


def rand_ints(rng, shape, bits, signed=True):
    lo, hi = core.int_range(bits, signed)
    return rng.integers(lo, hi + 1, size=shape).astype(np.int8)


@given(b=st.integers(1, 5), k=st.integers(1, 300), n=st.integers(1, 40), xb=bits_st, wb=bits_st,
       x_signed=st.booleans(), held=st.sampled_from([(np.int8, np.int8), (np.float32, np.int8),
                                                     (np.int8, np.float32), (np.float32, np.float32)]),
       seed=st.integers(0, 2**32 - 1))
def test_core_vmm_matches_int64_oracle(b, k, n, xb, wb, x_signed, held, seed):
    # every dot int_dot picks (int8 for int8-held codes, float32 otherwise where exact) gives the
    # int64 result
    rng = np.random.default_rng(seed)
    x = rand_ints(rng, (b, k), xb, x_signed)
    w = rand_ints(rng, (k, n), wb)
    got = core.core_vmm(jnp.asarray(x, held[0]), jnp.asarray(w, held[1]), x_bits=xb, w_bits=wb, x_signed=x_signed)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got, np.int64), x.astype(np.int64) @ w.astype(np.int64))


def test_core_vmm_exact_beyond_float32_integer_range():
    # Sums past 2^24 are where a float32 stand-in would round.
    k = 2048
    x = np.full((1, k), -128, np.int8)
    w = np.full((k, 3), -128, np.int8)
    w[::2, 1] = 127
    w[5, 2] = 1
    got = np.asarray(core.core_vmm(jnp.asarray(x), jnp.asarray(w)), np.int64)
    ref = x.astype(np.int64) @ w.astype(np.int64)
    assert ref.max() > 2**24
    np.testing.assert_array_equal(got, ref)


def test_accumulator_bound_edges():
    # INT8 x INT8: |x*w| <= 128*128 = 2^14, so K = 2^17 reaches exactly 2^31 and must be refused.
    core.check_accumulator(2**17 - 1, 8, 8)
    with pytest.raises(core.AccumulatorOverflowError, match="K=131072"):
        core.check_accumulator(2**17, 8, 8)
    # The widest legal core reduction hits the extreme values exactly.
    k = 2**17 - 1
    x = jnp.full((1, k), -128, jnp.int8)
    w = jnp.full((k, 1), -128, jnp.int8)
    assert int(core.core_vmm(x, w)[0, 0]) == k * 16384 <= INT32_MAX
    with pytest.raises(core.AccumulatorOverflowError):
        core.core_vmm(jnp.zeros((1, 2**17), jnp.int8), jnp.zeros((2**17, 1), jnp.int8))


def test_core_vmm_rejects_bad_operands():
    with pytest.raises(ValueError, match="bit width"):
        core.core_vmm(jnp.zeros((1, 4), jnp.int8), jnp.zeros((4, 1), jnp.int8), x_bits=3)
    with pytest.raises(TypeError, match="int8"):
        core.core_vmm(jnp.zeros((1, 4), jnp.int32), jnp.zeros((4, 1), jnp.int8))


def _sat_oracle(p):
    acc = p[0].astype(np.int64)
    for row in p[1:]:
        acc = np.clip(acc + row.astype(np.int64), INT32_MIN, INT32_MAX)
    return acc


@given(st.lists(st.lists(st.sampled_from([INT32_MIN, INT32_MIN + 1, -1, 0, 1, 2**30, INT32_MAX - 1, INT32_MAX]),
                         min_size=3, max_size=3), min_size=1, max_size=8))
def test_saturating_sum_matches_clipped_int64(rows):
    p = np.array(rows, np.int64).astype(np.int32)
    got = np.asarray(core.saturating_sum(jnp.asarray(p)), np.int64)
    np.testing.assert_array_equal(got, _sat_oracle(p))


def test_saturating_add_edges():
    a = jnp.array([INT32_MAX, INT32_MIN, INT32_MAX, INT32_MIN, 5], jnp.int32)
    b = jnp.array([1, -1, INT32_MIN, INT32_MAX, -7], jnp.int32)
    np.testing.assert_array_equal(np.asarray(core.saturating_add(a, b)), [INT32_MAX, INT32_MIN, -1, -1, -2])


@settings(max_examples=15)  # every new shape compiles: keep the suite within its budget
@given(bits=bits_st, signed=st.booleans(), n=st.integers(0, 70), lead=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_pack_unpack_roundtrip(bits, signed, n, lead, seed):
    q = rand_ints(np.random.default_rng(seed), (lead, n), bits, signed)
    packed = core.pack_bits(q, bits)
    assert packed.dtype == jnp.uint8
    assert packed.shape[-1] == core.stored_bytes(n, bits)
    np.testing.assert_array_equal(np.asarray(core.unpack_bits(packed, bits, n, signed)), q)


def test_pack_layout_is_little_endian_within_byte():
    packed = core.pack_bits(np.array([1, -2, 3, 7], np.int8), 4)
    np.testing.assert_array_equal(np.asarray(packed), [0xE1, 0x73])


def test_cost_counts():
    c = core.core_vmm_cost(2, 256, 128, x_bits=4, w_bits=4)
    assert c.macs == 2 * 256 * 128 and c.ops == 2 * c.macs
    assert c.cycles == (2 * 2 * 256 * 128) // 4096
    assert c.weight_bytes == 256 * 128 // 2 and c.input_bytes == 2 * 256 // 2
    # A mixed-width VMM runs at the wider operand's rate.
    assert core.core_vmm_cost(2, 256, 128, x_bits=8, w_bits=4).cycles == 2 * c.cycles
