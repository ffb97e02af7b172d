"""Hadamard matrices for rotating LLM activations (QuaRot / SpinQuant style).

A Hadamard matrix H of order n has entries +-1 and H @ H.T == n * I. H / sqrt(n) is then an
orthogonal rotation that spreads outliers across all channels; since its entries are +-1 it is
an exact signed INT2 weight matrix, so the rotation can run as an integer matrix product with
the 1 / sqrt(n) folded into a quantization scale.

Constructions (all generated, no hard-coded matrices):
- Sylvester: order 2^k, H[i, j] = (-1)^popcount(i & j) (= [[1, 1], [1, -1]] kron-ed k times).
- Paley I: q prime, q = 3 (mod 4): order q + 1, H = I + [[0, 1^T], [-1, Q]].
- Paley II: q prime, q = 1 (mod 4): order 2 (q + 1), from the symmetric conference matrix
  C = [[0, 1^T], [1, Q]]: each 0 becomes [[1, -1], [-1, -1]], each +-1 becomes
  +-[[1, 1], [1, -1]].
Q is the Jacobsthal matrix Q[i, j] = chi(j - i mod q), chi the quadratic character mod q
(0 at 0, +1 on nonzero squares, -1 otherwise).
- Kronecker products: kron(A, B) is Hadamard of order a * b when A and B are.

Supported orders: n = m * 2^k where m = 1 or m is a product of one or more Paley orders
(m_i = q + 1 with q prime = 3 mod 4, or m_i = 2 (q + 1) with q prime = 1 mod 4). Prime powers
q = p^e (e > 1) are not implemented, so e.g. 52 (q = 25 or 51), 92 and 100 (q = 49 or 99) are
unsupported; `hadamard` raises ValueError for them. Orders that are not 1, 2 or a multiple of 4
have no Hadamard matrix at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "apply",
    "factors",
    "hadamard",
    "is_supported",
    "kron_apply_int",
    "orthogonal",
    "random_signs",
]

# `apply` / `kron_apply_int` split a Sylvester factor into blocks of at most this order:
# H_{2^a} kron H_{2^b} == H_{2^(a+b)} exactly, so the split changes the cost (sum of the block
# orders per element instead of their product), never the result. 128 matches a typical
# systolic-array / core tile.
_MAX_POW2_BLOCK = 128

# int32 accumulator bound for `kron_apply_int`: |x @ H| <= 128 * n must stay below 2^31.
_MAX_INT_ORDER = 1 << 24

_RULE = (
    "supported orders are n = m * 2^k with m = 1 or m a product of Paley orders "
    "(q + 1 for a prime q = 3 mod 4, 2 (q + 1) for a prime q = 1 mod 4); "
    "prime powers q = p^e, e > 1, are not implemented"
)


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    return all(q % d for d in range(3, math.isqrt(q) + 1, 2))


def _paley_kind(m: int) -> str | None:
    """Which Paley construction gives the non-power-of-two order m ('I', 'II' or None)."""
    if _is_pow2(m):  # 4 = 3 + 1 is Paley I too, but powers of two are Sylvester's
        return None
    # Paley I first: when both apply (e.g. 12 = 11 + 1 = 2 (5 + 1)) it is the smaller build.
    if _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "I"
    if m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "II"
    return None


@lru_cache(maxsize=None)
def _paley_product(m: int) -> tuple[int, ...] | None:
    """Paley orders (ascending) whose product is m, or None when there is none."""
    if _paley_kind(m) is not None:
        return (m,)
    # Every Paley order is a multiple of 4, so a split a * b needs 4 | a and 4 | b.
    for a in range(12, math.isqrt(m) + 1, 4):
        if m % a or (m // a) % 4:
            continue
        left, right = _paley_product(a), _paley_product(m // a)
        if left is not None and right is not None:
            return tuple(sorted(left + right))
    return None


def _check_order(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"Hadamard order must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 1:
        raise ValueError(f"Hadamard order must be >= 1, got {n}")
    return n


@lru_cache(maxsize=None)
def _factors(n: int) -> tuple[int, ...]:
    if n > 2 and n % 4:
        raise ValueError(
            f"no Hadamard matrix of order {n} exists (orders are 1, 2 or multiples of 4); {_RULE}"
        )
    two = (n & -n).bit_length() - 1  # exponent of 2 in n
    # Smallest non-power-of-two part first, i.e. the largest power of two: the Sylvester factor
    # is the cheapest to build and to apply (it splits further into small blocks).
    for k in range(two, -1, -1):
        m = n >> k
        if m == 1:
            return (n,)
        paley = _paley_product(m)
        if paley is not None:
            return paley + ((1 << k,) if k else ())
    raise ValueError(f"Hadamard order {n} is not supported: {_RULE}")


def factors(n: int) -> tuple[int, ...]:
    """Kronecker factor orders of the Hadamard matrix of order n.

    hadamard(n) == kron(hadamard(f_0), hadamard(f_1), ...) for (f_0, f_1, ...) = factors(n).
    The non-power-of-two (Paley) factors come first in ascending order, then the power of two
    (omitted when it is 1). The power of two is the largest possible, i.e. the Paley part is the
    smallest: factors(576) == (36, 16), factors(1536) == (12, 128), factors(64) == (64,),
    factors(12800) == (200, 64) (100 = 12800 / 128 is unsupported).

    Raises ValueError when n is not a supported order.
    """
    return _factors(_check_order(n))


def is_supported(n: int) -> bool:
    """True when `hadamard(n)` can build an order-n matrix."""
    try:
        factors(n)
    except ValueError:
        return False
    return True


def _sylvester(n: int) -> np.ndarray:
    """H_n = [[H, H], [H, -H]] doubled from [[1]]: H[i, j] = (-1)^popcount(i & j)."""
    h = np.ones((1, 1), dtype=np.int8)
    while h.shape[0] < n:  # block doubling in int8: cheaper than an elementwise popcount
        h = np.block([[h, h], [h, -h]])
    return h


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = chi(j - i mod q), int64, for an odd prime q."""
    chi = np.full(q, -1, dtype=np.int64)
    chi[(np.arange(1, q, dtype=np.int64) ** 2) % q] = 1
    chi[0] = 0
    idx = np.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(m: int, kind: str) -> np.ndarray:
    if kind == "I":
        q = m - 1
        s = np.zeros((m, m), dtype=np.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)  # antisymmetric since chi(-1) = -1 for q = 3 mod 4
        # S antisymmetric and S S^T = q I give (I + S)(I + S)^T = (q + 1) I.
        h = np.eye(m, dtype=np.int64) + s
    else:
        q = m // 2 - 1
        c = np.zeros((q + 1, q + 1), dtype=np.int64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)  # symmetric since chi(-1) = +1 for q = 1 mod 4
        # C's zeros are exactly its diagonal, so the block substitution is C kron A + I kron B;
        # C C^T = q I, A A^T = B B^T = 2 I and AB + BA = 0 give H H^T = 2 (q + 1) I.
        a = np.array([[1, 1], [1, -1]], dtype=np.int64)
        b = np.array([[1, -1], [-1, -1]], dtype=np.int64)
        h = np.kron(c, a) + np.kron(np.eye(q + 1, dtype=np.int64), b)
    return h.astype(np.int8)


@lru_cache(maxsize=64)
def _factor_matrix(f: int) -> np.ndarray:
    """Read-only int8 matrix of one power-of-two or single Paley order f."""
    kind = _paley_kind(f)
    h = _sylvester(f) if kind is None else _paley(f, kind)
    h.setflags(write=False)  # cached and shared: callers get copies
    return h


def _kron_all(fs: Sequence[int]) -> np.ndarray:
    out = np.ones((1, 1), dtype=np.int8)
    for f in fs:
        out = np.kron(out, _factor_matrix(f))
    return out


def hadamard(n: int) -> np.ndarray:
    """Hadamard matrix of order n: int8 entries +-1 with H @ H.T == n * I exactly.

    Built as the Kronecker product of the matrices of `factors(n)`; the Sylvester factor is
    symmetric, Paley I factors are not (so H is not symmetric in general). Raises ValueError
    for unsupported orders (see the module docstring for the rule).
    """
    return _kron_all(factors(n))  # a fresh array: np.kron never returns the cached factor


def random_signs(n: int, seed: int) -> np.ndarray:
    """Length-n int8 vector of +-1, each sign a fair draw from numpy's default_rng(seed)."""
    if n < 0:
        raise ValueError(f"length must be >= 0, got {n}")
    bits = np.random.default_rng(seed).integers(0, 2, size=n)
    return (1 - 2 * bits).astype(np.int8)


def orthogonal(n: int, seed: int | None = None) -> np.ndarray:
    """float64 orthogonal matrix diag(s) @ hadamard(n) / sqrt(n).

    s = random_signs(n, seed), or all +1 when seed is None (then the plain normalised
    Hadamard matrix). Dimensionless; Q @ Q.T == I up to rounding.
    """
    h = hadamard(n).astype(np.float64) / math.sqrt(n)
    if seed is None:
        return h
    return random_signs(n, seed).astype(np.float64)[:, None] * h


def _apply_factors(n_or_factors: int | Sequence[int]) -> tuple[int, ...]:
    """Factor orders to apply one after the other; their product is the order n."""
    if isinstance(n_or_factors, Sequence):
        fs = tuple(_check_order(f) for f in n_or_factors)
        if not fs:
            raise ValueError("factor list must not be empty")
        for f in fs:
            factors(f)  # validates: raises ValueError for an unsupported factor
        return fs
    out: list[int] = []
    for f in factors(n_or_factors):
        while _is_pow2(f) and f > _MAX_POW2_BLOCK:
            out.append(_MAX_POW2_BLOCK)
            f //= _MAX_POW2_BLOCK
        out.append(f)
    return tuple(out)


def _factor_for(f: int, transpose: bool) -> np.ndarray:
    h = _factor_matrix(f) if (_is_pow2(f) or _paley_kind(f)) else _kron_all(factors(f))
    return h.T if transpose else h


def apply(x, n_or_factors: int | Sequence[int], *, transpose: bool = False):
    """x @ (H / sqrt(n)) over the last axis of x (or H.T / sqrt(n) when transpose=True).

    n_or_factors is the order n (H = hadamard(n)) or an explicit factor list (f_0, f_1, ...),
    H = kron(hadamard(f_0), hadamard(f_1), ...). The last axis (length n) is reshaped into the
    factor axes and each small factor is contracted in turn, so the n x n matrix is never built
    (cost per element: sum of the factor orders, not n). x is a float numpy or jax array (jnp is
    used for jax arrays, also under jit); integer inputs are promoted to float. The output has
    x's shape and float dtype; the transform is unitless (orthogonal).
    """
    fs = _apply_factors(n_or_factors)
    n = math.prod(fs)
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x)
    if x.ndim == 0 or x.shape[-1] != n:
        raise ValueError(f"last axis of x must have length {n}, got shape {x.shape}")
    if not xp.issubdtype(x.dtype, xp.floating):
        x = x.astype(xp.float64 if xp is np else jnp.result_type(float))
    lead = x.shape[:-1]
    y = xp.reshape(x, lead + fs)
    first = len(lead)
    for f in fs:
        # Scale per factor (not once at the end) so low-precision dtypes stay in range.
        h = (_factor_for(f, transpose).astype(np.float64) / math.sqrt(f)).astype(x.dtype)
        # Contracting the leading factor axis appends the new one last: after all factors the
        # axes are back in their original order, with no explicit transposes.
        y = xp.tensordot(y, h, axes=([first], [0]))
    return xp.reshape(y, lead + (n,))


def kron_apply_int(x_i8, n_or_factors: int | Sequence[int], *, transpose: bool = False):
    """Exact integer x @ H (H.T when transpose=True) over the last axis, without 1 / sqrt(n).

    x_i8 holds integer codes in int8 (numpy or jax array). The factors of H are applied one by
    one with jax.lax.dot_general and an int32 accumulator: the first contraction is int8 x int8
    -> int32, later ones int32 x int32 (an intermediate already exceeds int8). |result| <= 128 n,
    so int32 is exact for n <= 2^24. Returns a jax int32 array of x's shape, equal to
    x.astype(int64) @ hadamard(n).astype(int64). Works under jit.
    """
    fs = _apply_factors(n_or_factors)
    n = math.prod(fs)
    if n > _MAX_INT_ORDER:
        raise ValueError(f"order {n} > 2^24 could overflow the int32 accumulator")
    x = jnp.asarray(x_i8)
    if x.dtype != jnp.int8:
        raise TypeError(f"x_i8 must be int8, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != n:
        raise ValueError(f"last axis of x must have length {n}, got shape {x.shape}")
    lead = x.shape[:-1]
    y = jnp.reshape(x, lead + fs)
    first = len(lead)
    for f in fs:
        h = jnp.asarray(_factor_for(f, transpose), dtype=y.dtype)  # int8 first, then int32
        y = jax.lax.dot_general(
            y, h, (((first,), (0,)), ((), ())), preferred_element_type=jnp.int32
        )
    return jnp.reshape(y, lead + (n,))
