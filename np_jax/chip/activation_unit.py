"""The per-core activation-function unit: a lookup table over the quantized input domain.

A table maps every integer code of the input width (e.g. the 256 INT8 codes) to an output
code: `lut[q - lo] = quantize(fn(q * s_in), s_out)`. Applying it is a gather, so the result is
bit-exact and deterministic on every backend; building it uses `vector_unit.quantize`, the
single quantization definition. The table can be built from traced step sizes, so the same
function serves training (learned steps) and inference.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from np_jax.chip.core import check_bits, int_range
from np_jax.chip.vector_unit import quantize


def silu(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


def build_lut(fn: Callable[[jax.Array], jax.Array], s_in: jax.Array, s_out: jax.Array, *, in_bits: int = 8,
              out_bits: int = 8, in_signed: bool = True, out_signed: bool = True) -> jax.Array:
    """The table of output codes (int8, length 2^in_bits) for `fn` between two quantized domains."""
    lo, hi = int_range(check_bits(in_bits), in_signed)
    x = jnp.arange(lo, hi + 1, dtype=jnp.float32) * jnp.asarray(s_in, jnp.float32)
    return quantize(fn(x), s_out, out_bits, out_signed)


def apply_lut(q_i8: jax.Array, lut_i8: jax.Array, *, in_bits: int = 8, in_signed: bool = True) -> jax.Array:
    """Look up every input code in the table."""
    lo, _ = int_range(check_bits(in_bits), in_signed)
    if lut_i8.shape != (2**in_bits,):
        raise ValueError(f"a table for INT{in_bits} inputs has {2**in_bits} entries, got {lut_i8.shape}")
    return jnp.take(lut_i8, q_i8.astype(jnp.int32) - lo, axis=0)
