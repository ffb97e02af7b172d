"""Tests for hadamard.py: exact orthogonality, Kronecker structure, float and integer apply."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from np_jax.quant import hadamard as hd

# Orders the project rotates by (hidden sizes, head dims, MLP widths).
NEEDED = (64, 128, 192, 576, 1536, 2304, 4096, 12800, 14336)
# the sizes SmolLM2's rotations use run always; Granite's large ones are slow tests
NEEDED_P = [n if n <= 2304 else pytest.param(n, marks=pytest.mark.slow) for n in NEEDED]
EXPECTED_FACTORS = {
    64: (64,),
    128: (128,),
    192: (12, 16),
    576: (36, 16),
    1536: (12, 128),
    2304: (36, 64),
    4096: (4096,),
    12800: (200, 64),  # 100 x 128 is unsupported (q = 49, 99 not prime); 200 = 199 + 1
    14336: (28, 512),
}
SMALL_SUPPORTED = [n for n in range(1, 401) if hd.is_supported(n)]
FAST = settings(max_examples=20, deadline=None)
DENSE_LIMIT = 600  # dense int64 Gram matrices only up to this order (cost n^3)


def _gram_i64(h: np.ndarray) -> np.ndarray:
    h = h.astype(np.int64)
    return h @ h.T


def _matmul_i64(x: np.ndarray, h: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """Exact integer x @ h (h with entries +-1) as int64, h converted a row block at a time.

    Runs on float64 BLAS for speed: every product and partial sum is an integer of magnitude
    <= max|x| * n < 2^53, so float64 represents each one exactly and the result is exact.
    """
    x = np.asarray(x)
    assert np.issubdtype(x.dtype, np.integer)
    assert int(np.max(np.abs(x), initial=0)) * h.shape[0] < 2**53
    out = np.zeros(x.shape[:-1] + (h.shape[1],), dtype=np.float64)
    for s in range(0, h.shape[0], chunk):
        out += x[..., s : s + chunk].astype(np.float64) @ h[s : s + chunk].astype(np.float64)
    return out.astype(np.int64)


def _assert_kron_structure(n: int, h: np.ndarray) -> None:
    """h == kron(hadamard(f) for f in factors(n)), checked one block row at a time."""
    fs = hd.factors(n)
    if len(fs) == 1:  # nothing to compare against but itself
        return
    first = hd.hadamard(fs[0])
    rest = np.ones((1, 1), dtype=np.int8)
    for f in fs[1:]:
        rest = np.kron(rest, hd.hadamard(f))
    p = rest.shape[0]
    assert first.shape[0] * p == n
    for i in range(first.shape[0]):
        np.testing.assert_array_equal(h[i * p : (i + 1) * p], np.kron(first[i : i + 1], rest))


def _assert_orthogonal_randomized(h: np.ndarray, seed: int = 0) -> None:
    """H.T @ (H @ V) == n V exactly for 4 random integer columns V.

    A wrong Gram row r != 0 passes one column with probability <= 1/256, so all four with
    <= 2^-32.
    """
    n = h.shape[0]
    v = np.random.default_rng(seed).integers(-128, 128, size=(4, n))
    hv = _matmul_i64(v, h.T)  # rows of V times H^T, i.e. (H V^T)^T
    np.testing.assert_array_equal(_matmul_i64(hv, h), n * v)


# ---------------------------------------------------------------------------- orders, factors


@pytest.mark.parametrize("n", NEEDED_P)
def test_factors_of_needed_orders(n):
    assert hd.factors(n) == EXPECTED_FACTORS[n]


def test_factors_rule():
    assert hd.factors(1) == (1,)
    assert hd.factors(2) == (2,)
    assert hd.factors(40) == (20, 2)  # largest power of two: not (40,) nor (10, 4)
    assert hd.factors(1360) == (20, 68)  # 85 x 16: no single Paley order, a product of two


def test_unsupported_orders_up_to_100():
    """Multiples of 4 up to 100 that need prime-power Paley or other constructions."""
    assert [n for n in range(4, 101, 4) if not hd.is_supported(n)] == [52, 92, 100]
    assert all(hd.is_supported(2**k) for k in range(15))


@pytest.mark.parametrize("n", (52, 92, 100, 116))
def test_unsupported_order_raises(n):
    with pytest.raises(ValueError, match=rf"\b{n}\b.*m \* 2\^k"):
        hd.hadamard(n)
    with pytest.raises(ValueError, match=rf"\b{n}\b"):
        hd.factors(n)


@pytest.mark.parametrize("n", (3, 6, 10, 18, 50))
def test_nonexistent_order_raises(n):
    with pytest.raises(ValueError, match=rf"no Hadamard matrix of order {n} exists"):
        hd.hadamard(n)


@pytest.mark.parametrize("n", (0, -4))
def test_nonpositive_order_raises(n):
    with pytest.raises(ValueError, match=">= 1"):
        hd.hadamard(n)


def test_non_int_order_raises():
    with pytest.raises(TypeError):
        hd.hadamard(12.0)


# ---------------------------------------------------------------------------- exact orthogonality


@pytest.mark.parametrize("n", NEEDED_P)
def test_needed_orders_exactly_orthogonal(n):
    h = hd.hadamard(n)
    assert h.dtype == np.int8 and h.shape == (n, n)
    assert np.all(np.abs(h) == 1)
    # Each factor exactly in int64 (factors are small, except a pure power of two)...
    for f in hd.factors(n):
        if f <= DENSE_LIMIT:
            np.testing.assert_array_equal(_gram_i64(hd.hadamard(f)), f * np.eye(f, dtype=np.int64))
    # ...the product is their Kronecker product, so its Gram matrix is kron of theirs...
    _assert_kron_structure(n, h)
    # ...and directly: densely when cheap, by an exact randomized identity otherwise.
    if n <= DENSE_LIMIT:
        np.testing.assert_array_equal(_gram_i64(h), n * np.eye(n, dtype=np.int64))
    else:
        _assert_orthogonal_randomized(h)


@FAST
@given(st.sampled_from(SMALL_SUPPORTED))
def test_sampled_supported_orders_exactly_orthogonal(n):
    h = hd.hadamard(n)
    assert h.dtype == np.int8 and np.all(np.abs(h) == 1)
    np.testing.assert_array_equal(_gram_i64(h), n * np.eye(n, dtype=np.int64))
    _assert_kron_structure(n, h)


@pytest.mark.parametrize("n", (12, 20, 44, 60, 68, 84, 108))
def test_paley_i(n):
    """q = n - 1 prime, 3 mod 4 (11, 19, ..., 107).

    H - I is antisymmetric with first row (0, 1, ..., 1).
    """
    assert hd.factors(n) == (n,)
    h = hd.hadamard(n).astype(np.int64)
    s = h - np.eye(n, dtype=np.int64)
    np.testing.assert_array_equal(s, -s.T)
    np.testing.assert_array_equal(s[0], np.r_[0, np.ones(n - 1, dtype=np.int64)])
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


@pytest.mark.parametrize("n", (28, 36, 76, 124, 204))
def test_paley_ii(n):
    """q = n / 2 - 1 prime, 1 mod 4 (13, 17, 37, 61, 101): H is symmetric."""
    assert hd.factors(n) == (n,)
    h = hd.hadamard(n).astype(np.int64)
    np.testing.assert_array_equal(h, h.T)
    np.testing.assert_array_equal(h[:2, :2], [[1, -1], [-1, -1]])  # the 0 block of C
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n, dtype=np.int64))


def test_sylvester_is_standard():
    """H[i, j] = (-1)^popcount(i & j), i.e. [[1, 1], [1, -1]] kron-ed k times."""
    for k in range(0, 11):
        i = np.arange(2**k)
        popcount = np.vectorize(lambda v: bin(v).count("1"))(i[:, None] & i[None, :])
        np.testing.assert_array_equal(hd.hadamard(2**k), 1 - 2 * (popcount % 2))


def test_paley_product_order_orthogonal():
    h = hd.hadamard(1360)
    _assert_kron_structure(1360, h)
    _assert_orthogonal_randomized(h, seed=3)


def test_hadamard_returns_fresh_copy():
    h = hd.hadamard(12)
    h[0, 0] = -h[0, 0]
    assert hd.hadamard(12)[0, 0] == 1


def test_randomized_check_can_fail():
    """The randomized identity used for big orders rejects a single flipped entry."""
    h = hd.hadamard(1536)
    h[5, 7] = -h[5, 7]
    with pytest.raises(AssertionError):
        _assert_orthogonal_randomized(h)


# ---------------------------------------------------------------------------- random signs / Q


def test_random_signs_deterministic():
    a = hd.random_signs(1000, 7)
    assert a.dtype == np.int8 and a.shape == (1000,)
    assert set(np.unique(a).tolist()) == {-1, 1}
    np.testing.assert_array_equal(a, hd.random_signs(1000, 7))
    assert not np.array_equal(a, hd.random_signs(1000, 8))
    assert 400 < int(np.sum(a == 1)) < 600  # fair signs
    assert hd.random_signs(0, 1).shape == (0,)


@pytest.mark.parametrize("n", (12, 28, 192, 576))
@pytest.mark.parametrize("seed", (None, 0, 5))
def test_orthogonal(n, seed):
    q = hd.orthogonal(n, seed)
    assert q.dtype == np.float64 and q.shape == (n, n)
    assert np.max(np.abs(q @ q.T - np.eye(n))) < 1e-12
    signs = np.ones(n) if seed is None else hd.random_signs(n, seed).astype(np.float64)
    np.testing.assert_array_equal(q, signs[:, None] * hd.hadamard(n) / math.sqrt(n))


def test_orthogonal_seed_changes_rows():
    assert not np.array_equal(hd.orthogonal(64, 1), hd.orthogonal(64, 2))
    assert not np.array_equal(hd.orthogonal(64, 1), hd.orthogonal(64))


# ---------------------------------------------------------------------------- float apply


def _dense(n: int, transpose: bool = False) -> np.ndarray:
    h = hd.hadamard(n).astype(np.float64) / math.sqrt(n)
    return h.T if transpose else h


@pytest.mark.parametrize("n", (1, 2, 12, 28, 64, 128, 192, 576, 1360, 1536, 2304, 4096))
def test_apply_matches_dense(n):
    x = np.random.default_rng(n).normal(size=(2, 3, n))
    y = hd.apply(x, n)
    assert isinstance(y, np.ndarray) and y.shape == x.shape and y.dtype == np.float64
    np.testing.assert_allclose(y, x @ _dense(n), rtol=0, atol=1e-12)


def test_apply_large_matches_exact_integer_product():
    """14336: no dense float matrix; integer x makes x @ H exact in int64."""
    n = 14336
    x = np.random.default_rng(1).integers(-100, 100, size=(2, n))
    want = _matmul_i64(x, hd.hadamard(n)) / math.sqrt(n)
    np.testing.assert_allclose(hd.apply(x.astype(np.float64), n), want, rtol=0, atol=1e-9)


@FAST
@given(
    st.sampled_from((12, 20, 24, 36, 40, 48, 60, 96, 192)),
    st.integers(0, 2**32 - 1),
    st.booleans(),
)
def test_apply_random_orders_and_transpose(n, seed, transpose):
    x = np.random.default_rng(seed).normal(size=(4, n)) * 10.0
    y = hd.apply(x, n, transpose=transpose)
    np.testing.assert_allclose(y, x @ _dense(n, transpose), rtol=0, atol=1e-11)


def test_apply_transpose_inverts():
    x = np.random.default_rng(0).normal(size=(3, 1536))
    y = hd.apply(x, 1536)
    np.testing.assert_allclose(hd.apply(y, 1536, transpose=True), x, atol=1e-12)
    # Paley I is not symmetric: without transpose the round trip is not the identity.
    assert np.max(np.abs(hd.apply(y, 1536) - x)) > 1e-3


def test_apply_explicit_factors():
    x = np.random.default_rng(2).normal(size=(2, 1536))
    np.testing.assert_allclose(hd.apply(x, (12, 128)), hd.apply(x, 1536), atol=1e-12)
    # Factor order matters: (128, 12) is kron(H128, H12), another Hadamard matrix.
    other = np.kron(hd.hadamard(128), hd.hadamard(12)) / math.sqrt(1536)
    np.testing.assert_allclose(hd.apply(x, (128, 12)), x @ other, atol=1e-12)
    assert np.max(np.abs(hd.apply(x, (128, 12)) - hd.apply(x, 1536))) > 1e-3


def test_apply_uses_small_factors_only():
    for n in NEEDED:
        fs = hd._apply_factors(n)
        assert math.prod(fs) == n and max(fs) <= 200, (n, fs)


def test_apply_jax_jit_float32():
    n = 2304
    x = np.random.default_rng(4).normal(size=(3, n)).astype(np.float32)
    f = jax.jit(lambda v: hd.apply(v, n))
    y = f(jnp.asarray(x))
    assert isinstance(y, jax.Array) and y.dtype == jnp.float32 and y.shape == x.shape
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ _dense(n), atol=2e-5)
    yt = jax.jit(lambda v: hd.apply(v, n, transpose=True))(y)
    np.testing.assert_allclose(np.asarray(yt), x, atol=2e-5)


def test_apply_rejects_bad_input():
    with pytest.raises(ValueError, match="length 576"):
        hd.apply(np.zeros((2, 575)), 576)
    with pytest.raises(ValueError, match=r"\b52\b"):
        hd.apply(np.zeros((2, 52)), 52)
    with pytest.raises(ValueError, match=r"\b52\b"):
        hd.apply(np.zeros((2, 624)), (12, 52))


# ---------------------------------------------------------------------------- integer apply


@FAST
@given(
    st.sampled_from((1, 2, 12, 28, 36, 64, 192, 576, 1536)),
    st.integers(0, 2**32 - 1),
    st.sampled_from(("uniform", "min", "max", "extreme_mix")),
)
def test_kron_apply_int_exact(n, seed, kind):
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        x = rng.integers(-128, 128, size=(3, n))
    elif kind == "min":
        x = np.full((3, n), -128)
    elif kind == "max":
        x = np.full((3, n), 127)
    else:
        x = rng.choice(np.array([-128, 127]), size=(3, n))
    x = x.astype(np.int8)
    y = hd.kron_apply_int(x, n)
    assert y.dtype == jnp.int32 and y.shape == x.shape
    want = x.astype(np.int64) @ hd.hadamard(n).astype(np.int64)
    np.testing.assert_array_equal(np.asarray(y), want)


@pytest.mark.parametrize("n", (576, pytest.param(4096, marks=pytest.mark.slow), pytest.param(14336, marks=pytest.mark.slow)))
def test_kron_apply_int_largest_magnitude(n):
    """Columns of H signed to +127/-128 give the largest outputs 127 #pos + 128 #neg."""
    h = hd.hadamard(n)
    cols = [0, n // 2 + 1, n - 1]
    x = np.where(h[:, cols].T > 0, 127, -128).astype(np.int8)
    y = np.asarray(hd.kron_apply_int(x, n))
    np.testing.assert_array_equal(y, _matmul_i64(x, h))
    npos = np.sum(h[:, cols] > 0, axis=0)
    np.testing.assert_array_equal(y[np.arange(3), cols], 127 * npos + 128 * (n - npos))
    assert np.max(np.abs(y)) > max(127 * n, 2**15)  # far beyond int8/int16: needs int32


def test_kron_apply_int_jit_and_transpose():
    n = 1536
    x = np.random.default_rng(9).integers(-128, 128, size=(2, 4, n)).astype(np.int8)
    h = hd.hadamard(n).astype(np.int64)
    y = jax.jit(lambda v: hd.kron_apply_int(v, n))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(y), x.astype(np.int64) @ h)
    yt = jax.jit(lambda v: hd.kron_apply_int(v, n, transpose=True))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(yt), x.astype(np.int64) @ h.T)


def test_kron_apply_int_rejects_non_int8():
    with pytest.raises(TypeError, match="int8"):
        hd.kron_apply_int(np.zeros((2, 12), dtype=np.int32), 12)
    with pytest.raises(ValueError, match="length 12"):
        hd.kron_apply_int(np.zeros((2, 13), dtype=np.int8), 12)
