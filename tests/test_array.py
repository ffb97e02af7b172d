"""The core array: tiling, array VMM vs oracle and vs one core, memory capacity, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from np_jax.chip import array as na
from np_jax.chip import core
from np_jax.chip.core import INT32_MAX, INT32_MIN
from np_jax.chip.memory import CoreMemory, CoreMemoryError
from np_jax.spec import NORTHPOLE

bits_st = st.sampled_from(core.SUPPORTED_BITS)


def rand_ints(rng, shape, bits, signed=True):
    lo, hi = core.int_range(bits, signed)
    return rng.integers(lo, hi + 1, size=shape).astype(np.int8)


@settings(max_examples=10)  # each example compiles new shapes
@given(b=st.integers(1, 4), k=st.integers(1, 200), n=st.integers(1, 90), rows=st.integers(1, 16),
       cols=st.integers(1, 16), xb=bits_st, wb=bits_st, seed=st.integers(0, 2**31))
def test_array_vmm_matches_oracle_and_single_core(b, k, n, rows, cols, xb, wb, seed):
    rng = np.random.default_rng(seed)
    x, w = rand_ints(rng, (b, k), xb), rand_ints(rng, (k, n), wb)
    tw = na.tile_weights(jnp.asarray(w), bits=wb, tiling=na.Tiling(k, n, rows, cols))
    got = np.asarray(na.array_vmm(jnp.asarray(x), tw, x_bits=xb), np.int64)
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64))
    one = np.asarray(core.core_vmm(jnp.asarray(x), jnp.asarray(w), x_bits=xb, w_bits=wb), np.int64)
    np.testing.assert_array_equal(got, one)
    net = np.asarray(na.array_vmm(jnp.asarray(x), tw, x_bits=xb, network=True), np.int64)  # cores + network
    np.testing.assert_array_equal(got, net)


@pytest.mark.parametrize("k,fused", [(1023, True), (1024, False), (16 * 1023, False)])
def test_whole_k_float32_dot_only_below_its_exact_bound(k, fused):
    """INT8 x INT8 at the extreme codes: K = 1023 reaches 1023 x 2^14 < 2^24, the largest sum a
    float32 dot adds exactly, and runs as one dot; K = 1024 reaches 2^24 and runs per core (Kb =
    64) through the saturating network; so does 16 x 1023 (each core exact, the whole K not).
    Both give the int64 result, and the per-core path equals `network=True`."""
    x = np.full((2, k), -128, np.int8)
    x[1, ::2] = 127
    w = np.full((k, 3), -128, np.int8)
    w[:, 1] = 127
    w[::3, 2] = 127
    tw = na.tile_weights(jnp.asarray(w), bits=8)
    assert tw.w_RxKbxCxNb.dtype == jnp.float32 and na.network_never_saturates(tw, 8) == fused
    got = np.asarray(na.array_vmm(jnp.asarray(x), tw), np.int64)
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64))
    np.testing.assert_array_equal(got, np.asarray(na.array_vmm(jnp.asarray(x), tw, network=True), np.int64))
    jaxpr = str(jax.make_jaxpr(lambda a: na.array_vmm(a, tw))(jnp.asarray(x)))
    assert (jaxpr.count("dot_general") == 1 and "xor" not in jaxpr) == fused  # one dot, or cores + network


@pytest.mark.parametrize("k,fused", [(2**17 - 1, True), (2**17, False)])
def test_whole_k_int8_dot_only_while_no_int32_sum_can_overflow(k, fused):
    """Int8-held codes: one int8 x int8 -> int32 dot over the whole K while its worst case,
    K x 2^14, fits int32 (K = 2^17 - 1: 2^31 - 2^14); at K = 2^17 the worst case is 2^31, which
    the network could saturate, so the cores and the network run. Extreme codes, int64 oracle."""
    x = np.full((1, k), -128, np.int8)
    w = np.full((k, 2), -128, np.int8)
    w[: k // 2 + 1, 1] = 127
    tw = na.with_form(na.tile_weights(jnp.asarray(w), bits=8), "int8")
    assert tw.w_RxKbxCxNb.dtype == jnp.int8 and na.network_never_saturates(tw, 8) == fused
    got = np.asarray(na.array_vmm(jnp.asarray(x), tw), np.int64)
    want = np.clip(x.astype(np.int64) @ w.astype(np.int64), INT32_MIN, INT32_MAX)  # 16 rows of 2^13: no saturation
    np.testing.assert_array_equal(got, want)
    assert (str(jax.make_jaxpr(lambda a: na.array_vmm(a, tw))(jnp.asarray(x))).count("xor") == 0) == fused


def test_dot_form_and_with_form():
    assert na.dot_form(1) == "float32" and na.dot_form(2) == na.dot_form(28) == "int8"
    w = jnp.asarray(rand_ints(np.random.default_rng(1), (40, 24), 4))
    tw = na.tile_weights(w, bits=4)
    t8 = na.with_form(tw, "int8")
    assert t8.w_RxKbxCxNb.dtype == jnp.int8 and na.with_form(t8, "float32").w_RxKbxCxNb.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(t8.to_matrix()), np.asarray(w))
    x = jnp.asarray(rand_ints(np.random.default_rng(2), (3, 40), 8))
    np.testing.assert_array_equal(np.asarray(na.array_vmm(x, t8)), np.asarray(na.array_vmm(x, tw)))
    with pytest.raises(ValueError, match="form"):
        na.with_form(tw, "int4")


@settings(max_examples=12)  # every new shape compiles the tiling: keep the suite within its budget
@given(k=st.integers(1, 100), n=st.integers(1, 100), rows=st.integers(1, 16), cols=st.integers(1, 16),
       seed=st.integers(0, 2**31))
def test_tiling_blocks_partition_the_matrix(k, n, rows, cols, seed):
    t = na.Tiling(k, n, rows, cols)
    w = rand_ints(np.random.default_rng(seed), (k, n), 8)
    tw = na.tile_weights(jnp.asarray(w), bits=8, tiling=t)
    seen = np.zeros((k, n), np.int64)
    for r in range(rows):
        for c in range(cols):
            ks, ns = t.block(r, c)
            seen[ks, ns] += 1
            blk = np.asarray(tw.core_block(r, c))
            np.testing.assert_array_equal(blk[: ks.stop - ks.start, : ns.stop - ns.start], w[ks, ns])
            assert not blk[ks.stop - ks.start:].any() and not blk[:, ns.stop - ns.start:].any()  # zero padding
            if ks.stop > ks.start and ns.stop > ns.start:
                assert t.core_of(ks.start, ns.start) == (r, c)
    np.testing.assert_array_equal(seen, 1)
    np.testing.assert_array_equal(np.asarray(tw.to_matrix()), w)
    assert t.values_RxC().sum() == k * n


def test_partial_sum_network_saturates_in_row_order():
    # Three core rows, each reducing the widest legal K (2^17 - 1) of INT8 x INT8, so each
    # partial sum is up to 2^31 - 2^14. Column 0: +max, +max, +max saturates at INT32_MAX.
    # Column 1: -max three times saturates at INT32_MIN. Column 2: +max, +max, -max saturates
    # after row 1 and comes back down: the result depends on the (defined) row order.
    kb = 2**17 - 1
    k = 3 * kb
    x = jnp.full((1, k), -128, jnp.int8)
    w = np.full((k, 3), -128, np.int8)
    w[:, 1] = 127
    w[2 * kb:, 2] = 127
    tw = na.tile_weights(jnp.asarray(w), bits=8, tiling=na.Tiling(k, 3, rows=3, cols=1))
    got = np.asarray(na.array_vmm(x, tw), np.int64)[0]
    partials = (-128 * w.astype(np.int64)).reshape(3, kb, 3).sum(1)
    acc = partials[0]
    for p in partials[1:]:
        acc = np.clip(acc + p, INT32_MIN, INT32_MAX)
    np.testing.assert_array_equal(got, acc)
    assert got[0] == INT32_MAX and got[1] == INT32_MIN
    assert got[2] == INT32_MAX + partials[2, 2] != partials[:, 2].sum()


def test_core_reduction_overflow_is_refused_at_mapping():
    w = jnp.zeros((2**17, 1), jnp.int8)
    tw = na.tile_weights(w, bits=8, tiling=na.Tiling(2**17, 1, rows=1, cols=1))
    with pytest.raises(core.AccumulatorOverflowError):
        na.array_vmm(jnp.zeros((1, 2**17), jnp.int8), tw)


def test_capacity_error_names_card_core_and_bytes():
    mem = CoreMemory(card=3)
    cap = NORTHPOLE.core_sram_bytes
    # 4096 x 4096 INT8 over 256 cores = 64 KiB each: twelve fit, the thirteenth overflows by 64 KiB.
    w = jnp.zeros((4096, 4096), jnp.int8)
    for i in range(12):
        na.tile_weights(w, bits=8, memory=mem, name=f"w{i}")
    assert (mem.used_RxC == 12 * 65536).all() and 12 * 65536 == cap
    with pytest.raises(CoreMemoryError) as e:
        na.tile_weights(w, bits=8, memory=mem, name="w12")
    assert e.value.card == 3 and e.value.bytes_over == 65536 and e.value.core == (0, 0)
    assert "card 3, core (0, 0)" in str(e.value) and "65,536 B" in str(e.value) and "'w12'" in str(e.value)
    assert mem.used_RxC.max() == cap  # a refused placement leaves the ledger unchanged


@given(k=st.integers(1, 3000), n=st.integers(1, 3000), bits=bits_st)
def test_byte_accounting_at_stored_width(k, n, bits):
    t = na.Tiling(k, n)
    per = t.bytes_on_chip(bits)
    assert per.sum() >= k * n * bits // 8
    assert per.sum() <= k * n * bits / 8 + 256  # at most one partial byte per core
    mem = CoreMemory()
    mem.allocate("w", per, kind="weights")
    assert mem.bytes_by_kind() == {"weights": int(per.sum())}


def test_a_name_is_placed_once_until_released():
    mem, per = CoreMemory(card=2), np.ones((NORTHPOLE.grid_rows, NORTHPOLE.grid_cols), np.int64)
    mem.allocate("kv", per, kind="kv_cache")
    with pytest.raises(ValueError, match="card 2: 'kv' is already placed"):
        mem.allocate("kv", per)
    mem.release("kv")
    assert mem.used_RxC.sum() == 0 and not mem.allocations
    mem.allocate("kv", 2 * per)  # released: the name is free again
    assert mem.used_RxC.sum() == 2 * per.sum()
    with pytest.raises(KeyError, match="nothing named 'w'"):
        mem.release("w")


def test_subgrid_tiling_places_on_its_cores_only():
    t = na.Tiling(64, 32, rows=4, cols=2, row0=10, col0=14)
    per = t.bytes_on_chip(4)
    assert per[10:14, 14:16].sum() == 64 * 32 // 2 and per.sum() == per[10:14, 14:16].sum()
    assert t.core_of(63, 31) == (13, 15)
    with pytest.raises(ValueError, match="exceeds"):
        na.Tiling(64, 32, rows=4, cols=4, row0=14).bytes_on_chip(4)


def test_out_of_range_weights_rejected():
    with pytest.raises(ValueError, match="outside INT4"):
        na.tile_weights(jnp.array([[8]], jnp.int8), bits=4)


def test_sharded_core_rows_equal_unsharded():
    assert len(jax.devices()) == 16
    rng = np.random.default_rng(0)
    x, w = rand_ints(rng, (3, 512), 4), rand_ints(rng, (512, 96), 4)
    tw = na.tile_weights(jnp.asarray(w), bits=4)
    mesh = na.core_mesh()
    sw = na.shard_weights(tw, mesh)
    assert len(sw.w_RxKbxCxNb.sharding.device_set) == 16
    f = jax.jit(lambda x, t: na.array_vmm(x, t, x_bits=4))
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x), sw)), np.asarray(f(jnp.asarray(x), tw)))
    np.testing.assert_array_equal(np.asarray(f(jnp.asarray(x), tw), np.int64), x.astype(np.int64) @ w.astype(np.int64))


def test_array_cost_reports_busiest_core():
    t = na.Tiling(4096, 14336)
    c = na.array_vmm_cost(2, t, x_bits=4, w_bits=4)
    assert c.cores == 256 and c.macs == 2 * 4096 * 14336
    assert c.cycles == -(-2 * 2 * 256 * 896 // 4096)
    assert c.weight_bytes == 4096 * 14336 // 2
    assert c.partial_sum_bytes == 4 * 2 * 14336 * 15
