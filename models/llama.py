"""One Granite/Llama-family decoder for float and quantized execution, training and serving.

Pure functions over a parameter pytree. Layers are stacked (leading axis N) and run with
`lax.scan`, so 30 or 40 layers compile once. The precision policy (np_jax.quant) decides,
tensor by tensor, whether a product runs in float32 or as the chip's integer product
(np_jax.quant.products); the module code is the same either way.

Parameters (training form; `prepare_serving` turns every linear layer into core-array tiles):
  embed [V, D]; final_norm [D]; lm_head {"w" [D, V] (untied only), "s_w", "s_x"}
  layers (each leaf has a leading N axis):
    attn_norm [D], mlp_norm [D]
    attn: {"s_x", "q"|"k"|"v": {"w", "s_w", ("b")}, "o": {"w", "s_w", "s_x", ("b")},
           "s_q" (query entering Q K^T), "s_k", "s_v" (KV cache), "s_p" (probabilities)}
    mlp:  {"s_x", "gate"|"up": {"w", "s_w", ("b")}, "down": {"w", "s_w", "s_x", ("b")},
           "s_in", "s_out" (SiLU input/output on the activation unit)}
Weights are stored [K, N] (input, output). Step sizes `s_*` are LSQ steps (np_jax.quant).

KV cache: {"k", "v": [N, B, S, K, E]} holding integer codes (int8-held, at the policy's
width) for quantized policies or float32 for the float policy. Attention masks by position,
so prefill of a padded prompt followed by decode steps equals a full-sequence forward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from np_jax.quant import hadamard
from np_jax.quant import products as qlayers
from np_jax.chip.array import tile_weights
from np_jax import quant
from np_jax.chip import vector_unit as vu
from np_jax.quant import PrecisionPolicy, TensorQuant, get_policy
from models.config import ModelConfig, get_config
from np_jax.appliance.mapping import LAYER_MATRICES, kv_cache_bytes, matrix_tilings, output_tiling
from np_jax.chip.array import TiledWeights, Tiling

Params = dict[str, Any]

LINEARS = LAYER_MATRICES
# Activation quantization points of one layer: parameter path -> policy role (minus "layers.i.").
ACT_STEPS = {
    ("attn", "s_x"): "attn.x", ("attn", "s_q"): "attn.qk.q", ("attn", "s_k"): "attn.kv",
    ("attn", "s_v"): "attn.kv", ("attn", "s_p"): "attn.probs", ("attn", "o", "s_x"): "attn.o.x",
    ("mlp", "s_x"): "mlp.x", ("mlp", "s_in"): "mlp.silu", ("mlp", "s_out"): "mlp.silu",
    ("mlp", "down", "s_x"): "mlp.down.x",
}


def act_steps(cfg: ModelConfig) -> dict[tuple, str]:
    """Every activation step of one layer: parameter path -> policy role. Besides `ACT_STEPS`: the
    online rotations' input steps, and with a sink every step's sink twin ("<key>0", INT8)."""
    out = dict(ACT_STEPS)
    if cfg.qk_rotation:
        out[("attn", "qrot", "s_x")] = out[("attn", "krot", "s_x")] = "attn.rot.x"
    for i in range(len(cfg.down_rotation)):
        out[("mlp", f"rot{i}", "s_x")] = "mlp.rot.x"
    if cfg.sink_positions:
        out |= {path[:-1] + (path[-1] + "0",): "sink" for path in list(out)}
    return out


class ModelInputError(ValueError):
    """Bad tokens or lengths given to the model."""


@dataclass(frozen=True)
class Precision:
    """The policy resolved for one model: its layer groups (runs of layers with equal widths,
    each group scanned as one compiled layer), the tilings of its matrices on the core array
    (the mapping's objects; "lm_head" for the output layer), and an optional override of the
    vector-unit dtype (calibration runs in float32). `layer(role)` is the width in the layer the
    view speaks of (`at(i)`; layer 0 unless asked)."""

    policy: PrecisionPolicy
    compute_dtype: Any = None
    tilings: tuple[tuple[str, Tiling], ...] = ()
    groups: tuple[tuple[int, ...], ...] = ()  # () : one group, every layer

    def layer(self, role: str) -> TensorQuant:
        return self.policy.layer(role)

    def at(self, i: int) -> "Precision":
        """Layer i's view (`layer(role)` is layer i's width)."""
        return dataclasses.replace(self, policy=self.policy.at(i))

    @property
    def mixed(self) -> bool:
        return len(self.groups) > 1

    def head(self, role: str) -> TensorQuant:
        return self.policy.output(role)

    def tiling(self, name: str) -> Tiling | None:
        return dict(self.tilings).get(name)

    @property
    def dtype(self):
        if self.compute_dtype is not None:
            return self.compute_dtype
        return jnp.float32 if self.policy.is_float else vu.VECTOR_DTYPE

    @property
    def kv(self) -> TensorQuant:
        return self.layer("attn.kv")


LAYER_ROLES = tuple(f"{m}.w" for m in LAYER_MATRICES)


def layer_roles(cfg: ModelConfig) -> tuple[str, ...]:
    """Every policy role of one layer of `cfg` (weights, activations, KV cache, the rotations')."""
    return LAYER_ROLES + tuple(sorted(set(act_steps(cfg).values()) - {"sink"})) + (
        ("attn.rot.w",) if cfg.qk_rotation else ()) + (("mlp.rot.w",) if cfg.down_rotation else ())


def model_tilings(cfg: ModelConfig) -> dict[str, Tiling]:
    """The tilings the sequential model uses: every layer matrix and the whole output layer, by
    the mapper's own rule (np_jax.appliance.mapping)."""
    return matrix_tilings(cfg) | {"lm_head": output_tiling(cfg, 1)}


def resolve(policy: str | PrecisionPolicy | Precision, cfg: ModelConfig | None = None,
            tilings: dict[str, Tiling] | None = None) -> Precision:
    if isinstance(policy, Precision):
        return policy
    p = get_policy(policy)
    groups = ()
    if cfg is not None:
        roles = layer_roles(cfg)
        p.check(cfg.n_layers, roles)
        groups = p.layer_groups(cfg.n_layers, roles)
        groups = groups if len(groups) > 1 else ()
    t = tilings if tilings is not None else (model_tilings(cfg) if cfg is not None else {})
    return Precision(p, tilings=tuple(sorted(t.items())), groups=groups)


def layer_groups(prec: Precision, cfg: ModelConfig) -> tuple[tuple[int, ...], ...]:
    """The runs of layers that share every width (one group of every layer if the policy is uniform)."""
    return prec.groups or (tuple(range(cfg.n_layers)),)


def _layer_group_table(prec: Precision, n_layers: int) -> np.ndarray:
    """Each layer's group index (`Precision.groups`)."""
    out = np.zeros((n_layers,), np.int32)
    for g, layers in enumerate(prec.groups):
        out[list(layers)] = g
    return out


def _with_widths(lp: Params, prec: Precision) -> Params:
    """A layer's resident weights labelled with this layer's widths: a stack of layers of several
    widths holds each layer's codes at its own width (their `TiledWeights.bits` the widest)."""
    lay = lp
    for name in LINEARS:
        blk, lin = name.split(".")
        tw = lp.get(blk, {}).get(lin, {}).get("tw")
        tq = prec.layer(f"{name}.w")
        if isinstance(tw, TiledWeights) and not tq.is_float and tw.bits != tq.bits:
            lay = _set(lay, (blk, lin, "tw"), TiledWeights(tw.w_RxKbxCxNb, tw.tiling, tq.bits, tw.signed))
    return lay


def layer_at(lp: Params, x, pos, kv, cfg: ModelConfig, prec: Precision, layer_id, calib=None):
    """`layer` at the widths of layer `layer_id` (a traced or concrete global index): one branch
    per layer group, the layer's group chosen at run time (`lax.switch`) when the policy is mixed."""
    if not prec.mixed:
        return layer(lp, x, pos, kv, cfg, prec, calib)
    table = _layer_group_table(prec, cfg.n_layers)
    if isinstance(layer_id, (int, np.integer)):
        p = prec.at(prec.groups[table[layer_id]][0])
        return layer(_with_widths(lp, p), x, pos, kv, cfg, p, calib)

    def branch(g):
        p = prec.at(prec.groups[g][0])

        def run(lp, x, kv):
            c = None if calib is None else _Calib(calib.method, calib.sink_method)
            y, kv_new = layer(_with_widths(lp, p), x, pos, kv, cfg, p, c)
            return (y.astype(x.dtype), kv_new) + (((c.steps, c.token_max),) if c is not None else ())
        return run

    out = jax.lax.switch(jnp.asarray(table)[layer_id], [branch(g) for g in range(len(prec.groups))], lp, x, kv)
    if calib is not None:
        calib.steps.update(out[2][0])
        calib.token_max.update(out[2][1])
    return out[0], out[1]


# --- parameters ------------------------------------------------------------------------------------

def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree.get(path[0], {}), path[1:], value)}


def with_act_steps(layers: Params, cfg: ModelConfig) -> Params:
    """`layers` with every activation step of `act_steps(cfg)` present (new ones 1, until calibrated)."""
    one = jnp.ones((cfg.n_layers,), jnp.float32)
    for path in act_steps(cfg):
        try:
            _get(layers, path)
        except KeyError:
            layers = _set(layers, path, one)
    return layers


def init_params(cfg: ModelConfig | str, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random initialisation (normal, std 0.02; norms 1; step sizes 1 until calibrated)."""
    cfg = get_config(cfg)
    n = cfg.n_layers
    keys = iter(jax.random.split(key, 16))
    normal = lambda shape, std=0.02: (std * jax.random.normal(next(keys), shape)).astype(dtype)
    one = jnp.ones((n,), jnp.float32)

    def lin(k_in, k_out, bias, with_sx=False):
        p = {"w": normal((n, k_in, k_out)), "s_w": jnp.ones((n, k_out), jnp.float32)}
        if bias:
            p["b"] = jnp.zeros((n, k_out), dtype)
        if with_sx:
            p["s_x"] = one
        return p

    d, f = cfg.d_model, cfg.d_ff
    layers = {
        "attn_norm": jnp.ones((n, d), dtype), "mlp_norm": jnp.ones((n, d), dtype),
        "attn": {"s_x": one, "q": lin(d, cfg.q_dim, cfg.attn_bias), "k": lin(d, cfg.kv_dim, cfg.attn_bias),
                 "v": lin(d, cfg.kv_dim, cfg.attn_bias), "o": lin(cfg.q_dim, d, cfg.attn_bias, True),
                 "s_q": one, "s_k": one, "s_v": one, "s_p": one},
        "mlp": {"s_x": one, "gate": lin(d, f, cfg.mlp_bias), "up": lin(d, f, cfg.mlp_bias),
                "down": lin(f, d, cfg.mlp_bias, True), "s_in": one, "s_out": one},
    }
    params = {"embed": normal((cfg.vocab_size, d)), "layers": with_act_steps(layers, cfg), "final_norm": jnp.ones((d,), dtype),
              "lm_head": {"s_w": jnp.ones((cfg.vocab_size,), jnp.float32), "s_x": jnp.float32(1.0)}}
    if not cfg.tied_embeddings:
        params["lm_head"]["w"] = normal((d, cfg.vocab_size))
    return init_weight_steps(params, cfg, "w4a4")


def lm_head_weight(params: Params) -> jax.Array:
    """[D, V] output weights (the transposed embedding when tied)."""
    return params["lm_head"]["w"] if "w" in params["lm_head"] else params["embed"].T


def init_weight_steps(params: Params, cfg: ModelConfig, policy, method: str = "lsq") -> Params:
    """Set every weight step for its policy width: LSQ init `2 mean|w| / sqrt(Q_P)` or MSE-optimal."""
    prec = resolve(policy, cfg)
    init = CALIBRATIONS[method]
    lay = params["layers"]
    for name in LINEARS:
        blk, lin = name.split(".")
        s_w = lay[blk][lin]["s_w"]
        for g in layer_groups(prec, cfg):
            tq = prec.at(g[0]).layer(f"{name}.w")
            if tq.is_float:
                continue
            idx = np.asarray(g)
            s = jax.lax.map(lambda w: init(w, tq), lay[blk][lin]["w"][idx])
            s_w = s_w.at[idx].set(jnp.broadcast_to(s[:, None] if s.ndim == 1 else s, s_w[idx].shape))
        lay = _set(lay, (blk, lin, "s_w"), s_w)
    params = {**params, "layers": lay}
    tq = prec.head("w")
    if not tq.is_float:
        s = init(lm_head_weight(params), tq)
        params = _set(params, ("lm_head", "s_w"), jnp.broadcast_to(s, params["lm_head"]["s_w"].shape))
    return params


# --- the forward pass ------------------------------------------------------------------------------

def rope(x_BxLxHxE: jax.Array, pos_BxL: jax.Array, theta: float) -> jax.Array:
    """Half-split ("rotate_half") rotary embedding, computed in float32."""
    e = x_BxLxHxE.shape[-1]
    inv = 1.0 / (theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
    ang = pos_BxL.astype(jnp.float32)[..., None] * jnp.asarray(inv, jnp.float32)  # [B, L, E/2]
    cos, sin = jnp.cos(ang)[:, :, None, :], jnp.sin(ang)[:, :, None, :]
    x = x_BxLxHxE.astype(jnp.float32)
    x1, x2 = x[..., : e // 2], x[..., e // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BxLxHxE.dtype)


CALIBRATIONS = {"lsq": quant.init_step, "mse": quant.init_step_mse, "max": quant.init_step_max}
CALIB_SAMPLE = 1 << 20  # a larger tensor's step is searched on an evenly strided sample of its values
SINK = TensorQuant(8)  # the attention-sink rows' width (models.config.ModelConfig.sink_positions)


class _Calib:
    """Collects initial steps (from a float forward) for the activation quantization points.

    With a sink (`see(..., sink=mask)`), the step of the path is set from the other rows and the
    path's sink step ("<key>0") from the sink rows, at INT8: the first position's huge values
    (the attention sink) would otherwise set one static step for every token. The sink steps
    are calibrated by `sink_method` (default: `method`).
    """

    def __init__(self, method: str = "lsq", sink_method: str | None = None):
        self.steps: dict[tuple, jax.Array] = {}
        self.method, self.sink_method = method, sink_method
        self.init = CALIBRATIONS[method]
        self.sink_init = CALIBRATIONS[sink_method or method]
        self.token_max: dict[tuple, jax.Array] = {}  # OUTLIER_PATHS: each token's largest |value|

    # where token-wise outliers show (PrefixQuant, arXiv 2410.05265: the down-projection input)
    OUTLIER_PATHS = (("mlp", "down", "s_x"),)

    def _sample(self, v: jax.Array) -> jax.Array:
        d = v.shape[-1]
        v = v.reshape(-1)
        stride = -(-v.size // CALIB_SAMPLE)
        while stride > 1 and math.gcd(stride, d) != 1:  # coprime with the feature axis: every feature sampled
            stride += 1
        return v[::stride] if stride > 1 else v

    def see(self, path: tuple, v: jax.Array, tq: TensorQuant, sink: jax.Array | None = None) -> None:
        if tq.is_float or path is None:
            return
        v = v.astype(jnp.float32)
        if path in self.OUTLIER_PATHS:
            self.token_max[path] = jnp.abs(v).max(-1)
        if sink is None:
            self.steps[path] = self.init(self._sample(v), TensorQuant(tq.bits, tq.signed))
            return
        m = jnp.broadcast_to(sink[..., None], v.shape)
        # excluded rows are zeroed: a zero quantizes exactly under any step (no error, no new max)
        self.steps[path] = self.init(self._sample(jnp.where(m, 0.0, v)), TensorQuant(tq.bits, tq.signed))
        self.see_sink(path[:-1] + (path[-1] + "0",), jnp.where(m, v, 0.0))

    def see_sink(self, path: tuple, v: jax.Array) -> None:
        """The sink step `path` from the sink rows' values `v` (others zeroed: no error, no new max).
        The sink rows are a few of every window's, which a strided sample of the tensor would mostly
        miss: with its own rule (`sink_method`) every value is seen; without, the earlier rule's
        sample is kept (its prepared models stay valid)."""
        v = v.astype(jnp.float32)
        self.steps[path] = self.sink_init(v if self.sink_method else self._sample(v), SINK)


def _lin(x, p, sx, x_tq, w_tq, dtype, calib, path, tiling=None, sink=None, sx0=None):
    if calib is not None:
        calib.see(path, x, x_tq, sink)
        x_tq = w_tq = quant.FLOAT
    q = {**p, "s_x": sx} | ({"s_x0": sx0} if sink is not None else {})
    return qlayers.linear(x, q, x_tq, w_tq, dtype=dtype, tiling=tiling, sink=sink,
                          sink_tq=SINK if sink is not None and not x_tq.is_float else None)


def rotation_matrix(n: int) -> np.ndarray:
    """The online rotation's weights: the Hadamard matrix of order n over sqrt(n) (float32; its
    codes at the step 1 / sqrt(n) are exactly the ±1 entries, an INT2 weight matrix)."""
    return (hadamard.hadamard(n) / math.sqrt(n)).astype(np.float32)


def online_rotation(x: jax.Array, factors: tuple[int, ...], block: dict, role: str, keys: list[str], *,
                    prec: Precision, dtype, calib: _Calib | None = None, sink=None) -> jax.Array:
    """`x @ kron(H_f1 / sqrt(f1), H_f2 / sqrt(f2), ...)` over the last axis, as the chip runs it:
    one integer VMM per factor (INT8 input codes x the factor's ±1 codes, int32 accumulation, the
    vector unit's scale by step / sqrt(f)), the last factor first, each result requantized. Factor
    i's input steps are `block[keys[i]]` ("s_x", and "s_x0" for the sink prefix); `role` ("attn"
    or "mlp") names the block in the precision policy and in calibration paths."""
    lead, n = x.shape[:-1], x.shape[-1]
    r = prec.layer
    steps = [block[k] for k in keys]
    y = x.reshape(*lead, *factors)
    nf = len(factors)
    for i in reversed(range(nf)):
        f = factors[i]
        y = jnp.moveaxis(y, len(lead) + i, -1)  # factor i's axis last
        sk = None if sink is None else jnp.broadcast_to(sink.reshape(*sink.shape, *([1] * (y.ndim - 1 - sink.ndim))),
                                                        y.shape[:-1])
        w = {"w": jnp.asarray(rotation_matrix(f)), "s_w": jnp.full((f,), 1.0 / math.sqrt(f), jnp.float32)}
        y = _lin(y, w, steps[i]["s_x"], r(f"{role}.rot.x"), r(f"{role}.rot.w"), dtype, calib, (role, keys[i], "s_x"),
                 prec.tiling(f"{role}.rot.{i}" if role == "mlp" else f"{role}.rot"), sk, steps[i].get("s_x0"))
        y = jnp.moveaxis(y, -1, len(lead) + i)
    return y.reshape(*lead, n)


def _split_prefix(t, p: int, axis: int):
    return jax.lax.slice_in_dim(t, 0, p, axis=axis), jax.lax.slice_in_dim(t, p, t.shape[axis], axis=axis)


def layer(lp: Params, x_BxLxD, pos_BxL, kv, cfg: ModelConfig, prec: Precision, calib: _Calib | None = None):
    """One transformer layer (one layer's slice of the stacked parameters): attention, then the
    MLP, each added to the residual stream. `kv` is None (attend within the chunk, which starts at
    position 0) or (k_BxSxKvxE, v_BxSxKvxE) cache codes; returns (x, new kv or None).

    With `cfg.sink_positions` = P > 0, tokens at positions < P (the attention sink) are quantized
    with their own INT8 steps (`s_*0`) at every activation point, and the first P cache slots hold
    their keys and values at INT8 (`attention`). `cfg.qk_rotation` applies an online Hadamard to q
    and k after RoPE (the cache holds rotated keys); `cfg.down_rotation` one before the down
    projection (folded into its weights offline by models.recipe). `calib` (a float forward)
    records every activation point's values for its initial step.
    """
    dtype = prec.dtype
    sink = (pos_BxL < cfg.sink_positions) if cfg.sink_positions else None  # [B, L]
    h = vu.rmsnorm(x_BxLxD, lp["attn_norm"], cfg.rms_eps, dtype)
    o, kv_new = attention(lp["attn"], h, pos_BxL, kv, cfg, prec, sink, calib)
    x = (x_BxLxD + o).astype(dtype)
    h = vu.rmsnorm(x, lp["mlp_norm"], cfg.rms_eps, dtype)
    x = (x + mlp(lp["mlp"], h, cfg, prec, sink, calib)).astype(dtype)
    return x, kv_new


def _sink_step(d: dict, sink):
    """The sink rows' input step of a linear block (None without a sink)."""
    return None if sink is None else d.get("s_x0")


def attention(at: Params, h_BxLxD, pos_BxL, kv, cfg: ModelConfig, prec: Precision, sink, calib: _Calib | None = None):
    """Grouped-query attention of the normed input: (output [B, L, D], new kv or None).

    The G query heads that share a KV head are the rows of one core VMM ([B, Kv, G*L, E]). The
    QK^T and PV products run on integer codes (`_scores`, `_mix`) unless the policy keeps the
    attention operands float (or `calib` runs the float forward)."""
    dtype = prec.dtype
    B, L, _ = h_BxLxD.shape
    H, Kv, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G = H // Kv
    r, tl = prec.layer, prec.tiling
    quantized = calib is None and not any(r(x).is_float for x in ("attn.qk.q", "attn.kv", "attn.probs"))
    s0 = _sink_step(at, sink)
    q = _lin(h_BxLxD, at["q"], at["s_x"], r("attn.x"), r("attn.q.w"), dtype, calib, ("attn", "s_x"), tl("attn.q"),
             sink, s0)
    k = _lin(h_BxLxD, at["k"], at["s_x"], r("attn.x"), r("attn.k.w"), dtype, calib, None, tl("attn.k"), sink, s0)
    v = _lin(h_BxLxD, at["v"], at["s_x"], r("attn.x"), r("attn.v.w"), dtype, calib, None, tl("attn.v"), sink, s0)
    q = rope(q.reshape(B, L, H, E), pos_BxL, cfg.rope_theta)
    k = rope(k.reshape(B, L, Kv, E), pos_BxL, cfg.rope_theta)
    if cfg.qk_rotation:  # q and k rotated by H_E / sqrt(E): Q K^T is unchanged, outliers spread
        sh = None if sink is None else sink[:, :, None]
        q = online_rotation(q, (E,), at, "attn", ["qrot"], prec=prec, dtype=dtype, calib=calib, sink=sh)
        k = online_rotation(k, (E,), at, "attn", ["krot"], prec=prec, dtype=dtype, calib=calib, sink=sh)
    v = v.reshape(B, L, Kv, E)
    q = (q * jnp.asarray(1.0 / math.sqrt(E), dtype)).astype(dtype)
    q_BxKvxGLxE = q.reshape(B, L, Kv, G, E).transpose(0, 2, 3, 1, 4).reshape(B, Kv, G * L, E)
    q_sink = None if sink is None else jnp.tile(sink, (1, G))[:, None, :]  # [B, 1, G*L]: sink query rows
    if calib is not None:
        kv_sink = None if sink is None else sink[:, :, None]
        calib.see(("attn", "s_q"), q_BxKvxGLxE, r("attn.qk.q"), q_sink)
        calib.see(("attn", "s_k"), k, r("attn.kv"), kv_sink)
        calib.see(("attn", "s_v"), v, r("attn.kv"), kv_sink)

    if kv is None:  # keys are this chunk's own positions: float values, quantized in the products
        kv_new = None
        keys, vals, key_pos = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), pos_BxL  # [B, Kv, T, E]
    else:  # this chunk written into the cache (codes), attention over the cache
        kv_new = _write_cache(kv, k, v, at, pos_BxL, prec, sink, quantized)
        keys, vals = kv_new[0].transpose(0, 2, 1, 3), kv_new[1].transpose(0, 2, 1, 3)
        key_pos = jnp.broadcast_to(jnp.arange(kv[0].shape[1]), (B, kv[0].shape[1]))
    cached = kv is not None
    if quantized:
        scores = _scores(q_BxKvxGLxE, keys, at, prec, cfg.sink_positions, q_sink, cached)
    else:
        scores = jnp.einsum("bkle,bkte->bklt", q_BxKvxGLxE.astype(jnp.float32), keys.astype(jnp.float32))
    # causal mask by absolute position: query at p sees keys at positions <= p
    qpos = jnp.tile(pos_BxL, (1, G))  # [B, G*L] matching the G*L rows
    mask = key_pos[:, None, None, :] <= qpos[:, None, :, None]
    probs = vu.softmax(scores, mask, dtype)
    if calib is not None:
        if sink is not None:  # the sink column and the others: their own steps (probabilities on the sink are large)
            pp, pr = _split_prefix(probs, cfg.sink_positions, 3)
            calib.see(("attn", "s_p"), pr, r("attn.probs"))
            calib.see_sink(("attn", "s_p0"), pp)
        else:
            calib.see(("attn", "s_p"), probs, r("attn.probs"))
    if quantized:
        o = _mix(probs, vals, at, prec, cfg.sink_positions, cached)
    else:
        o = jnp.einsum("bklt,bkte->bkle", probs.astype(jnp.float32), vals.astype(jnp.float32)).astype(dtype)
    o = o.reshape(B, Kv, G, L, E).transpose(0, 3, 1, 2, 4).reshape(B, L, H * E)
    o = _lin(o, at["o"], at["o"]["s_x"], r("attn.o.x"), r("attn.o.w"), dtype, calib, ("attn", "o", "s_x"),
             tl("attn.o"), sink, _sink_step(at["o"], sink))
    return o, kv_new


def _write_cache(kv, k_BxLxKvxE, v_BxLxKvxE, at: Params, pos_BxL, prec: Precision, sink, quantized: bool):
    """The cache (k, v) with this chunk's keys and values written at their positions: codes at the
    KV width (the sink's at INT8, with their own steps), or the float values of a float cache."""
    k_cache, v_cache = kv
    if quantized:
        kv_tq = prec.layer("attn.kv")
        k_w = vu.quantize(k_BxLxKvxE, at["s_k"], kv_tq.bits, kv_tq.signed)
        v_w = vu.quantize(v_BxLxKvxE, at["s_v"], kv_tq.bits, kv_tq.signed)
        if sink is not None:
            m = sink[:, :, None, None]
            k_w = jnp.where(m, vu.quantize(k_BxLxKvxE, at["s_k0"], SINK.bits), k_w)
            v_w = jnp.where(m, vu.quantize(v_BxLxKvxE, at["s_v0"], SINK.bits), v_w)
    else:
        k_w, v_w = k_BxLxKvxE.astype(k_cache.dtype), v_BxLxKvxE.astype(v_cache.dtype)
    bidx = jnp.arange(k_BxLxKvxE.shape[0])[:, None]
    return k_cache.at[bidx, pos_BxL].set(k_w, mode="drop"), v_cache.at[bidx, pos_BxL].set(v_w, mode="drop")


def _scores(q_BxKvxGLxE, keys_BxKvxTxE, at: Params, prec: Precision, P: int, q_sink, cached: bool):
    """QK^T on the core array: INT codes of q (the sink query rows at INT8, their own step) times
    the keys' codes. With a sink prefix (P > 0) the first P keys (INT8 codes, steps `s_k0`) and the
    others (KV width, `s_k`) are two products, their scores side by side. `cached`: the keys are
    the cache's codes; else float keys of this chunk, quantized here."""
    q_tq, kv_tq, dtype = prec.layer("attn.qk.q"), prec.layer("attn.kv"), prec.dtype
    if not P:
        spec = qlayers.ProductSpec("qk", q_tq, kv_tq, dtype)
        if not cached:
            return qlayers.quantized_product(q_BxKvxGLxE, keys_BxKvxTxE, at["s_q"], at["s_k"], spec)
        q_codes = vu.quantize(q_BxKvxGLxE, at["s_q"], spec.a.bits, spec.a.signed)
        return qlayers.scaled_int_product(q_codes, keys_BxKvxTxE, at["s_q"], at["s_k"], spec)
    sp = (qlayers.ProductSpec("qk", q_tq, SINK, dtype, a0=SINK), qlayers.ProductSpec("qk", q_tq, kv_tq, dtype, a0=SINK))
    kp, kr = _split_prefix(keys_BxKvxTxE, P, 2)
    if not cached:
        return jnp.concatenate(
            [qlayers.quantized_product(q_BxKvxGLxE, kp, at["s_q"], at["s_k0"], sp[0], at["s_q0"], q_sink),
             qlayers.quantized_product(q_BxKvxGLxE, kr, at["s_q"], at["s_k"], sp[1], at["s_q0"], q_sink)], -1)
    q_codes, s_rows = qlayers.act_codes(q_BxKvxGLxE, at["s_q"], sp[1], at["s_q0"], q_sink)
    return jnp.concatenate([qlayers.scaled_int_product(q_codes, kp, s_rows, at["s_k0"], sp[0]),
                            qlayers.scaled_int_product(q_codes, kr, s_rows, at["s_k"], sp[1])], -1)


def _mix(probs_BxKvxGLxT, vals_BxKvxTxE, at: Params, prec: Precision, P: int, cached: bool):
    """PV on the core array: the probabilities' codes (a step per row where the policy's
    probabilities are dynamic) times the values' codes; with a sink prefix (P > 0) the sink column
    (INT8, steps `s_p0`, `s_v0`) and the others are two products, summed. `cached`: the values are
    the cache's codes; else float values of this chunk, quantized here."""
    p_tq, kv_tq, dtype = prec.layer("attn.probs"), prec.layer("attn.kv"), prec.dtype
    if not P:
        spec = qlayers.ProductSpec("pv", p_tq, kv_tq, dtype)
        if not cached:
            return qlayers.quantized_product(probs_BxKvxGLxT, vals_BxKvxTxE, at["s_p"], at["s_v"], spec)
        p_codes, s_p = qlayers.act_codes(probs_BxKvxGLxT, at["s_p"], spec)
        return qlayers.scaled_int_product(p_codes, vals_BxKvxTxE, s_p, at["s_v"], spec)
    sp = qlayers.ProductSpec("pv", SINK, SINK, dtype), qlayers.ProductSpec("pv", p_tq, kv_tq, dtype)
    (pp, pr), (vp, vr) = _split_prefix(probs_BxKvxGLxT, P, 3), _split_prefix(vals_BxKvxTxE, P, 2)
    if not cached:
        o = (qlayers.quantized_product(pp, vp, at["s_p0"], at["s_v0"], sp[0])
             + qlayers.quantized_product(pr, vr, at["s_p"], at["s_v"], sp[1]))
    else:
        pr_codes, s_pr = qlayers.act_codes(pr, at["s_p"], sp[1])  # a dynamic step: each row's own
        o = (qlayers.scaled_int_product(vu.quantize(pp, at["s_p0"], SINK.bits), vp, at["s_p0"], at["s_v0"], sp[0])
             + qlayers.scaled_int_product(pr_codes, vr, s_pr, at["s_v"], sp[1]))
    return o.astype(dtype)


def mlp(ml: Params, h_BxLxD, cfg: ModelConfig, prec: Precision, sink, calib: _Calib | None = None):
    """The SwiGLU MLP of the normed input: down(SiLU(gate(h)) * up(h)), SiLU on the activation
    unit's lookup table (the sink rows through their own table), an online rotation before the
    down projection when `cfg.down_rotation` is set."""
    dtype = prec.dtype
    r, tl = prec.layer, prec.tiling
    s0 = _sink_step(ml, sink)
    g = _lin(h_BxLxD, ml["gate"], ml["s_x"], r("mlp.x"), r("mlp.gate.w"), dtype, calib, ("mlp", "s_x"),
             tl("mlp.gate"), sink, s0)
    u = _lin(h_BxLxD, ml["up"], ml["s_x"], r("mlp.x"), r("mlp.up.w"), dtype, calib, None, tl("mlp.up"), sink, s0)
    silu_tq = r("mlp.silu")
    if calib is not None:
        calib.see(("mlp", "s_in"), g, silu_tq, sink)
    if silu_tq.is_float or calib is not None:
        a = (g.astype(jnp.float32) * jax.nn.sigmoid(g.astype(jnp.float32)))
    else:
        a = qlayers.silu_lut(g, ml["s_in"], ml["s_out"], silu_tq)
        if sink is not None:  # the sink's own table
            a = jnp.where(sink[..., None], qlayers.silu_lut(g, ml["s_in0"], ml["s_out0"], SINK), a)
    if calib is not None:
        calib.see(("mlp", "s_out"), a, silu_tq, sink)
    m = (a.astype(dtype) * u.astype(dtype)).astype(dtype)
    if cfg.down_rotation:
        nf = len(cfg.down_rotation)
        m = online_rotation(m, cfg.down_rotation, ml, "mlp", [f"rot{i}" for i in range(nf)], prec=prec, dtype=dtype,
                            calib=calib, sink=sink)
    return _lin(m, ml["down"], ml["down"]["s_x"], r("mlp.down.x"), r("mlp.down.w"), dtype, calib,
                ("mlp", "down", "s_x"), tl("mlp.down"), sink, _sink_step(ml["down"], sink))


_layer_jit = jax.jit(layer_at, static_argnums=(4, 5))  # the layer's index traced (a card's)
_layer_jit_at = jax.jit(layer_at, static_argnums=(4, 5, 6))  # ... or known: one program per width


def check_tokens(tokens, cfg: ModelConfig) -> None:
    """Raise ModelInputError for token ids outside the vocabulary (concrete inputs only)."""
    if isinstance(tokens, jax.core.Tracer):
        return
    t = np.asarray(tokens)
    if t.size and (t.min() < 0 or t.max() >= cfg.vocab_size):
        raise ModelInputError(f"token ids must lie in [0, {cfg.vocab_size}); got range [{t.min()}, {t.max()}]")


def embed(params: Params, tokens_BxL: jax.Array, prec: Precision) -> jax.Array:
    return jnp.take(params["embed"], tokens_BxL, axis=0).astype(prec.dtype)


def head(params: Params, x_BxLxD: jax.Array, cfg: ModelConfig, prec: Precision, calib: _Calib | None = None) -> jax.Array:
    """Final norm and output layer: float32 logits [B, L, V]. `params` needs "final_norm" and
    "lm_head" (and "embed" for a tied training-form output layer); an output-layer card passes its
    vocabulary slice as "lm_head" (and `prec` carries the slice's tiling)."""
    h = vu.rmsnorm(x_BxLxD, params["final_norm"], cfg.rms_eps, prec.dtype)
    lh = params["lm_head"]
    p = dict(lh) if "tw" in lh else {**lh, "w": lm_head_weight(params)}
    if calib is not None:
        calib.see(("lm_head", "s_x"), h, prec.head("x"))
        return _lin(h, p, lh["s_x"], quant.FLOAT, quant.FLOAT, jnp.float32, None, None)
    return qlayers.linear(h, p, prec.head("x"), prec.head("w"), dtype=prec.dtype,
                          tiling=prec.tiling("lm_head")).astype(jnp.float32)


def run_layers(layers: Params, x_BxLxD, pos_BxL, cache: dict | None, cfg: ModelConfig, prec: Precision,
               n_valid=None, layer_ids=None):
    """Run the layers; returns (x, new cache or None).

    `layers` is either stacked ([layers, ...] leaves, scanned: one layer compiled) or a list of
    per-layer parameters (`unstack_layers`: the layers unrolled, each reading its own resident
    weights with no per-layer copy out of a stack); `cache` matches: {"k", "v"} stacked
    [layers, B, S, Kv, E], or lists of [B, S, Kv, E]. The same arithmetic either way, bit for bit.

    `n_valid` (traced int, stacked layers only): only the first n_valid layers run, the rest pass
    the activation and their cache through unchanged (a card holding fewer layers than the
    stack's slots). `layer_ids`: the model's index of each given layer (default 0, 1, ...; a
    card's own), which sets its widths under a per-layer policy (`layer_at`).
    """
    n = len(layers) if isinstance(layers, (list, tuple)) else jax.tree.leaves(layers)[0].shape[0]
    if layer_ids is None:
        layer_ids = np.arange(n, dtype=np.int32)
    if isinstance(layers, (list, tuple)):
        ks, vs = [], []
        for i, lp in enumerate(layers):
            kv = None if cache is None else (cache["k"][i], cache["v"][i])
            lid = layer_ids[i] if prec.mixed else 0
            if isinstance(lid, (int, np.integer)):  # traced once per width, inlined per layer
                lid = int(prec.groups[_layer_group_table(prec, cfg.n_layers)[lid]][0]) if prec.mixed else 0
                y, kv = _layer_jit_at(lp, x_BxLxD, pos_BxL, kv, cfg, prec, lid)
            else:
                y, kv = _layer_jit(lp, x_BxLxD, pos_BxL, kv, cfg, prec, lid)
            x_BxLxD = y.astype(x_BxLxD.dtype)
            if kv is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        return x_BxLxD, (None if cache is None else {"k": ks, "v": vs})

    def body(x, xs):
        i, lid, lp, kv = xs

        def run(x, kv):
            y, kv_new = layer_at(lp, x, pos_BxL, kv, cfg, prec, lid)
            return y.astype(x.dtype), kv_new

        if n_valid is None:
            return run(x, kv)
        return jax.lax.cond(i < n_valid, run, lambda x, kv: (x, kv), x, kv)

    kv = None if cache is None else (cache["k"], cache["v"])
    x, kv_new = jax.lax.scan(body, x_BxLxD, (jnp.arange(n), jnp.asarray(layer_ids, jnp.int32), layers, kv))
    return x, (None if cache is None else {"k": kv_new[0], "v": kv_new[1]})


def unstack_layers(layers: Params) -> list:
    """Stacked layer parameters ([layers, ...] leaves) as a list of per-layer parameters."""
    n = jax.tree.leaves(layers)[0].shape[0]
    return [jax.tree.map(lambda a: a[i], layers) for i in range(n)]


def forward(params: Params, tokens_BxL: jax.Array, cfg: ModelConfig, policy="float",
            positions_BxL: jax.Array | None = None) -> jax.Array:
    """Full-sequence forward (training and evaluation): float32 logits [B, L, V]."""
    prec = resolve(policy, cfg)
    check_tokens(tokens_BxL, cfg)
    B, L = tokens_BxL.shape
    if L > cfg.max_seq_len:
        raise ModelInputError(f"sequence of {L} tokens exceeds the context of {cfg.max_seq_len}")
    pos = jnp.broadcast_to(jnp.arange(L), (B, L)) if positions_BxL is None else positions_BxL
    x, _ = run_layers(params["layers"], embed(params, tokens_BxL, prec), pos, None, cfg, prec)
    return head(params, x, cfg, prec)


def calibrate(params: Params, tokens_BxL: jax.Array, cfg: ModelConfig, policy, method: str = "lsq",
              weights: bool = True, stats: dict | None = None, sink_method: str | None = None) -> Params:
    """Initialise every step size: weights from the weights (unless `weights=False`, e.g. after
    GPTQ set them), activations from one batch.

    Runs the float forward over `tokens_BxL` and sets each activation step from the tensor it
    quantizes (per layer): method "lsq" is the paper's `2 mean|v| / sqrt(Q_P)`; "mse"
    minimises the quantization error (better without quantization-aware training).

    `sink_method`: the calibration of the sink rows' own steps (default `method`; the recipes
    use "max", `init_step_max`: the sink's largest channels set its score, and are not clipped).

    `stats` (a dict, filled when given): "down_input_token_max", each layer's largest |value| of
    each token's down-projection input, [layers, B, L] (`outlier_tokens`).
    """
    for m in (method, sink_method or method):
        if m not in CALIBRATIONS:
            raise ValueError(f"unknown calibration {m!r}; choose one of {', '.join(CALIBRATIONS)}")
    prec = resolve(policy, cfg)
    if weights:
        params = init_weight_steps(params, cfg, prec.policy, method)
    if prec.policy.is_float:
        return params
    check_tokens(tokens_BxL, cfg)
    fprec = resolve("float")
    prec = dataclasses.replace(prec, compute_dtype=jnp.float32)

    @jax.jit
    def collect(params, tokens):
        B, L = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(L), (B, L))

        def body(x, xs):
            lid, lp = xs
            calib = _Calib(method, sink_method)
            # quantization roles from the real policy (each layer's widths), arithmetic in float
            x_new, _ = layer_at(lp, x, pos, None, cfg, prec, lid, calib)
            return x_new.astype(jnp.float32), (calib.steps, calib.token_max)

        x, (steps, token_max) = jax.lax.scan(body, embed(params, tokens, fprec),
                                             (jnp.arange(cfg.n_layers), params["layers"]))
        calib = _Calib(method)
        head(params, x, cfg, prec, calib)
        return steps, calib.steps, token_max

    layer_steps, head_steps, token_max = jax.block_until_ready(collect(params, jnp.asarray(tokens_BxL)))
    if stats is not None and _Calib.OUTLIER_PATHS[0] in token_max:
        stats["down_input_token_max"] = np.asarray(token_max[_Calib.OUTLIER_PATHS[0]])
    lay = params["layers"]
    for path, s in layer_steps.items():
        lay = _set(lay, path, s.astype(jnp.float32))
    params = {**params, "layers": lay}
    for path, s in head_steps.items():
        params = _set(params, path, s.astype(jnp.float32))
    return params


# --- serving -------------------------------------------------------------------------------------

def prepare_serving(params: Params, cfg: ModelConfig, policy, tilings: dict[str, Tiling] | None = None) -> Params:
    """Quantize and tile every linear layer once (the chip's resident weights), with the tilings
    of a mapping (default: `model_tilings`, the mapper's rule for the sequential model)."""
    prec = resolve(policy, cfg, tilings)
    if prec.policy.is_float:
        return params
    lay = params["layers"]
    for name in LINEARS:
        blk, lin = name.split(".")
        p = lay[blk][lin]
        for key in ("s_w",) + (("s_x",) if "s_x" in p else ()):
            quant.check_step(p[key])
        t = prec.tiling(name)
        parts = []
        for g in layer_groups(prec, cfg):  # each layer's codes at its own width
            tq = prec.at(g[0]).layer(f"{name}.w")
            sub = p if g == tuple(range(cfg.n_layers)) else jax.tree.map(lambda a: a[np.asarray(g)], p)
            served = _serve_stack(tq, t)(sub)
            if t is not None:  # the mapping's own tiling object (the compiled program holds an equal one)
                tw = served["tw"]
                served = {**served, "tw": TiledWeights(tw.w_RxKbxCxNb, t, tw.bits, tw.signed)}
            parts.append((g, served))
        served = parts[0][1] if len(parts) == 1 else _merge_groups(parts, cfg.n_layers)
        served = {k: v for k, v in served.items() if k != "s_x"} | ({"s_x": p["s_x"]} if "s_x" in p else {})
        lay = _set(lay, (blk, lin), served)
    for path in act_steps(cfg):
        quant.check_step(_get(lay, path))
    lh = {**params["lm_head"], "w": lm_head_weight(params)}
    head_tq = prec.head("w")
    if head_tq.is_float:
        return {**params, "layers": lay, "lm_head": lh}
    qlayers.check_linear_steps(lh, "lm_head")  # (the compiled `prepare_linear` sees no concrete steps)
    return {**params, "layers": lay, "lm_head": _serve_one(head_tq, prec.tiling("lm_head"))(lh)}


@functools.lru_cache(maxsize=64)
def _serve_stack(tq: TensorQuant, tiling: Tiling | None):
    """A stack of one linear's layers quantized and tiled at `tq` (one compiled program per shape
    and width, which JAX's persistent cache keeps across runs)."""
    return jax.jit(jax.vmap(lambda p: qlayers.prepare_linear({**p, "s_x": jnp.float32(1.0)}, tq, tiling=tiling)))


@functools.lru_cache(maxsize=16)
def _serve_one(tq: TensorQuant, tiling: Tiling | None):
    """One linear quantized and tiled at `tq`, compiled (as `_serve_stack`; steps checked by the caller)."""
    return jax.jit(lambda p: qlayers.prepare_linear(p, tq, tiling=tiling))


def _merge_groups(parts: list, n: int) -> Params:
    """One stack of n layers from the layer groups' stacks [(layers, stack)]: every leaf put at its
    layers; resident codes held in the widest group's form, labelled with the widest width (each
    layer's own width is restored when it runs: `_with_widths`)."""
    def merge(*leaves):
        if isinstance(leaves[0], TiledWeights):
            widest = max(leaves, key=lambda tw: tw.bits)
            w = merge(*[tw.w_RxKbxCxNb.astype(widest.w_RxKbxCxNb.dtype) for tw in leaves])
            return TiledWeights(w, widest.tiling, widest.bits, widest.signed)
        out = jnp.zeros((n, *leaves[0].shape[1:]), leaves[0].dtype)
        for (g, _), a in zip(parts, leaves):
            out = out.at[np.asarray(g)].set(a)
        return out
    return jax.tree.map(merge, *[stack for _, stack in parts], is_leaf=lambda v: isinstance(v, TiledWeights))


def init_cache(cfg: ModelConfig, batch: int, length: int, policy, layers: int | None = None, xp=jnp) -> dict:
    """An empty KV cache {"k", "v": [layers, batch, length, Kv, E]} at the policy's width (int8-held
    codes; float32 for a float cache); `layers` defaults to all of them, `xp` to jax.numpy."""
    if length > cfg.max_seq_len:
        raise ModelInputError(f"a cache of {length} positions exceeds the context of {cfg.max_seq_len}")
    prec = resolve(policy, cfg)
    dt = np.float32 if prec.kv.is_float else np.int8
    shape = (cfg.n_layers if layers is None else layers, batch, length, cfg.n_kv_heads, cfg.head_dim)
    return {"k": xp.zeros(shape, dt), "v": xp.zeros(shape, dt)}


def cache_bytes(cfg: ModelConfig, users: int, context: int, policy) -> int:
    """Bytes of the whole model's KV cache (np_jax.appliance.mapping.kv_cache_bytes, at each layer's width)."""
    p = get_policy(policy)
    return sum(kv_cache_bytes(users, context, cfg.kv_dim, p.at(i).layer("attn.kv").bits, layers=1)
               for i in range(cfg.n_layers))


def step(params: Params, tokens_BxL: jax.Array, positions_BxL: jax.Array, cache: dict, cfg: ModelConfig,
         policy) -> tuple[jax.Array, dict]:
    """Prefill a chunk (L > 1) or decode one token (L = 1) for each user at its own positions.

    Writes the chunk's K/V into the cache at `positions_BxL` (positions beyond the cache are
    dropped) and returns float32 logits [B, L, V] and the new cache.
    """
    prec = resolve(policy, cfg)
    check_tokens(tokens_BxL, cfg)
    x, cache = run_layers(params["layers"], embed(params, tokens_BxL, prec), positions_BxL, cache, cfg, prec)
    return head(params, x, cfg, prec), cache


def init_serving_random(cfg: ModelConfig | str, key: jax.Array, policy="w4a4") -> Params:
    """Random weights generated directly in serving form (integer codes on the core array).

    For large shapes (the 3B and 8B configs) where a float32 training copy would not fit or
    is not needed: each layer's codes are drawn uniformly over the weight width, steps are
    chosen so activations stay O(1) (weight step 1/(Q_P sqrt(K)), activation steps 4/Q_P).
    """
    cfg = get_config(cfg)
    prec = resolve(policy, cfg)
    if prec.policy.is_float:
        raise ValueError("init_serving_random is for quantized policies; use init_params for float")
    n = cfg.n_layers
    # Billions of random codes, drawn on the host: numpy's generator runs at ~200 M codes/s
    # whatever the XLA flags (XLA's RngBitGenerator is 40x slower at optimization level 0, the
    # test suite's), and the codes are tiled on the device one matrix at a time.
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2**31 - 1)))

    def codes(shape, tq):  # uniform over the 2^b codes
        u = rng.integers(0, 2**tq.bits, size=shape, dtype=np.uint8)
        return (u.astype(np.int16) - tq.q_n).astype(np.int8)

    def served(name, bias):
        k_in, k_out = cfg.layer_matrices()[name]
        t = prec.tiling(name)
        tqs = [prec.at(i).layer(f"{name}.w") for i in range(n)]
        widest = max(tq.bits for tq in tqs)
        tile = jax.jit(lambda w: tile_weights(w, bits=widest, signed=True, tiling=t, form="int8"))
        # billions of codes: compact; each layer's at its own width (labelled with the widest: `_with_widths`)
        tws = [tile(codes((k_in, k_out), tq)) for tq in tqs]
        tw = jax.tree.map(lambda *xs: jnp.stack(xs), *tws)
        p = {"tw": tw, "s_w": jnp.asarray(np.stack([np.full((k_out,), 1.0 / (tq.q_p * math.sqrt(k_in)), np.float32)
                                                    for tq in tqs]))}
        if bias:
            p["b"] = jnp.zeros((n, k_out), jnp.float32)
        return p

    d = cfg.d_model
    act = lambda role, c=4.0: jnp.asarray([c / prec.at(i).layer(role).q_p for i in range(n)], jnp.float32)
    lay: dict = {"attn_norm": jnp.ones((n, d), jnp.float32), "mlp_norm": jnp.ones((n, d), jnp.float32),
                 "attn": {"s_x": act("attn.x"), "s_q": act("attn.qk.q"), "s_k": act("attn.kv"), "s_v": act("attn.kv"),
                          "s_p": act("attn.probs", 1.0)},
                 "mlp": {"s_x": act("mlp.x"), "s_in": act("mlp.silu"), "s_out": act("mlp.silu")}}
    for name in LINEARS:
        blk, lin = name.split(".")
        lay[blk][lin] = served(name, cfg.attn_bias if blk == "attn" else cfg.mlp_bias)
    lay["attn"]["o"]["s_x"] = act("attn.o.x")
    lay["mlp"]["down"]["s_x"] = act("mlp.down.x")
    lay = with_act_steps(lay, cfg)
    htq = prec.head("w")
    head_tw = jax.jit(lambda w: tile_weights(w, bits=htq.bits, signed=htq.signed, tiling=prec.tiling("lm_head"),
                                             form="int8"))(codes((d, cfg.vocab_size), htq))
    lm_head = {"tw": head_tw, "s_w": jnp.full((cfg.vocab_size,), 1.0 / (htq.q_p * math.sqrt(d)), jnp.float32),
               "s_x": jnp.float32(4.0 / prec.head("x").q_p)}
    embed_ = jnp.asarray((0.02 * rng.standard_normal((cfg.vocab_size, d), np.float32)).astype(np.float16))
    return {"embed": embed_, "layers": lay, "final_norm": jnp.ones((d,), jnp.float32), "lm_head": lm_head}


def dequantize_serving(serving: Params, cfg: ModelConfig | str) -> Params:
    """Float32 parameters (training form) equal to the dequantized resident weights `codes * s_w`.

    The float reference of a serving-form model, e.g. one made by `init_serving_random`.
    """
    cfg = get_config(cfg)
    deq = jax.jit(lambda tw, s: jax.vmap(lambda t: t.to_matrix())(tw).astype(jnp.float32) * s[:, None, :])
    lay = serving["layers"]
    for name in LINEARS:
        blk, lin = name.split(".")
        p = lay[blk][lin]
        if "tw" in p:
            lay = _set(lay, (blk, lin), {k: v for k, v in p.items() if k != "tw"} | {"w": deq(p["tw"], p["s_w"])})
    lh = serving["lm_head"]
    head = dict(lh)
    if "tw" in lh:
        head = {k: v for k, v in lh.items() if k != "tw"} | {"w": lh["tw"].to_matrix().astype(jnp.float32) * lh["s_w"]}
    return {**serving, "layers": lay, "lm_head": head, "embed": serving["embed"].astype(jnp.float32)}
