"""The per-core FP16 vector unit: elementwise math, reductions, scaling and (re)quantization.

Numerics, defined once and used by every path (training, serving, any backend):
- Values live in float16 (`VECTOR_DTYPE`); elementwise ops (+, -, *, /) are correctly rounded
  float16 operations.
- Reductions (sums for norms and softmax) accumulate in float32 in a fixed order: the reduced
  axis is zero-padded to a power of two and summed by pairwise halving
  (`x[:h] + x[h:]`, h = n/2, n/4, ...), then rounded once. The order therefore does not depend
  on the backend, the device count or XLA's choice of reduction kernel.
- Scaling an int32 VMM accumulator: `float16(float32(acc) * float32(scale))`.
- Quantization to an integer width: `clip(round_half_even(v / s), lo, hi)` in float32, with
  NaN mapped to 0 and +/-inf to the range ends (documented, tested; never undefined).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from np_jax.chip.core import check_bits, int_range

VECTOR_DTYPE = jnp.float16
FP16_BYTES = 2  # bytes of one vector-unit value (norm gains, biases, activation frames)


def tree_sum(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
    """float32 sum along `axis` by pairwise halving over a zero-padded power-of-two length."""
    x = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
    n = x.shape[-1]
    p = 1 << max(0, (n - 1).bit_length())
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, p - n)])
    while x.shape[-1] > 1:
        h = x.shape[-1] // 2
        x = x[..., :h] + x[..., h:]
    out = x[..., 0]
    return jnp.expand_dims(out, axis) if keepdims else out


def rmsnorm(x: jax.Array, gamma: jax.Array, eps: float, dtype=VECTOR_DTYPE) -> jax.Array:
    """RMSNorm over the last axis: `x * rsqrt(mean(x^2) + eps) * gamma`, result in `dtype`.

    mean(x^2) uses `tree_sum`; the normalisation is applied in float32 and rounded to `dtype`
    before the (dtype) multiplication by gamma.
    """
    xf = x.astype(jnp.float32)
    ms = tree_sum(xf * xf, keepdims=True) / x.shape[-1]
    y = (xf * jax.lax.rsqrt(ms + jnp.float32(eps))).astype(dtype)
    return y * gamma.astype(dtype)


def softmax(s: jax.Array, where: jax.Array | None = None, dtype=VECTOR_DTYPE) -> jax.Array:
    """Softmax over the last axis (masked positions get probability 0), result in `dtype`."""
    sf = s.astype(jnp.float32)
    if where is not None:
        sf = jnp.where(where, sf, -jnp.inf)
    m = jnp.max(sf, axis=-1, keepdims=True)  # max is exact in any order
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    e = jnp.exp(sf - m)
    if where is not None:
        e = jnp.where(where, e, 0.0)
    z = tree_sum(e, keepdims=True)
    return (e / jnp.where(z > 0, z, 1.0)).astype(dtype)


def scale_accumulator(acc_i32: jax.Array, scale: jax.Array, dtype=VECTOR_DTYPE) -> jax.Array:
    """Dequantize an int32 VMM accumulator: `dtype(float32(acc) * float32(scale))`."""
    return (acc_i32.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(dtype)


def code_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """The integer range of `bits`-wide codes held in int8; unsigned 8-bit (0..255) does not fit.

    The chip's INT8 lanes are signed: a non-negative tensor (softmax probabilities) quantized
    at 8 bits is signed INT8 and uses codes 0..127.
    """
    if bits == 8 and not signed:
        raise ValueError("unsigned 8-bit codes (0..255) do not fit the INT8 datapath; use signed 8-bit "
                         "(a non-negative tensor such as softmax probabilities then uses codes 0..127)")
    return int_range(check_bits(bits), signed)


def quantize(v: jax.Array, step: jax.Array, bits: int, signed: bool = True) -> jax.Array:
    """Integer codes `clip(round(v / step), lo, hi)` held in int8 (the definition used everywhere).

    Rounding is half-to-even. NaN becomes 0; +inf/-inf become the range ends. `step` must be
    positive (callers validate; see `np_jax.quant`). Every code must fit int8, so unsigned 8-bit
    (0..255) is rejected: the chip's INT8 lanes are signed.
    """
    lo, hi = code_range(bits, signed)
    return quantize_between(v, step, lo, hi)


def quantize_between(v: jax.Array, step: jax.Array, lo, hi) -> jax.Array:
    """`quantize` with the range given as its ends, which may vary by element like `step` (rows of
    two widths in one pass); `quantize` is this at one width's `code_range`."""
    r = jnp.round(v.astype(jnp.float32) / jnp.asarray(step, jnp.float32))
    r = jnp.where(jnp.isnan(r), 0.0, r)
    return jnp.clip(r, lo, hi).astype(jnp.int8)


def dequantize(q_i8: jax.Array, step: jax.Array, dtype=jnp.float32) -> jax.Array:
    return (q_i8.astype(jnp.float32) * jnp.asarray(step, jnp.float32)).astype(dtype)
