"""One NorthPole core: the integer vector-matrix multiplier (VMM) and its cost.

Shape-suffix legend used across np_jax: B batch (rows of activations), K reduction (input
features), N output features, R/C core-grid rows/columns, Kb/Nb the block of K/N one core
holds. The dtype suffix is the *storage* dtype (`_i8`, `_i32`); the integer width the values
actually use (INT8/INT4/INT2) travels as an explicit `bits` argument.

Numerics (defined once here):
- Operands are integers held in int8 arrays: INT8 values in [-128, 127], INT4 in [-8, 7],
  INT2 in [-2, 1] (unsigned operands: [0, 2^b - 1]). 4-bit and 2-bit values are *stored*
  compactly (`pack_bits`), but computed as int8, because XLA CPU cannot compile int4 x int4
  dots with an integer accumulator.
- A core accumulates in int32. The per-core reduction length is fixed by the mapping, so the
  worst-case |accumulator| is known statically: `core_vmm` raises `AccumulatorOverflowError`
  if a mapping could overflow a core's int32 accumulator. Partial sums from several cores are
  combined by the partial-sum network with *saturating* int32 addition in a fixed order
  (`saturating_sum`), so overflow there is defined: it clamps to [-2^31, 2^31 - 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from np_jax.spec import NORTHPOLE, ChipSpec, vmm_ops_per_cycle

SUPPORTED_BITS = (2, 4, 8)
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1


class AccumulatorOverflowError(ValueError):
    """A VMM whose int32 accumulator could overflow inside one core."""


def check_bits(bits: int) -> int:
    """Validate an integer width; returns it."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"bit width must be one of {SUPPORTED_BITS} (NorthPole INT8/INT4/INT2), got {bits!r}")
    return int(bits)


def int_range(bits: int, signed: bool = True) -> tuple[int, int]:
    """Inclusive integer range of a `bits`-wide operand: (-2^(b-1), 2^(b-1)-1) or (0, 2^b-1)."""
    bits = check_bits(bits)
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def max_abs(bits: int, signed: bool = True) -> int:
    lo, hi = int_range(bits, signed)
    return max(-lo, hi)


def accumulator_bound(k: int, x_bits: int, w_bits: int, x_signed: bool = True, w_signed: bool = True) -> int:
    """Worst-case |sum_k x_k w_k| for a reduction of length k."""
    return k * max_abs(x_bits, x_signed) * max_abs(w_bits, w_signed)


def check_accumulator(k: int, x_bits: int, w_bits: int, x_signed: bool = True, w_signed: bool = True) -> None:
    """Raise if a reduction of length `k` could overflow a core's int32 accumulator."""
    bound = accumulator_bound(k, x_bits, w_bits, x_signed, w_signed)
    if bound > INT32_MAX:
        raise AccumulatorOverflowError(
            f"a core reduction over K={k} at INT{x_bits} x INT{w_bits} can reach |acc| = {bound:,}, "
            f"beyond the int32 accumulator ({INT32_MAX:,}); split K over more core rows"
        )


F32_EXACT = 1 << 24  # every integer below 2^24 is a float32, so are sums of such integers below it


def exact_in_float32(k: int, x_bits: int, w_bits: int, x_signed: bool = True, w_signed: bool = True) -> bool:
    """Whether a float32 dot of these integer operands is exact: every partial sum, in any order,
    is an integer below 2^24 (INT8 x INT8 up to K = 1023, INT4 x INT4 up to K = 262,143)."""
    return accumulator_bound(k, x_bits, w_bits, x_signed, w_signed) < F32_EXACT


CODE_DTYPES = (jnp.int8, jnp.float32)  # integer codes are held in int8, or in float32 (the dot's form)


def int_dot(x_codes: jax.Array, w_codes: jax.Array, dims, *, k: int, x_bits: int, w_bits: int,
            x_signed: bool = True, w_signed: bool = True) -> jax.Array:
    """`lax.dot_general` of integer codes to an int32 accumulator, in the form they are held.

    Both held in int8: the int8 x int8 -> int32 dot on them as they are (no conversion pass over
    the operands, e.g. a KV cache). Otherwise float32 (at HIGHEST precision, so no TF32 on GPUs)
    where `exact_in_float32`, else int8 x int8 accumulated in int32. All give the int64 result
    while `check_accumulator` holds. Holders pick the form by the rows they multiply
    (`array.dot_form`).
    """
    both_int8 = x_codes.dtype == jnp.int8 and w_codes.dtype == jnp.int8
    if not both_int8 and exact_in_float32(k, x_bits, w_bits, x_signed, w_signed):
        acc = jax.lax.dot_general(x_codes.astype(jnp.float32), w_codes.astype(jnp.float32), dims,
                                  precision=jax.lax.Precision.HIGHEST)
        return acc.astype(jnp.int32)
    return jax.lax.dot_general(x_codes.astype(jnp.int8), w_codes.astype(jnp.int8), dims,
                               preferred_element_type=jnp.int32)


def core_vmm(x_BxK_i8: jax.Array, w_KxN_i8: jax.Array, *, x_bits: int = 8, w_bits: int = 8,
             x_signed: bool = True, w_signed: bool = True) -> jax.Array:
    """One core's VMM: int32 accumulator of `x @ w` over integer operands (codes held in int8 or
    float32).

    Exact (equal to an int64 computation) whenever `check_accumulator` passes, which this
    function enforces from the static shapes and bit widths.
    """
    check_bits(x_bits), check_bits(w_bits)
    if x_BxK_i8.dtype not in CODE_DTYPES or w_KxN_i8.dtype not in CODE_DTYPES:
        raise TypeError(f"core_vmm takes integer codes held in int8 or float32, got {x_BxK_i8.dtype} and "
                        f"{w_KxN_i8.dtype}")
    k = x_BxK_i8.shape[-1]
    check_accumulator(k, x_bits, w_bits, x_signed, w_signed)
    return int_dot(x_BxK_i8, w_KxN_i8, (((x_BxK_i8.ndim - 1,), (0,)), ((), ())), k=k, x_bits=x_bits,
                   w_bits=w_bits, x_signed=x_signed, w_signed=w_signed)


def saturating_add(a_i32: jax.Array, b_i32: jax.Array) -> jax.Array:
    """int32 addition that clamps to [INT32_MIN, INT32_MAX] instead of wrapping."""
    s = a_i32 + b_i32  # wraps (two's complement) on overflow
    overflow = ((a_i32 ^ s) & (b_i32 ^ s)) < 0  # both operands' sign differs from the result's
    return jnp.where(overflow, jnp.where(a_i32 < 0, jnp.int32(INT32_MIN), jnp.int32(INT32_MAX)), s)


def saturating_sum(p_RxD_i32: jax.Array, axis: int = 0) -> jax.Array:
    """Sum int32 partial sums along `axis` in index order (0, 1, 2, ...) with saturation.

    The order is part of the definition: saturating addition is not associative.
    """
    p = jnp.moveaxis(p_RxD_i32, axis, 0)
    acc = p[0]
    for r in range(1, p.shape[0]):
        acc = saturating_add(acc, p[r])
    return acc


# --- compact storage of sub-byte values --------------------------------------------------------

def pack_bits(q_i8: np.ndarray | jax.Array, bits: int) -> jax.Array:
    """Pack integers of width `bits` (held in int8) along the last axis into uint8 bytes.

    Element j of a group of `8 // bits` goes to bits [j*bits, (j+1)*bits) of its byte
    (little-endian within the byte). The last axis is zero-padded to a whole byte.
    """
    bits = check_bits(bits)
    q = jnp.asarray(q_i8)
    if bits == 8:
        return jax.lax.bitcast_convert_type(q.astype(jnp.int8), jnp.uint8)
    per = 8 // bits
    pad = (-q.shape[-1]) % per
    q = jnp.pad(q, [(0, 0)] * (q.ndim - 1) + [(0, pad)])
    u = (q.astype(jnp.int32) & ((1 << bits) - 1)).reshape(*q.shape[:-1], -1, per)
    shifts = jnp.arange(per, dtype=jnp.int32) * bits
    return jnp.sum(u << shifts, axis=-1).astype(jnp.uint8)


def unpack_bits(packed_u8: jax.Array, bits: int, n: int, signed: bool = True) -> jax.Array:
    """Inverse of `pack_bits`: the first `n` values of the last axis, as int8."""
    bits = check_bits(bits)
    p = jnp.asarray(packed_u8)
    if bits == 8:
        return jax.lax.bitcast_convert_type(p, jnp.int8)[..., :n]
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.int32) * bits
    u = (p.astype(jnp.int32)[..., None] >> shifts) & ((1 << bits) - 1)
    u = u.reshape(*p.shape[:-1], -1)[..., :n]
    if signed:
        u = jnp.where(u >= 2 ** (bits - 1), u - 2**bits, u)
    return u.astype(jnp.int8)


def stored_bytes(n_values: int, bits: int) -> int:
    """Bytes that `n_values` integers of width `bits` occupy in core SRAM (packed)."""
    return math.ceil(n_values * check_bits(bits) / 8)


# --- cost --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VmmCost:
    """What one VMM costs, in the units the performance model consumes.

    `cycles` is the critical path: the busiest core's VMM cycles (all cores run in parallel).
    The VMM runs at the rate of its wider operand (e.g. INT8 x INT4 runs at the INT8 rate).
    """

    macs: int  # useful multiply-accumulates (unpadded shapes)
    bits: int  # the precision the VMM array runs at
    cores: int  # cores that hold a block
    cycles: int  # cycles of the busiest core
    weight_bytes: int  # weight bytes read from core SRAM (packed)
    input_bytes: int  # activation bytes delivered to cores over the activation NoC
    partial_sum_bytes: int  # int32 partial sums moved between cores on the partial-sum NoC
    output_bytes: int  # int32 results leaving the array

    @property
    def ops(self) -> int:
        return 2 * self.macs

    def seconds(self, chip: ChipSpec = NORTHPOLE) -> float:
        return self.cycles / chip.clock_hz


PSUM_BYTES = 4  # one int32 partial sum on the partial-sum network


def _maximum(a, b):
    return jnp.maximum(a, b) if isinstance(a, jax.Array) or isinstance(b, jax.Array) else max(a, b)


def block_work(b, kb, nb, x_bits, w_bits, ops_per_cycle_int8) -> dict:
    """What one core does for its [b, Kb] x [Kb, Nb] block product: VMM cycles at the wider
    operand's rate, weight bytes it reads (packed), input bytes it receives, int32 partial-sum
    bytes it passes on. Plain arithmetic on Python numbers or traced values, so the concrete
    costs here and the (relaxed, differentiable) performance model are one formula."""
    bits = _maximum(x_bits, w_bits)
    return {"vmm_cycles": 2 * b * kb * nb / vmm_ops_per_cycle(ops_per_cycle_int8, bits),
            "weight_bytes": kb * nb * w_bits / 8, "input_bytes": b * kb * x_bits / 8,
            "psum_bytes": PSUM_BYTES * b * nb}


def vmm_cycles(b: int, kb: int, nb: int, bits: int, chip: ChipSpec = NORTHPOLE) -> int:
    """Cycles for one core to multiply a [b, kb] block by a [kb, nb] block."""
    return math.ceil(block_work(b, kb, nb, check_bits(bits), bits, chip.vmm_ops_per_cycle_int8)["vmm_cycles"])


def core_vmm_cost(b: int, k: int, n: int, x_bits: int, w_bits: int, chip: ChipSpec = NORTHPOLE) -> VmmCost:
    """Cost of `core_vmm` on a single core (no partial-sum traffic)."""
    bits = max(check_bits(x_bits), check_bits(w_bits))
    return VmmCost(
        macs=b * k * n, bits=bits, cores=1, cycles=vmm_cycles(b, k, n, bits, chip),
        weight_bytes=stored_bytes(k * n, w_bits), input_bytes=stored_bytes(b * k, x_bits),
        partial_sum_bytes=0, output_bytes=PSUM_BYTES * b * n,
    )
