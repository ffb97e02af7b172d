"""LSQ quantization (Esser et al., ICLR 2020): the tensor quantizer, step sizes, fake-quant.

One quantizer definition serves training and inference:
- integer codes: `vector_unit.quantize(v, s, bits, signed)` = clip(round(v / s), -Q_N, Q_P);
- fake-quant for gradients: `lsq_fake_quant` returns `q * s` with the LSQ custom VJP:
  d v_hat / d v = 1 inside the clip range, 0 outside (straight-through rounding);
  d v_hat / d s = (-v/s + round(v/s)) inside, -Q_N below, Q_P above; times g.
- gradient scale `g = 1 / sqrt(N * Q_P)`. For a weight step, N is the number of weights the
  step governs (the whole tensor per-tensor; one output channel's K weights per-channel).
  For an activation step, N is the number of features (the size of the quantized vector's last
  axis, e.g. the hidden size), not batch x sequence: the loss is a mean over tokens, so the
  per-token feature count is what keeps step and weight updates in proportion whatever the
  batch shape (the paper's N_F).
- initial step `s0 = 2 * mean(|v|) / sqrt(Q_P)` (per channel: mean over the other axes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from np_jax.chip.core import int_range
from np_jax.chip.vector_unit import code_range, quantize


@dataclass(frozen=True)
class TensorQuant:
    """How one tensor is quantized: width (None = float), signedness, per-channel step, and for
    an activation whether its step is dynamic (per token, computed by the vector unit as
    max|x| / Q_P) instead of a learned static LSQ step."""

    bits: int | None
    signed: bool = True
    per_channel: bool = False  # one step per output channel (last axis of a [K, N] weight)
    dynamic: bool = False

    def __post_init__(self):
        if self.bits is not None:
            code_range(self.bits, self.signed)

    @property
    def is_float(self) -> bool:
        return self.bits is None

    @property
    def q_n(self) -> int:
        return -int_range(self.bits, self.signed)[0]

    @property
    def q_p(self) -> int:
        return int_range(self.bits, self.signed)[1]


FLOAT = TensorQuant(None)


# --- step sizes ---------------------------------------------------------------------------------

def check_step(step) -> None:
    """Raise ValueError for a non-positive or non-finite step size (concrete values only)."""
    if isinstance(step, jax.core.Tracer):
        return
    s = np.asarray(step)
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"LSQ step sizes must be finite and positive, got min {s.min()!r}")


def init_step(v: jax.Array, tq: TensorQuant) -> jax.Array:
    """LSQ initial step `2 * mean|v| / sqrt(Q_P)`: per tensor (shape ()) or per channel ([N]).

    NaN/inf in `v` raise ValueError; an all-zero `v` gets a tiny positive step (not zero).
    """
    v = jnp.asarray(v, jnp.float32)
    if not isinstance(v, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(v))):
        raise ValueError("cannot initialise an LSQ step from data containing NaN or inf")
    axes = tuple(range(v.ndim - 1)) if tq.per_channel else None
    s = 2 * jnp.mean(jnp.abs(v), axis=axes) / math.sqrt(tq.q_p)
    return jnp.maximum(s, jnp.float32(1e-8))


def init_step_max(v: jax.Array, tq: TensorQuant) -> jax.Array:
    """Step `max|v| / Q_P` (per tensor, or per channel): nothing is clipped. For a tensor whose few
    largest values carry what it computes, e.g. the attention sink's key, whose largest channels
    set the sink's score: an MSE-optimal step clips them (models.recipe, `sink_activations`)."""
    v = jnp.asarray(v, jnp.float32)
    if not isinstance(v, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(v))):
        raise ValueError("cannot initialise an LSQ step from data containing NaN or inf")
    axes = tuple(range(v.ndim - 1)) if tq.per_channel else None
    return jnp.maximum(jnp.max(jnp.abs(v), axis=axes) / tq.q_p, jnp.float32(1e-8))


def init_step_mse(v: jax.Array, tq: TensorQuant, candidates: int = 16) -> jax.Array:
    """Step minimising the quantization error `sum (fq(v) - v)^2` over a grid of candidates.

    Candidates are fractions of `max|v| / Q_P` (per channel: per column), searched coarse to
    fine. A post-training calibration alternative to `init_step`: LSQ's mean-based
    initial step clips outliers (e.g. the large inputs of a down projection), which a model
    recovers from only with quantization-aware training.
    """
    v = jnp.asarray(v, jnp.float32)
    if not isinstance(v, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(v))):
        raise ValueError("cannot initialise an LSQ step from data containing NaN or inf")
    return _mse_search(v, tq, candidates)


@partial(jax.jit, static_argnums=(1, 2))
def _mse_search(v: jax.Array, tq: TensorQuant, candidates: int) -> jax.Array:
    # Coarse-to-fine: `candidates` evenly spaced fractions of max|v|, then as many again
    # within one coarse spacing around the best (about 1/candidates^2 resolution). The values
    # are laid out [C, n] so that every sum runs over the minor axis: XLA CPU reduces a
    # [n, 1] column ~20x slower than a row of the same values.
    v_Cxn = v.reshape(-1, v.shape[-1]).T if tq.per_channel else v.reshape(1, -1)
    amax = jnp.maximum(jnp.max(jnp.abs(v_Cxn), axis=1), 1e-8)  # [C]

    def err(frac_C):
        s = (amax * frac_C / tq.q_p)[:, None]
        q = jnp.clip(jnp.round(v_Cxn / s), -tq.q_n, tq.q_p)
        return jnp.sum((q * s - v_Cxn) ** 2, axis=1)

    def best(fracs_MxC):
        errs = jax.lax.map(err, fracs_MxC)
        return jnp.take_along_axis(fracs_MxC, jnp.argmin(errs, axis=0)[None], axis=0)[0]

    step = 1.0 / candidates
    coarse = jnp.broadcast_to((jnp.arange(1, candidates + 1, dtype=jnp.float32) * step)[:, None], (candidates, amax.size))
    c = best(coarse)
    fine = jnp.clip(c[None] + (jnp.arange(candidates, dtype=jnp.float32)[:, None] / candidates - 0.5) * 2 * step,
                    step / candidates, 1.0)
    s = amax * best(fine) / tq.q_p
    return s if tq.per_channel else s[0]


def grad_scale(n: int, tq: TensorQuant) -> float:
    """LSQ gradient scale g = 1 / sqrt(N * Q_P)."""
    return 1.0 / math.sqrt(max(n, 1) * tq.q_p)


def weight_grad_scale(w_shape: tuple[int, ...], tq: TensorQuant) -> float:
    n = int(np.prod(w_shape[:-1])) if tq.per_channel else int(np.prod(w_shape))
    return grad_scale(n, tq)


def act_grad_scale(x_shape: tuple[int, ...], tq: TensorQuant) -> float:
    return grad_scale(int(x_shape[-1]), tq)


# --- the LSQ quantizer --------------------------------------------------------------------------

def _sum_to_shape(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum `x` over the axes that were broadcast to reach its shape from `shape`.

    The leading axes of a per-channel step's gradient ([K, N] -> [N]) are summed as a product
    with a matrix of ones: XLA CPU reduces over a non-minor axis of a large array 4-5x slower
    than it multiplies (SmolLM2's [576, 49,152] output layer: 313 ms against 68 ms; its whole
    QAT gradient 0.73 s against 0.45 s). The same sum, in another order (float32 gradients)."""
    lead = x.ndim - len(shape)
    rest = x.shape[lead:]
    if lead and int(np.prod(rest)) > 1:
        x2 = x.reshape(-1, int(np.prod(rest)))
        # two rows of ones: XLA rewrites a vector-matrix product back into the slow reduction;
        # HIGHEST: no TF32 on GPUs
        ones = jnp.ones((2, x2.shape[0]), x2.dtype)
        x = jnp.matmul(ones, x2, precision=jax.lax.Precision.HIGHEST)[0].reshape(rest)
    elif lead:
        x = jnp.sum(x, axis=tuple(range(lead)))
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and x.shape[i] != 1)
    return jnp.sum(x, axis=axes, keepdims=True) if axes else x


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def lsq_fake_quant(v: jax.Array, s: jax.Array, tq: TensorQuant, g: float) -> jax.Array:
    """Fake-quantized `q * s` (float32) with LSQ gradients for `v` and `s` (s broadcasts to v)."""
    return quantize(v, s, tq.bits, tq.signed).astype(jnp.float32) * jnp.asarray(s, jnp.float32)


def _lsq_fwd(v, s, tq, g):
    return lsq_fake_quant(v, s, tq, g), (v, s)


def _lsq_bwd(tq, g, res, g_out):
    v, s = res
    vs = v.astype(jnp.float32) / jnp.asarray(s, jnp.float32)
    below, above = vs <= -tq.q_n, vs >= tq.q_p  # the paper's open interval -Q_N < v/s < Q_P
    inside = ~(below | above)
    dv = jnp.where(inside, g_out, 0.0).astype(v.dtype)
    ds_elem = jnp.where(below, -float(tq.q_n), jnp.where(above, float(tq.q_p), jnp.round(vs) - vs))
    ds = _sum_to_shape(g_out * ds_elem * g, jnp.shape(s)).reshape(jnp.shape(s))
    return dv, ds.astype(jnp.asarray(s).dtype)


lsq_fake_quant.defvjp(_lsq_fwd, _lsq_bwd)


def dynamic_step(v: jax.Array, tq: TensorQuant) -> jax.Array:
    """The per-token step of a dynamic quantizer: max|v| / Q_P over the last axis ([..., 1]).

    The vector unit's max-reduce (exact in any order), in float32; floored like `init_step`.
    """
    amax = jnp.max(jnp.abs(v.astype(jnp.float32)), axis=-1, keepdims=True)
    return jax.lax.stop_gradient(jnp.maximum(amax / tq.q_p, jnp.float32(1e-8)))


def fake_quant(v: jax.Array, s: jax.Array, tq: TensorQuant, *, weight: bool = False) -> jax.Array:
    """`lsq_fake_quant` with the grad scale chosen from the tensor's shape and kind."""
    g = weight_grad_scale(v.shape, tq) if weight else act_grad_scale(v.shape, tq)
    return lsq_fake_quant(v, s, tq, g)
