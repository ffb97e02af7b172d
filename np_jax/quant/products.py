"""Quantized layers: one integer forward for training and serving, with LSQ gradients.

Every quantized product (a linear layer `x @ W`, the attention scores `Q K^T`, the attention
output `P V`) is computed exactly as the chip does it:
  1. quantize the inputs with their LSQ steps (`vector_unit.quantize`),
  2. multiply the integer codes on the core array (`array.array_vmm`) or on cores
     (`core.core_vmm`, vmapped over heads/users), accumulating in int32,
  3. scale the int32 accumulator in the vector unit: `fp16(fp32(acc) * fp32(s_a * s_b))`.
That function is `scaled_int_product`, defined once. Training calls it through a
`jax.custom_vjp` whose backward pass is the VJP of the LSQ fake-quant product
`fq(a, s_a) @ fq(b, s_b)` (float32), so the training forward *is* the serving forward, bit for
bit, and the gradients are the LSQ/straight-through ones.

Serving converts a float linear layer once (`prepare_linear`): its weights are quantized with
the same quantizer and tiled onto the core array (`TiledWeights`); `linear` then skips the
weight quantization but runs the same `scaled_int_product`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from np_jax.chip import activation_unit, core
from np_jax.chip.array import TiledWeights, Tiling, array_vmm, dot_form, tile_weights
from np_jax.quant.lsq import (TensorQuant, act_grad_scale, check_step, dynamic_step, fake_quant, lsq_fake_quant,
                              weight_grad_scale)
from np_jax.chip.vector_unit import VECTOR_DTYPE, code_range, quantize, quantize_between, scale_accumulator

_EINSUM = {"linear": "...k,kn->...n", "qk": "...lk,...tk->...lt", "pv": "...lt,...tk->...lk"}


@dataclass(frozen=True)
class ProductSpec:
    """A quantized product: its kind ("linear", "qk" or "pv"), its operands' quantizers and, for a
    linear layer, the `Tiling` of its weights on the core array (the mapping's own object;
    None: the full grid)."""

    kind: str
    a: TensorQuant
    b: TensorQuant
    out_dtype: object = VECTOR_DTYPE
    tiling: Tiling | None = None
    a0: TensorQuant | None = None  # the width of the rows flagged `sink` (their own steps), if any

    def __post_init__(self):
        if self.kind not in _EINSUM:
            raise ValueError(f"unknown product kind {self.kind!r}")
        if self.a.is_float or self.b.is_float:
            raise ValueError("ProductSpec is for integer products; use float math for float tensors")
        if self.a0 is not None and (self.a0.is_float or self.a0.signed != self.a.signed):
            raise ValueError("sink rows need an integer width of the same signedness as the other rows")

    @property
    def a_bits(self) -> int:
        """The widest code of operand a (the VMM's accumulator bound and rate)."""
        return max(self.a.bits, self.a0.bits) if self.a0 is not None else self.a.bits


def act_codes(a: jax.Array, s_a, spec: ProductSpec, s_a0=None, sink=None) -> tuple[jax.Array, jax.Array]:
    """The vector unit's quantization of an activation: (int8-held codes, each row's step [..., 1]).

    Rows use the static step `s_a` (or, for a dynamic quantizer, max|row| / Q_P); rows where
    `sink` ([...] bool, the rows' leading axes) is set use `s_a0` at width `spec.a0`.
    """
    tq = spec.a
    s_rows = dynamic_step(a, tq) if tq.dynamic else jnp.asarray(s_a, jnp.float32)
    if spec.a0 is None or sink is None:
        return quantize(a, s_rows, tq.bits, tq.signed), s_rows
    # each row at its own step and width in one pass: the same codes as quantizing at both, then
    # choosing by row
    m = sink[..., None]
    (lo, hi), (lo0, hi0) = code_range(tq.bits, tq.signed), code_range(spec.a0.bits, spec.a0.signed)
    s_rows = jnp.where(m, jnp.asarray(s_a0, jnp.float32), s_rows)
    return quantize_between(a, s_rows, jnp.where(m, lo0, lo), jnp.where(m, hi0, hi)), s_rows


def _fake_act(a, s_a, s_a0, sink, spec: ProductSpec):
    tq = spec.a
    s = dynamic_step(a, tq) if tq.dynamic else s_a
    a_hat = lsq_fake_quant(a, s, tq, act_grad_scale(a.shape, tq))
    if spec.a0 is not None:
        a_hat = jnp.where(sink[..., None], lsq_fake_quant(a, s_a0, spec.a0, act_grad_scale(a.shape, spec.a0)), a_hat)
    return a_hat


def _batched_core_vmm(a_q, bT_q, spec: ProductSpec):
    """`a @ bT` over leading batch axes, one core VMM per (user, head): [..., L, K] x [..., K, T]."""
    lead = a_q.shape[:-2]
    a2 = a_q.reshape(-1, *a_q.shape[-2:])
    b2 = jnp.broadcast_to(bT_q, (*lead, *bT_q.shape[-2:])).reshape(-1, *bT_q.shape[-2:])
    f = partial(core.core_vmm, x_bits=spec.a_bits, w_bits=spec.b.bits, x_signed=spec.a.signed, w_signed=spec.b.signed)
    return jax.vmap(f)(a2, b2).reshape(*lead, a_q.shape[-2], bT_q.shape[-1])


def scaled_int_product(a_q: jax.Array, b_q: jax.Array | TiledWeights, s_a: jax.Array, s_b: jax.Array,
                       spec: ProductSpec) -> jax.Array:
    """The chip's product of integer codes, scaled back by the vector unit (the one definition).

    linear: a_q [..., K] codes, b_q `TiledWeights` [K, N], s_b () or [N]  -> [..., N]
    qk:     a_q [..., L, D], b_q [..., T, D]                              -> [..., L, T]
    pv:     a_q [..., L, T], b_q [..., T, D]                              -> [..., L, D]
    """
    if spec.kind == "linear":
        acc = array_vmm(a_q, b_q, x_bits=spec.a_bits, x_signed=spec.a.signed)
    elif spec.kind == "qk":
        acc = _batched_core_vmm(a_q, jnp.swapaxes(b_q, -1, -2), spec)
    else:
        acc = _batched_core_vmm(a_q, b_q, spec)
    return scale_accumulator(acc, jnp.asarray(s_a, jnp.float32) * jnp.asarray(s_b, jnp.float32), spec.out_dtype)


def _quantize_b(b, s_b, spec: ProductSpec, rows: int):
    """Operand b's codes; a linear layer's tiled and held in the form whose exact dot is the faster
    for `rows` input rows (`dot_form`: int8 for a whole window, 0.4-0.7x of the float32 dot)."""
    b_q = quantize(b, s_b, spec.b.bits, spec.b.signed)
    if spec.kind != "linear":
        return b_q
    return tile_weights(b_q, bits=spec.b.bits, signed=spec.b.signed, tiling=spec.tiling, form=dot_form(rows))


def _fake_product(a, b, s_a, s_b, spec: ProductSpec, s_a0=None, sink=None):
    """The LSQ fake-quant product whose gradients the integer product uses."""
    a_hat = _fake_act(a, s_a, s_a0, sink, spec)
    g_b = weight_grad_scale(b.shape, spec.b) if spec.kind == "linear" else act_grad_scale(b.shape, spec.b)
    b_hat = lsq_fake_quant(b, s_b, spec.b, g_b)
    return jnp.einsum(_EINSUM[spec.kind], a_hat, b_hat, preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(6,))
def _quantized_product(a, b, s_a, s_a0, s_b, sink, spec: ProductSpec):
    a_q, s_rows = act_codes(a, s_a, spec, s_a0, sink)
    return scaled_int_product(a_q, _quantize_b(b, s_b, spec, math.prod(a.shape[:-1])), s_rows, s_b, spec)


def _qp_fwd(a, b, s_a, s_a0, s_b, sink, spec):
    return _quantized_product(a, b, s_a, s_a0, s_b, sink, spec), (a, b, s_a, s_a0, s_b, sink)


def _qp_bwd(spec, res, g):
    a, b, s_a, s_a0, s_b, sink = res
    _, vjp = jax.vjp(lambda a, b, s_a, s_a0, s_b: _fake_product(a, b, s_a, s_b, spec, s_a0, sink), a, b, s_a, s_a0, s_b)
    grads = vjp(g.astype(jnp.float32))
    grads = tuple(gr.astype(jnp.asarray(p).dtype) for gr, p in zip(grads, res[:5]))
    return grads + (np.zeros(np.shape(sink), jax.dtypes.float0),)


_quantized_product.defvjp(_qp_fwd, _qp_bwd)


def quantized_product(a, b, s_a, s_b, spec: ProductSpec, s_a0=None, sink=None):
    """Integer forward (`scaled_int_product` of the LSQ codes) with LSQ fake-quant gradients.

    With `spec.a0`, the rows flagged in `sink` ([...] bool) are quantized at `spec.a0` with
    their own step `s_a0` (e.g. the attention sink at the first position, at INT8).
    """
    if spec.a0 is None:
        s_a0, sink = s_a, jnp.zeros((), bool)
    return _quantized_product(a, b, s_a, s_a0, s_b, sink, spec)


# --- linear layers -------------------------------------------------------------------------------

def linear(x: jax.Array, p: dict, x_tq: TensorQuant, w_tq: TensorQuant, *, dtype=VECTOR_DTYPE,
           tiling: Tiling | None = None, sink: jax.Array | None = None, sink_tq: TensorQuant | None = None) -> jax.Array:
    """A linear layer `x @ W + b` under its precision.

    `p` is either a training layer {"w": [K, N] float, "s_w", "s_x", ("b")}, whose weights are
    tiled with `tiling` (the mapping's), or a serving layer from `prepare_linear`
    {"tw": TiledWeights, "s_w", "s_x", ("b")}, which carries its tiling; both run the same
    integer forward. Float precision computes `x @ w` in float32 and returns `dtype`. With
    `sink_tq`, the rows flagged in `sink` ([...] bool) use width `sink_tq` and the step `p["s_x0"]`.
    """
    if w_tq.is_float or x_tq.is_float:
        if "w" not in p:
            raise ValueError("a float layer needs float weights 'w'")
        y = jnp.einsum("...k,kn->...n", x.astype(jnp.float32), p["w"].astype(jnp.float32))
    else:
        spec = ProductSpec("linear", x_tq, w_tq, dtype, tiling, sink_tq)
        s_x0 = p.get("s_x0") if sink_tq is not None else None
        if "tw" in p:
            x_q, s_rows = act_codes(x, p["s_x"], spec, s_x0, sink)
            y = scaled_int_product(x_q, p["tw"], s_rows, p["s_w"], spec)
        else:
            y = quantized_product(x, p["w"], p["s_x"], p["s_w"], spec, s_x0, sink)
    if "b" in p:
        y = y.astype(dtype) + p["b"].astype(dtype)
    return y.astype(dtype)


def check_linear_steps(p: dict, name: str = "w") -> None:
    """Raise ValueError, naming the layer and step, for a non-positive or non-finite step of a
    linear layer (concrete values only: under `jax.jit` the caller checks before)."""
    for key in [k for k in ("s_w", "s_x", "s_x0") if k in p]:
        try:
            check_step(p[key])
        except ValueError as e:
            raise ValueError(f"{name}.{key}: {e}") from None


def prepare_linear(p: dict, w_tq: TensorQuant, tiling: Tiling | None = None, memory=None, name: str = "w") -> dict:
    """Quantize a training layer's weights once and place them on the core array (serving form)."""
    if w_tq.is_float:
        return dict(p)
    check_linear_steps(p, name)
    w_q = quantize(p["w"], p["s_w"], w_tq.bits, w_tq.signed)
    tw = tile_weights(w_q, bits=w_tq.bits, signed=w_tq.signed, tiling=tiling, memory=memory, name=name)
    return {k: v for k, v in p.items() if k != "w"} | {"tw": tw}


# --- the activation-function unit in a trainable form --------------------------------------------

@partial(jax.custom_vjp, nondiff_argnums=(3,))
def silu_lut(x: jax.Array, s_in: jax.Array, s_out: jax.Array, tq: TensorQuant) -> jax.Array:
    """SiLU on the activation unit: quantize `x` (INT8), look the code up, dequantize.

    Forward = the lookup table (bit-exact); backward = LSQ through `fq(silu(fq(x)))`.
    Returns float32 values `code * s_out`.
    """
    lut = activation_unit.build_lut(activation_unit.silu, s_in, s_out, in_bits=tq.bits, out_bits=tq.bits,
                                    in_signed=tq.signed, out_signed=tq.signed)
    q = activation_unit.apply_lut(quantize(x, s_in, tq.bits, tq.signed), lut, in_bits=tq.bits, in_signed=tq.signed)
    return q.astype(jnp.float32) * jnp.asarray(s_out, jnp.float32)


def _silu_fake(x, s_in, s_out, tq):
    h = activation_unit.silu(fake_quant(x, s_in, tq))
    return fake_quant(h, s_out, tq)


def _silu_fwd(x, s_in, s_out, tq):
    return silu_lut(x, s_in, s_out, tq), (x, s_in, s_out)


def _silu_bwd(tq, res, g):
    _, vjp = jax.vjp(lambda *a: _silu_fake(*a, tq), *res)
    return tuple(gr.astype(jnp.asarray(r).dtype) for gr, r in zip(vjp(g.astype(jnp.float32)), res))


silu_lut.defvjp(_silu_fwd, _silu_bwd)
