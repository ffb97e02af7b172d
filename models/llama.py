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

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from np_jax.quant import products as qlayers
from np_jax.chip.array import tile_weights
from np_jax import quant
from np_jax.chip import vector_unit as vu
from np_jax.quant import PrecisionPolicy, TensorQuant, get_policy
from models.config import ModelConfig, get_config
from np_jax.appliance.mapping import LAYER_MATRICES, kv_cache_bytes, matrix_tilings, output_tiling
from np_jax.chip.array import Tiling

Params = dict[str, Any]

LINEARS = LAYER_MATRICES
# Activation quantization points of one layer: parameter path -> policy role (minus "layers.i.").
ACT_STEPS = {
    ("attn", "s_x"): "attn.x", ("attn", "s_q"): "attn.qk.q", ("attn", "s_k"): "attn.kv",
    ("attn", "s_v"): "attn.kv", ("attn", "s_p"): "attn.probs", ("attn", "o", "s_x"): "attn.o.x",
    ("mlp", "s_x"): "mlp.x", ("mlp", "s_in"): "mlp.silu", ("mlp", "s_out"): "mlp.silu",
    ("mlp", "down", "s_x"): "mlp.down.x",
}


class ModelInputError(ValueError):
    """Bad tokens or lengths given to the model."""


@dataclass(frozen=True)
class Precision:
    """The policy resolved for one model: uniform over layers (required by the layer scan), the
    tilings of its matrices on the core array (the mapping's objects; "lm_head" for the output
    layer), and an optional override of the vector-unit dtype (calibration runs in float32)."""

    policy: PrecisionPolicy
    compute_dtype: Any = None
    tilings: tuple[tuple[str, Tiling], ...] = ()

    def layer(self, role: str) -> TensorQuant:
        return self.policy.layer(role)

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


def model_tilings(cfg: ModelConfig) -> dict[str, Tiling]:
    """The tilings the sequential model uses: every layer matrix and the whole output layer, by
    the mapper's own rule (np_jax.appliance.mapping)."""
    return matrix_tilings(cfg) | {"lm_head": output_tiling(cfg, 1)}


def resolve(policy: str | PrecisionPolicy | Precision, cfg: ModelConfig | None = None,
            tilings: dict[str, Tiling] | None = None) -> Precision:
    if isinstance(policy, Precision):
        return policy
    p = get_policy(policy)
    if cfg is not None:
        p.check_uniform(cfg.n_layers, LAYER_ROLES + tuple(sorted(set(ACT_STEPS.values()))))
    t = tilings if tilings is not None else (model_tilings(cfg) if cfg is not None else {})
    return Precision(p, tilings=tuple(sorted(t.items())))


# --- parameters ------------------------------------------------------------------------------------

def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


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
    params = {"embed": normal((cfg.vocab_size, d)), "layers": layers, "final_norm": jnp.ones((d,), dtype),
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
        tq = prec.layer(f"{name}.w")
        if tq.is_float:
            continue
        s = jax.lax.map(lambda w: init(w, tq), lay[blk][lin]["w"])
        lay = _set(lay, (blk, lin, "s_w"), jnp.broadcast_to(s[:, None] if s.ndim == 1 else s, lay[blk][lin]["s_w"].shape))
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


CALIBRATIONS = {"lsq": quant.init_step, "mse": quant.init_step_mse}


class _Calib:
    """Collects initial steps (from a float forward) for the activation quantization points."""

    def __init__(self, method: str = "lsq"):
        self.steps: dict[tuple, jax.Array] = {}
        self.init = CALIBRATIONS[method]

    def see(self, path: tuple, v: jax.Array, tq: TensorQuant) -> None:
        if not tq.is_float:
            self.steps[path] = self.init(v, TensorQuant(tq.bits, tq.signed))


def _lin(x, p, sx, x_tq, w_tq, dtype, calib, path, tiling=None):
    if calib is not None:
        calib.see(path, x, x_tq)
        x_tq = w_tq = quant.FLOAT
    return qlayers.linear(x, {**p, "s_x": sx}, x_tq, w_tq, dtype=dtype, tiling=tiling)


def layer(lp: Params, x_BxLxD, pos_BxL, kv, cfg: ModelConfig, prec: Precision, calib: _Calib | None = None):
    """One transformer layer (one layer's slice of the stacked parameters). `kv` is None (attend
    within the chunk) or (k_BxSxKvxE, v_BxSxKvxE) cache codes; returns (x, new kv or None)."""
    dtype = prec.dtype
    B, L, _ = x_BxLxD.shape
    H, K, E = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    G = H // K
    at, ml = lp["attn"], lp["mlp"]
    r, tl = prec.layer, prec.tiling
    quantized = calib is None and not any(r(x).is_float for x in ("attn.qk.q", "attn.kv", "attn.probs"))

    h = vu.rmsnorm(x_BxLxD, lp["attn_norm"], cfg.rms_eps, dtype)
    q = _lin(h, at["q"], at["s_x"], r("attn.x"), r("attn.q.w"), dtype, calib, ("attn", "s_x"), tl("attn.q"))
    k = _lin(h, at["k"], at["s_x"], r("attn.x"), r("attn.k.w"), dtype, calib, ("attn", "s_x"), tl("attn.k"))
    v = _lin(h, at["v"], at["s_x"], r("attn.x"), r("attn.v.w"), dtype, calib, ("attn", "s_x"), tl("attn.v"))
    q = rope(q.reshape(B, L, H, E), pos_BxL, cfg.rope_theta)
    k = rope(k.reshape(B, L, K, E), pos_BxL, cfg.rope_theta)
    v = v.reshape(B, L, K, E)
    q = (q * jnp.asarray(1.0 / math.sqrt(E), dtype)).astype(dtype)
    # [B, K, G*L, E]: the G query heads sharing a KV head are rows of one core VMM.
    q_BxKxGLxE = q.reshape(B, L, K, G, E).transpose(0, 2, 3, 1, 4).reshape(B, K, G * L, E)
    kv_tq, p_tq = r("attn.kv"), r("attn.probs")
    if calib is not None:
        calib.see(("attn", "s_q"), q, r("attn.qk.q"))
        calib.see(("attn", "s_k"), k, kv_tq)
        calib.see(("attn", "s_v"), v, kv_tq)

    if kv is None:  # keys are this chunk's own positions
        k_new = v_new = None
        keys, vals, key_pos = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), pos_BxL  # [B, K, T, E]
        if quantized:
            qk_spec = qlayers.ProductSpec("qk", r("attn.qk.q"), kv_tq, dtype)
            scores = qlayers.quantized_product(q_BxKxGLxE, keys, at["s_q"], at["s_k"], qk_spec)
    else:  # write this chunk into the cache, attend over the cache
        k_cache, v_cache = kv
        if quantized:
            k_w = vu.quantize(k, at["s_k"], kv_tq.bits, kv_tq.signed)
            v_w = vu.quantize(v, at["s_v"], kv_tq.bits, kv_tq.signed)
        else:
            k_w, v_w = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
        bidx = jnp.arange(B)[:, None]
        k_new = k_cache.at[bidx, pos_BxL].set(k_w, mode="drop")
        v_new = v_cache.at[bidx, pos_BxL].set(v_w, mode="drop")
        keys, vals = k_new.transpose(0, 2, 1, 3), v_new.transpose(0, 2, 1, 3)
        key_pos = jnp.broadcast_to(jnp.arange(k_cache.shape[1]), (B, k_cache.shape[1]))
        if quantized:
            qk_spec = qlayers.ProductSpec("qk", r("attn.qk.q"), kv_tq, dtype)
            q_codes = vu.quantize(q_BxKxGLxE, at["s_q"], qk_spec.a.bits, qk_spec.a.signed)
            scores = qlayers.scaled_int_product(q_codes, keys, at["s_q"], at["s_k"], qk_spec)

    if not quantized:
        scores = jnp.einsum("bkle,bkte->bklt", q_BxKxGLxE.astype(jnp.float32), keys.astype(jnp.float32))
    # causal mask by absolute position: query at p sees keys at positions <= p
    qpos = jnp.tile(pos_BxL, (1, G))  # [B, G*L] matching the G*L rows
    mask = key_pos[:, None, None, :] <= qpos[:, None, :, None]
    probs = vu.softmax(scores, mask, dtype)
    if calib is not None:
        calib.see(("attn", "s_p"), probs, p_tq)
    if quantized:
        pv_spec = qlayers.ProductSpec("pv", p_tq, kv_tq, dtype)
        if kv is None:
            o = qlayers.quantized_product(probs, vals, at["s_p"], at["s_v"], pv_spec)
        else:
            p_codes = vu.quantize(probs, at["s_p"], p_tq.bits, p_tq.signed)
            o = qlayers.scaled_int_product(p_codes, vals, at["s_p"], at["s_v"], pv_spec)
    else:
        o = jnp.einsum("bklt,bkte->bkle", probs.astype(jnp.float32), vals.astype(jnp.float32)).astype(dtype)
    o = o.reshape(B, K, G, L, E).transpose(0, 3, 1, 2, 4).reshape(B, L, H * E)
    o = _lin(o, at["o"], at["o"]["s_x"], r("attn.o.x"), r("attn.o.w"), dtype, calib, ("attn", "o", "s_x"),
             tl("attn.o"))
    x = (x_BxLxD + o).astype(dtype)

    h = vu.rmsnorm(x, lp["mlp_norm"], cfg.rms_eps, dtype)
    g = _lin(h, ml["gate"], ml["s_x"], r("mlp.x"), r("mlp.gate.w"), dtype, calib, ("mlp", "s_x"), tl("mlp.gate"))
    u = _lin(h, ml["up"], ml["s_x"], r("mlp.x"), r("mlp.up.w"), dtype, calib, ("mlp", "s_x"), tl("mlp.up"))
    silu_tq = r("mlp.silu")
    if calib is not None:
        calib.see(("mlp", "s_in"), g, silu_tq)
    if silu_tq.is_float or calib is not None:
        a = (g.astype(jnp.float32) * jax.nn.sigmoid(g.astype(jnp.float32)))
    else:
        a = qlayers.silu_lut(g, ml["s_in"], ml["s_out"], silu_tq)
    if calib is not None:
        calib.see(("mlp", "s_out"), a, silu_tq)
    m = (a.astype(dtype) * u.astype(dtype)).astype(dtype)
    m = _lin(m, ml["down"], ml["down"]["s_x"], r("mlp.down.x"), r("mlp.down.w"), dtype, calib, ("mlp", "down", "s_x"),
             tl("mlp.down"))
    x = (x + m).astype(dtype)
    return x, (None if kv is None else (k_new, v_new))


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
               n_valid=None):
    """Scan the stacked layers; returns (x, new cache or None).

    `n_valid` (traced int): only the first n_valid layers run, the rest pass the activation and
    their cache through unchanged (a card holding fewer layers than the stack's slots).
    """
    def body(x, xs):
        i, lp, kv = xs

        def run(x, kv):
            y, kv_new = layer(lp, x, pos_BxL, kv, cfg, prec, None)
            return y.astype(x.dtype), kv_new

        if n_valid is None:
            return run(x, kv)
        return jax.lax.cond(i < n_valid, run, lambda x, kv: (x, kv), x, kv)

    kv = None if cache is None else (cache["k"], cache["v"])
    n = jax.tree.leaves(layers)[0].shape[0]
    x, kv_new = jax.lax.scan(body, x_BxLxD, (jnp.arange(n), layers, kv))
    return x, (None if cache is None else {"k": kv_new[0], "v": kv_new[1]})


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


def calibrate(params: Params, tokens_BxL: jax.Array, cfg: ModelConfig, policy, method: str = "lsq") -> Params:
    """Initialise every step size: weights from the weights, activations from one batch.

    Runs the float forward over `tokens_BxL` and sets each activation step from the tensor it
    quantizes (per layer): method "lsq" is the paper's `2 mean|v| / sqrt(Q_P)`; "mse"
    minimises the quantization error (better without quantization-aware training).
    """
    if method not in CALIBRATIONS:
        raise ValueError(f"unknown calibration {method!r}; choose one of {', '.join(CALIBRATIONS)}")
    prec = resolve(policy, cfg)
    params = init_weight_steps(params, cfg, prec.policy, method)
    if prec.policy.is_float:
        return params
    check_tokens(tokens_BxL, cfg)
    fprec = resolve("float")
    prec = Precision(prec.policy, jnp.float32, prec.tilings)

    @jax.jit
    def collect(params, tokens):
        B, L = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(L), (B, L))

        def body(x, lp):
            calib = _Calib(method)
            # quantization roles from the real policy, arithmetic in float
            x_new, _ = layer(lp, x, pos, None, cfg, prec, calib)
            return x_new.astype(jnp.float32), calib.steps

        x, steps = jax.lax.scan(body, embed(params, tokens, fprec), params["layers"])
        calib = _Calib(method)
        head(params, x, cfg, prec, calib)
        return steps, calib.steps

    layer_steps, head_steps = collect(params, jnp.asarray(tokens_BxL))
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
        tq = prec.layer(f"{name}.w")
        p = lay[blk][lin]
        for key in ("s_w",) + (("s_x",) if "s_x" in p else ()):
            quant.check_step(p[key])
        t = prec.tiling(name)
        served = jax.vmap(lambda p: qlayers.prepare_linear({**p, "s_x": jnp.float32(1.0)}, tq, tiling=t))(p)
        served = {k: v for k, v in served.items() if k != "s_x"} | ({"s_x": p["s_x"]} if "s_x" in p else {})
        lay = _set(lay, (blk, lin), served)
    for path in ACT_STEPS:
        quant.check_step(_get(lay, path))
    lh = {**params["lm_head"], "w": lm_head_weight(params)}
    out = {**params, "layers": lay,
           "lm_head": qlayers.prepare_linear(lh, prec.head("w"), tiling=prec.tiling("lm_head"), name="lm_head")}
    return out


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
    """Bytes of the whole model's KV cache (np_jax.appliance.mapping.kv_cache_bytes, at the policy's width)."""
    return kv_cache_bytes(users, context, cfg.kv_dim, resolve(policy).kv.bits, layers=cfg.n_layers)


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
    # Billions of random codes: XLA's RngBitGenerator is ~2x faster than threefry on CPU.
    key = jax.random.key(int(jax.random.randint(key, (), 0, 2**31 - 1)), impl="unsafe_rbg")
    keys = iter(jax.random.split(key, 2 + len(LINEARS)))

    def codes(k, shape, tq):  # uniform over the 2^b codes, from random bytes (cheaper than randint)
        u = jax.random.bits(k, shape, jnp.uint8) >> (8 - tq.bits)
        return (u.astype(jnp.int16) - tq.q_n).astype(jnp.int8)

    def served(k, name, tq, bias):
        k_in, k_out = cfg.layer_matrices()[name]
        t = prec.tiling(name)
        per_layer = jax.jit(lambda k: tile_weights(codes(k, (k_in, k_out), tq), bits=tq.bits, signed=tq.signed,
                                                   tiling=t))
        tws = [per_layer(kk) for kk in jax.random.split(k, n)]
        tw = jax.tree.map(lambda *xs: jnp.stack(xs), *tws)
        p = {"tw": tw, "s_w": jnp.full((n, k_out), 1.0 / (tq.q_p * math.sqrt(k_in)), jnp.float32)}
        if bias:
            p["b"] = jnp.zeros((n, k_out), jnp.float32)
        return p

    d = cfg.d_model
    act = lambda role: jnp.full((n,), 4.0 / prec.layer(role).q_p, jnp.float32)
    lay: dict = {"attn_norm": jnp.ones((n, d), jnp.float32), "mlp_norm": jnp.ones((n, d), jnp.float32),
                 "attn": {"s_x": act("attn.x"), "s_q": act("attn.qk.q"), "s_k": act("attn.kv"), "s_v": act("attn.kv"),
                          "s_p": jnp.full((n,), 1.0 / prec.layer("attn.probs").q_p, jnp.float32)},
                 "mlp": {"s_x": act("mlp.x"), "s_in": act("mlp.silu"), "s_out": act("mlp.silu")}}
    for name in LINEARS:
        blk, lin = name.split(".")
        lay[blk][lin] = served(next(keys), name, prec.layer(f"{name}.w"), cfg.attn_bias if blk == "attn" else cfg.mlp_bias)
    lay["attn"]["o"]["s_x"] = act("attn.o.x")
    lay["mlp"]["down"]["s_x"] = act("mlp.down.x")
    htq = prec.head("w")
    head_codes = jax.jit(lambda k: tile_weights(codes(k, (d, cfg.vocab_size), htq), bits=htq.bits, signed=htq.signed,
                                                tiling=prec.tiling("lm_head")))
    lm_head = {"tw": head_codes(next(keys)), "s_w": jnp.full((cfg.vocab_size,), 1.0 / (htq.q_p * math.sqrt(d)), jnp.float32),
               "s_x": jnp.float32(4.0 / prec.head("x").q_p)}
    embed_ = (0.02 * jax.random.normal(next(keys), (cfg.vocab_size, d))).astype(jnp.float16)
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
