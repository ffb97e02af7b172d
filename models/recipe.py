"""Quantization recipes: named pipelines from a float model to the integer model the chip executes.

A recipe is a list of switchable transforms, each exact in float or run by the chip itself:

- `fold_norms`: the RMSNorm gains go into the following linear layers (q, k, v; gate, up; the
  output layer, which is untied from the embedding for it); the norms then have unit gain.
- `rotate_residual`: the residual stream is rotated by a random-sign Hadamard matrix Q (order
  d_model, e.g. 576 = Paley-II H36 (x) Sylvester H16), folded offline: embed Q, Q^T W_in, W_out Q.
  RMSNorm commutes with Q (it has unit gain after folding), so the float model is unchanged;
  the outlier channels of the residual stream are spread over all channels.
- `learn_rotation`: a rotation R learned after the residual Hadamard (Q R, folded offline as Q is)
  by that many Adam steps (0: off): KurTail-style (arXiv 2503.01483; DartQuant, arXiv 2511.04063,
  likewise optimises on activation statistics), R minimises the fourth moment of the normed inputs
  of every layer's attention and MLP on calibration windows, which makes their static per-tensor
  4-bit steps finer; no backpropagation through the model (`learn_residual_rotation`).
- `rotate_vo`: a Hadamard of order head_dim on each head's values, folded into W_v and W_o.
- `qk_rotation`: an online Hadamard on q and k after RoPE (`ModelConfig.qk_rotation`): the chip
  runs it as an INT8 x INT2 VMM; the KV cache holds rotated keys.
- `down_rotation`: an online Hadamard (order d_ff, as Kronecker factors, e.g. 1536 = H12 (x)
  H128) before the down projection (`ModelConfig.down_rotation`), its transpose and random signs
  folded into W_down and W_up offline.
- `sink`: the first position (the attention sink: residual values ~25,700 from the middle
  layers on in SmolLM2) gets its own INT8 steps at every activation point and INT8 keys and
  values in a prefix of the cache (`ModelConfig.sink_positions`, PrefixQuant-style).
- `weights`: "gptq" (GPTQ with per-output-channel MSE steps and the Hessian of each layer's
  calibration inputs, the most active inputs first (`act_order`), dampened by `gptq_damp` x the
  Hessian's mean diagonal, then each channel's step refitted to its codes by least squares on the
  same Hessian (`refit_steps`); np_jax.quant.gptq) or "rtn" (round to nearest at MSE steps).
  Switches that are off by default: `gptq_damp_select` (each matrix's dampening chosen among
  GPTQ_DAMPS on held-out calibration windows), `gptq_sequential` (each layer's Hessians from the
  inputs the already-quantized layers before it give), `gptq_asymmetric` (layer by layer, each
  matrix fitted to the float model's outputs from the quantized model's inputs) and
  `gptq_sink_weight` (the sink rows, left out of the Hessians, counted as that many ordinary rows:
  a8c8w4-pdd 1.205x -> 1.115x float perplexity at 16; 0 in `rotate-gptq`, 16 in the default
  recipe `rotate-gptq-sink`; docs/quantization.md).
- `activations`: static steps calibrated ("mse" or the paper's "lsq") on training windows,
  the sink rows excluded from the other rows' steps.

The result is a (config, parameters) pair in training form, whose forward is the chip's integer
forward; `llama.prepare_serving` makes the serving form. `prepare` caches it on disk
(models.prepared) per GGUF file, recipe, precision and calibration data.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import ModelConfig
from np_jax.chip.vector_unit import quantize
from np_jax.quant import get_policy, gptq, hadamard, scale_by_tensor_rms, wants_qk_rotation
from np_jax.progress import Progress
from np_jax.quant.lsq import init_step_mse

Log = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """A named quantization pipeline (every step switchable, see the module docstring)."""

    name: str
    fold_norms: bool = True
    rotate_residual: bool = True
    rotate_vo: bool = True
    qk_rotation: bool | None = None  # None: when the KV cache is quantized (np_jax.quant.wants_qk_rotation)
    down_rotation: bool = True
    sink: int = 1
    weights: str = "gptq"  # "gptq" or "rtn"
    act_order: bool = True  # GPTQ quantizes the most active inputs first (False: in row order, the earlier rule)
    refit_steps: bool = True  # GPTQ's steps refitted to its codes by least squares (False: the MSE steps kept)
    gptq_damp: float = 0.1  # GPTQ's dampening, as a fraction of the Hessian's mean diagonal (0.01: the earlier rule)
    gptq_damp_select: bool = False  # each matrix's dampening chosen on held-out calibration windows (GPTQ_DAMPS)
    gptq_sequential: bool = False  # each layer's Hessians from the inputs the quantized layers before it give
    gptq_asymmetric: bool = False  # ... and each matrix fitted to the float model's outputs (sets gptq_sequential)
    # the sink rows' weight in GPTQ's Hessians: each counts as this many ordinary rows (0: left out,
    # the rule so far); every later position reads the sink's keys and values, made from its stream
    gptq_sink_weight: float = 0.0
    activations: str = "mse"  # "mse" or "lsq" (or "max")
    sink_activations: str | None = "max"  # the sink rows' own steps (None: as `activations`, the earlier rule)
    calib_windows: int = 32  # training windows of 256 tokens for the Hessians and the steps
    seed: int = 0  # the random signs of the rotations
    description: str = ""
    reconstruct: int = 0  # block-wise reconstruction: Adam steps per layer (0: off)
    reconstruct_windows: int = 8  # ... on the first calibration windows (2,048 tokens)
    reconstruct_lr: float = 5e-3  # ... on log(step)
    reconstruct_max_bits: int = 8  # ... only the steps of roles this wide or narrower (8: all; 4: the 4-bit ones)
    reconstruct_codes_lr: float = 0.0  # ... and those matrices' integer codes, at this rate in codes (0: kept)
    reconstruct_sink_weight: float = 0.0  # ... the sink rows' relative output error added at this weight (0: left out)
    reconstruct_fisher: bool = False  # ... each output element's error weighed by the float loss's squared gradient
    reconstruct_own_input: bool = False  # ... the target: the float layer on the quantized input (False: float's)
    learn_rotation: int = 0  # Adam steps of the learned residual rotation after the Hadamard (0: off)
    learn_rotation_lr: float = 2e-3  # ... on its Cayley parameters

    def __post_init__(self):
        if self.weights not in ("gptq", "rtn"):
            raise ValueError(f"recipe weights must be gptq or rtn, got {self.weights!r}")
        for a in (self.activations, self.sink_activations or self.activations):
            if a not in llama.CALIBRATIONS:
                raise ValueError(f"recipe activations must be one of {', '.join(llama.CALIBRATIONS)}, got {a!r}")
        if (self.rotate_residual or self.rotate_vo) and not self.fold_norms:
            raise ValueError("rotations need folded norms (RMSNorm commutes with a rotation only at unit gain)")
        if self.gptq_asymmetric and not self.gptq_sequential:  # asymmetric GPTQ is layer by layer
            object.__setattr__(self, "gptq_sequential", True)
        if not 0 <= self.gptq_sink_weight < 1e6:
            raise ValueError(f"gptq_sink_weight must be in [0, 1e6), got {self.gptq_sink_weight}")
        if self.gptq_sink_weight and (self.gptq_damp_select or not self.sink):
            raise ValueError("gptq_sink_weight weighs the sink rows of GPTQ's Hessians: it needs a sink, and "
                             "gptq_damp_select (which chooses on each half's Hessians) off")
        if self.gptq_damp_select and self.gptq_sequential:
            raise ValueError("recipe gptq_damp_select and gptq_sequential are not implemented together; choose one")
        if not 0 < self.gptq_damp < 10:
            raise ValueError(f"recipe gptq_damp must be in (0, 10), got {self.gptq_damp!r}")
        if self.reconstruct < 0 or self.reconstruct_windows < 1 or not self.reconstruct_lr > 0:
            raise ValueError("recipe reconstruct must be >= 0, on >= 1 window, at a learning rate > 0")
        if not 0 <= self.reconstruct_codes_lr < 1:
            raise ValueError(f"recipe reconstruct_codes_lr must be in [0, 1) codes per step, "
                             f"got {self.reconstruct_codes_lr}")
        if not 0 <= self.reconstruct_sink_weight < 1e6:
            raise ValueError(f"recipe reconstruct_sink_weight must be in [0, 1e6), got {self.reconstruct_sink_weight}")
        if self.reconstruct_sink_weight and not self.sink:
            raise ValueError("recipe reconstruct_sink_weight weighs the sink rows' error: it needs a sink")
        if self.reconstruct_max_bits not in (2, 4, 8):
            raise ValueError(f"recipe reconstruct_max_bits must be 2, 4 or 8 (a VMM width), "
                             f"got {self.reconstruct_max_bits}")
        if self.learn_rotation < 0 or not self.learn_rotation_lr > 0:
            raise ValueError("recipe learn_rotation must be >= 0 steps, at a learning rate > 0")
        if self.learn_rotation and not self.rotate_residual:
            raise ValueError("recipe learn_rotation refines the residual rotation: it needs rotate_residual")

    def qk_rotation_for(self, policy, n_layers: int = 1) -> bool:
        return self.qk_rotation if self.qk_rotation is not None else wants_qk_rotation(policy, n_layers)

    def steps(self, policy=None, n_layers: int = 1) -> list[str]:
        """The transforms applied to a model of `n_layers` layers, in order (for reports)."""
        qk = self.qk_rotation_for(policy, n_layers) if policy is not None else bool(self.qk_rotation)
        on = [k for k in ("fold_norms", "rotate_residual", "rotate_vo", "qk_rotation", "down_rotation")
              if (qk if k == "qk_rotation" else getattr(self, k))]
        if self.learn_rotation:
            on.append(f"learn_rotation:{self.learn_rotation}")  # folded after the other transforms
        sink_acts = f":{self.sink_activations}" if self.sink and self.sink_activations else ""
        weights = self.weights
        if weights == "gptq":  # the layer-by-layer and per-matrix-damping variants named (the default is not)
            weights += (":asymmetric" if self.gptq_asymmetric else ":sequential" if self.gptq_sequential else
                        ":damp-select" if self.gptq_damp_select else "")
            weights += f":sink-weight-{self.gptq_sink_weight:g}" if self.gptq_sink_weight else ""
        return (on + ([f"sink{self.sink}{sink_acts}"] if self.sink else []) + [f"weights:{weights}",
                                                                               f"activations:{self.activations}"]
                + ([f"reconstruct:{self.reconstruct}" + (f":max-bits-{self.reconstruct_max_bits}"
                                                          if self.reconstruct_max_bits != 8 else "")
                    + (f":codes-{self.reconstruct_codes_lr:g}" if self.reconstruct_codes_lr else "")
                    + (f":sink-weight-{self.reconstruct_sink_weight:g}" if self.reconstruct_sink_weight else "")
                    + (":fisher" if self.reconstruct_fisher else "")
                    + (":own-input" if self.reconstruct_own_input else "")]
                   if self.reconstruct else []))

    def to_json(self) -> dict:
        """The recipe's fields (a prepared model's cache key), its description left out: a switch that
        is off (reconstruction, the sink's own calibration) is left out, so that the entries made
        before it existed stay valid."""
        out = dataclasses.asdict(self)
        out.pop("description")  # words for people: rewording one must not orphan its prepared models
        if not self.sink_activations:
            out.pop("sink_activations")
        for k, earlier in _GPTQ_EARLIER.items():
            if out[k] == earlier or self.weights != "gptq":
                out.pop(k)
        if self.gptq_damp_select and self.weights == "gptq":
            out.pop("gptq_damp", None)  # not used: the candidates are
            out["gptq_damp_candidates"] = list(GPTQ_DAMPS)
        else:
            out.pop("gptq_damp_select")
        for k in ("gptq_sequential", "gptq_asymmetric", "gptq_sink_weight"):
            if not (getattr(self, k) and self.weights == "gptq"):
                out.pop(k)
        if not self.reconstruct:
            for k in ("reconstruct", "reconstruct_windows", "reconstruct_lr"):
                out.pop(k)
        if not self.reconstruct or self.reconstruct_max_bits == 8:
            out.pop("reconstruct_max_bits")  # every step fitted: the entries made before the switch
        for k in ("reconstruct_codes_lr", "reconstruct_sink_weight", "reconstruct_fisher", "reconstruct_own_input"):
            if not self.reconstruct or not getattr(self, k):
                out.pop(k)  # the codes kept, the sink rows left out: the entries made before the switches
        if not self.learn_rotation:
            for k in ("learn_rotation", "learn_rotation_lr"):
                out.pop(k)
        return out


# GPTQ's settings before they were recipe fields: a recipe at these values keeps its earlier cache key
_GPTQ_EARLIER = {"act_order": False, "refit_steps": False, "gptq_damp": 0.01}
# the dampings `gptq_damp_select` chooses among, per matrix (log-spaced around the reference's 0.01
# and the default 0.1)
GPTQ_DAMPS = (0.01, 0.03, 0.1, 0.3, 1.0)

RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("plain", fold_norms=False, rotate_residual=False, rotate_vo=False, qk_rotation=False, down_rotation=False,
           sink=0, sink_activations=None, weights="rtn", calib_windows=1,
           description="the earlier path: MSE steps on one calibration window, no transforms"),
    Recipe("rotate", weights="rtn", description="rotations and the sink prefix; weights rounded to nearest"),
    Recipe("rotate-gptq", description="rotations, the sink prefix and GPTQ weights (the sink rows left out of GPTQ's "
                                      "Hessians: the default until the sink weight was measured)"),
    Recipe("rotate-gptq-sink", gptq_sink_weight=16.0,
           description="rotate-gptq with each sink row counted as 16 ordinary rows in GPTQ's Hessians (the default)"),
    Recipe("rotate-gptq-recon", reconstruct=20,
           description="rotate-gptq, then every layer's steps fitted to the float layer's output (block-wise "
                       "reconstruction: a few minutes more on 2 cores)"),
    Recipe("rotate-gptq-learned", learn_rotation=60,
           description="rotate-gptq with a learned residual rotation after the Hadamard (the normed layer inputs' "
                       "fourth moment minimised: a minute more on 2 cores)"),
]}
DEFAULT_RECIPE = "rotate-gptq-sink"


def get_recipe(name: str | Recipe) -> Recipe:
    if isinstance(name, Recipe):
        return name
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}") from None


_FIXED = ("name", "description")  # what an option may not set


def with_options(recipe: str | Recipe, options: list[str] | tuple[str, ...]) -> Recipe:
    """`recipe` with fields set from "KEY=VALUE" strings (an ablation from the command line, e.g.
    "gptq_damp=0.01", "act_order=false"): each value parsed as its field's type, the result checked
    as any recipe is. Unknown keys and unparsable values raise ValueError naming the choices."""
    recipe = get_recipe(recipe)
    fields = {f.name: f for f in dataclasses.fields(Recipe) if f.name not in _FIXED}
    changes: dict = {}
    for opt in options:
        key, sep, text = opt.partition("=")
        key, text = key.strip().replace("-", "_"), text.strip()
        if not sep or key not in fields:
            raise ValueError(f"recipe option {opt!r} is not KEY=VALUE with KEY one of {', '.join(fields)}")
        annotation = str(fields[key].type)  # e.g. "bool | None"
        kind = {"bool": bool, "int": int, "float": float}.get(annotation.split(" |")[0], str)
        low = text.lower()
        try:
            if low in ("none", "null") and "None" in annotation:
                value = None
            elif kind is bool:
                value = {"true": True, "1": True, "on": True, "false": False, "0": False, "off": False}[low]
            else:
                value = kind(text)
        except (KeyError, ValueError):
            raise ValueError(f"recipe option {opt!r}: {text!r} is not {'an' if kind is int else 'a'} "
                             f"{kind.__name__}") from None
        changes[key] = value
    return dataclasses.replace(recipe, **changes)


# --- offline transforms (exact in float) --------------------------------------------------------------

def _linear(lay, name):
    blk, lin = name.split(".")
    return lay[blk][lin]


def fold_norms(params: llama.Params, cfg: ModelConfig) -> tuple[ModelConfig, llama.Params]:
    """RMSNorm gains into the following linears; the output layer untied from the embedding."""
    lay = params["layers"]
    ga, gm = lay["attn_norm"].astype(jnp.float32), lay["mlp_norm"].astype(jnp.float32)
    for name, g in (("attn.q", ga), ("attn.k", ga), ("attn.v", ga), ("mlp.gate", gm), ("mlp.up", gm)):
        p = _linear(lay, name)
        lay = llama._set(lay, tuple(name.split(".")) + ("w",), p["w"] * g[:, :, None])
    lay = {**lay, "attn_norm": jnp.ones_like(lay["attn_norm"]), "mlp_norm": jnp.ones_like(lay["mlp_norm"])}
    w_out = llama.lm_head_weight(params) * params["final_norm"].astype(jnp.float32)[:, None]
    out = {**params, "layers": lay, "final_norm": jnp.ones_like(params["final_norm"]),
           "lm_head": {**params["lm_head"], "w": w_out}}
    return cfg.replace(tied_embeddings=False), out


def rotate_residual(params: llama.Params, cfg: ModelConfig, seed: int) -> llama.Params:
    """The residual stream rotated by Q (random-sign Hadamard, order d_model), folded offline."""
    return rotate_residual_by(params, hadamard.orthogonal(cfg.d_model, seed))


def rotate_residual_by(params: llama.Params, q) -> llama.Params:
    """The residual stream rotated by the orthogonal matrix `q` [D, D] (x -> x q), folded offline."""
    q = jnp.asarray(q, jnp.float32)
    lay = params["layers"]
    for name in ("attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up"):  # inputs: x Q -> W_in' = Q^T W_in
        lay = llama._set(lay, tuple(name.split(".")) + ("w",), jnp.einsum("dk,ndm->nkm", q, _linear(lay, name)["w"]))
    for name in ("attn.o", "mlp.down"):  # outputs: W_out' = W_out Q (and its bias)
        p = _linear(lay, name)
        lay = llama._set(lay, tuple(name.split(".")) + ("w",), p["w"] @ q)
        if "b" in p:
            lay = llama._set(lay, tuple(name.split(".")) + ("b",), p["b"] @ q)
    return {**params, "layers": lay, "embed": params["embed"].astype(jnp.float32) @ q,
            "lm_head": {**params["lm_head"], "w": q.T @ params["lm_head"]["w"]}}


def rotate_vo(params: llama.Params, cfg: ModelConfig) -> llama.Params:
    """Every head's values rotated by H_E / sqrt(E), folded into W_v (columns) and W_o (rows)."""
    h = jnp.asarray(hadamard.orthogonal(cfg.head_dim), jnp.float32)
    lay = params["layers"]
    n, kv, e, hq = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.n_heads
    v = _linear(lay, "attn.v")
    lay = llama._set(lay, ("attn", "v", "w"), (v["w"].reshape(n, -1, kv, e) @ h).reshape(v["w"].shape))
    if "b" in v:
        lay = llama._set(lay, ("attn", "v", "b"), (v["b"].reshape(n, kv, e) @ h).reshape(v["b"].shape))
    o = _linear(lay, "attn.o")
    lay = llama._set(lay, ("attn", "o", "w"), jnp.einsum("fe,nhfd->nhed", h, o["w"].reshape(n, hq, e, -1))
                     .reshape(o["w"].shape))
    return {**params, "layers": lay}


def fold_down_rotation(params: llama.Params, cfg: ModelConfig, seed: int) -> tuple[ModelConfig, llama.Params]:
    """The online Hadamard before the down projection: random signs D into W_up's columns, and
    (D H)^T into W_down, so that (silu(g) * u D) H W_down' = silu(g) * u W_down."""
    factors = hadamard.factors(cfg.d_ff)
    hm = np.ones((1, 1))
    for f in factors:
        hm = np.kron(hm, llama.rotation_matrix(f).astype(np.float64))
    d = hadamard.random_signs(cfg.d_ff, seed + 1).astype(np.float32)
    lay = params["layers"]
    up = _linear(lay, "mlp.up")
    lay = llama._set(lay, ("mlp", "up", "w"), up["w"] * d)
    if "b" in up:
        lay = llama._set(lay, ("mlp", "up", "b"), up["b"] * d)
    dh_t = jnp.asarray((d[:, None] * hm).T, jnp.float32)  # (D H)^T
    lay = llama._set(lay, ("mlp", "down", "w"), jnp.einsum("fg,ngd->nfd", dh_t, _linear(lay, "mlp.down")["w"]))
    return cfg.replace(down_rotation=factors), {**params, "layers": lay}


# --- the learned residual rotation -------------------------------------------------------------------

ROTATION_SAMPLE = 256  # rows sampled per layer input and batch of 4 windows (512 per input on 8 windows)
ROTATION_WINDOWS = 8  # the first calibration windows it learns on


def rotation_inputs(params: llama.Params, cfg: ModelConfig, windows: np.ndarray, seed: int = 0,
                    sample: int = ROTATION_SAMPLE, batch: int = 4) -> np.ndarray:
    """The normed inputs of every layer's attention and MLP (what the residual rotation reaches: the
    q/k/v and gate/up inputs, each token at RMS 1), [n_layers * 2 * rows, D] float32: `sample`
    random positions (at or after the sink) per input and batch of windows, in the float model."""
    prec = llama.Precision(get_policy("float"), jnp.float32, llama.resolve("float", cfg).tilings)
    paths = (("attn", "s_x"), ("mlp", "s_x"))

    @jax.jit
    def collect(params, tokens, idx):
        B, L = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(L), (B, L))

        def body(x, lp):
            calib = _Inputs()
            x_new, _ = llama.layer(lp, x, pos, None, cfg, prec, calib)
            return x_new.astype(jnp.float32), jnp.stack([calib.xtx[p][1][idx] for p in paths])

        return jax.lax.scan(body, llama.embed(params, tokens, prec), params["layers"])[1]

    rng = np.random.default_rng(seed)
    parts = []
    for i in range(0, len(windows), batch):
        tokens = np.asarray(windows[i:i + batch])
        B, L = tokens.shape
        rows = (np.arange(B)[:, None] * L + np.arange(min(cfg.sink_positions, L), L)[None]).reshape(-1)
        idx = np.sort(rng.choice(rows, min(sample, rows.size), replace=False))
        parts.append(np.asarray(collect(params, jnp.asarray(tokens), jnp.asarray(idx))))
    return np.concatenate(parts, axis=2).reshape(-1, cfg.d_model)


def cayley(a: jax.Array) -> jax.Array:
    """The rotation (I - S)^-1 (I + S) of the skew-symmetric S = a - a^T (the identity at a = 0)."""
    s = a - a.T
    eye = jnp.eye(a.shape[0], dtype=a.dtype)
    return jnp.linalg.solve(eye - s, eye + s)


def rotation_loss(r: jax.Array, x: jax.Array) -> jax.Array:
    """The fourth moment of the rotated rows' entries (each row at RMS 1: the kurtosis of the
    entries, 3 for a Gaussian, 1.8 for a uniform; a lighter tail gives a static step less to span)."""
    return jnp.mean((x @ r) ** 4)


def learn_residual_rotation(x: np.ndarray, steps: int, lr: float = 2e-3, log: Log | None = None) -> np.ndarray:
    """R [D, D] float64, orthogonal to rounding, minimising `rotation_loss` over the inputs `x`
    ([rows, D], from `rotation_inputs`): Adam on Cayley parameters from the identity (the Hadamard
    alone), then projected onto the orthogonal matrices (the SVD's U V^T) in float64."""
    import optax

    x = jnp.asarray(x, jnp.float32)
    opt = optax.adam(lr)

    @jax.jit
    def step(a, state):
        value, grad = jax.value_and_grad(lambda a: rotation_loss(cayley(a), x))(a)
        updates, state = opt.update(grad, state)
        return optax.apply_updates(a, updates), state, value

    a = jnp.zeros((x.shape[1], x.shape[1]), jnp.float32)
    state = opt.init(a)
    first = None
    with Progress(f"learned residual rotation ({steps} steps on {x.shape[0]} rows)", steps, unit="step",
                  log=log) as bar:
        for _ in range(steps):
            a, state, value = step(a, state)
            first = float(value) if first is None else first
            bar.update()
    u, _, vt = np.linalg.svd(np.asarray(cayley(a), np.float64))
    r = u @ vt
    if log is not None:
        log(f"learned residual rotation: fourth moment of the normed layer inputs {first:.3f} -> "
            f"{float(rotation_loss(jnp.asarray(r, jnp.float32), x)):.3f} (Gaussian 3, uniform 1.8)")
    return r


# --- weights ----------------------------------------------------------------------------------------

class _Hessians(llama._Calib):
    """Collects 2 X^T X / T of the inputs of every linear layer (the sink rows left out)."""

    PATHS = {("attn", "s_x"): ("attn.q", "attn.k", "attn.v"), ("attn", "o", "s_x"): ("attn.o",),
             ("mlp", "s_x"): ("mlp.gate", "mlp.up"), ("mlp", "down", "s_x"): ("mlp.down",)}

    def __init__(self, sink_rows: bool = False):
        super().__init__("mse")
        self.xtx: dict[tuple, jax.Array] = {}
        self.sink_rows = sink_rows

    def see(self, path, v, tq, sink=None):
        if path in self.PATHS:
            x, rows = _rows(v, sink)
            self.xtx[path] = x.T @ x
            if self.sink_rows and sink is not None:  # its sink rows alone, at path + ("sink",): `gptq_sink_weight`
                self.xtx[path + ("sink",)] = _sink_xtx(x, rows)


def _sink_xtx(kept, rows):
    """X^T X of the sink rows alone, from `_rows`' pair (the rows with the sink zeroed, the rows)."""
    s = rows - kept
    return s.T @ s


def _rows(v, sink):
    """A linear layer's input as [T, K] rows with the sink rows zeroed, and the rows as they are."""
    rows = v.astype(jnp.float32).reshape(-1, v.shape[-1])
    return (rows if sink is None else jnp.where(sink.reshape(-1, 1), 0.0, rows)), rows


class _Inputs(_Hessians):
    """Keeps the inputs of every linear layer: ([T, K] with the sink rows zeroed, [T, K] as they are)."""

    def see(self, path, v, tq, sink=None):
        if path in self.PATHS:
            self.xtx[path] = _rows(v, sink)


def layer_hessians(params: llama.Params, cfg: ModelConfig, windows: np.ndarray, batch: int = 4,
                   log: Log | None = None, halves: bool = False, sink_rows: bool = False):
    """Per layer, X^T X of each linear's inputs over the calibration windows ([N, K, K] per input).
    `halves`: also those of the first and of the second half of the windows, (all, (first, second)),
    for choices checked on windows they were not made on. `sink_rows`: also X^T X of each input's
    sink rows alone (at key + ("sink",), for `weigh_sink_rows`)."""
    prec = llama.Precision(get_policy("float"), jnp.float32, llama.resolve("float", cfg).tilings)

    @jax.jit
    def collect(params, tokens):
        B, L = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(L), (B, L))

        def body(x, lp):
            calib = _Hessians(sink_rows)
            x_new, _ = llama.layer(lp, x, pos, None, cfg, prec, calib)
            return x_new.astype(jnp.float32), calib.xtx

        return jax.lax.scan(body, llama.embed(params, tokens, prec), params["layers"])[1]

    n = len(windows)
    half = n // 2 if halves else n
    if halves and half < 1:
        raise ValueError("choosing on held-out calibration windows needs at least 2 windows")
    parts: list = [None, None]
    with Progress("input Hessians", n, unit="window", log=log) as bar:
        for lo, hi in ((0, half), (half, n)):
            for i in range(lo, hi, batch):
                part = jax.block_until_ready(collect(params, jnp.asarray(windows[i:min(i + batch, hi)])))
                j = int(lo > 0)
                parts[j] = part if parts[j] is None else jax.tree.map(jnp.add, parts[j], part)
                bar.update(min(i + batch, hi) - i)
    parts = [p for p in parts if p is not None]
    total = parts[0] if len(parts) == 1 else jax.tree.map(jnp.add, *parts)
    full = {path: np.asarray(h, np.float64) for path, h in total.items()}
    if not halves:
        return full
    return full, tuple({path: np.asarray(h) for path, h in p.items()} for p in parts)


def weigh_sink_rows(hessians: dict, weight: float) -> dict:
    """`layer_hessians(..., sink_rows=True)` with each input's Hessian H + weight x H_sink, each sink
    row counting as `weight` ordinary rows, and at key + ("damp",) the factor [layers] that keeps
    GPTQ's dampening (a fraction of the mean diagonal) what it is for H: the sink's input is
    hundreds of times larger than the others', and its rows would otherwise raise every input's
    dampening with them. (`weight` = 0 gives H and factors of 1.)"""
    out = {k: v for k, v in hessians.items() if k[-1] != "sink"}
    mean = lambda a: np.trace(a, axis1=-2, axis2=-1) / a.shape[-1]  # noqa: E731
    for key in _Hessians.PATHS:
        h, hs = hessians[key], hessians[key + ("sink",)]
        out[key] = h + weight * hs
        out[key + ("damp",)] = mean(h) / np.maximum(mean(out[key]), 1e-30)
    return out


def _held_out_error(w: np.ndarray, codes: np.ndarray, s: np.ndarray, h: np.ndarray) -> float:
    """The layer-output error sum_n (w_n - q_n s_n)^T H (w_n - q_n s_n) of one quantized matrix."""
    e = np.asarray(w, np.float64) - np.asarray(codes, np.float64) * np.asarray(s, np.float64)
    return float(np.sum(e * (np.asarray(h, np.float64) @ e)))


def choose_damp(w: np.ndarray, s: np.ndarray, bits: int, fit: np.ndarray, check: np.ndarray, *,
                act_order: bool, refit_steps: bool, candidates=None) -> tuple[float, dict]:
    """The GPTQ dampening, of `candidates` (default GPTQ_DAMPS), whose codes (and refitted steps)
    made with the Hessian `fit` give the smallest layer-output error on the Hessian `check` of other
    windows: (damping, {damping: error})."""
    errors = {}
    for d in candidates or GPTQ_DAMPS:
        codes = np.asarray(gptq.gptq(w, fit, s, bits, percdamp=d, act_order=act_order))
        sd = gptq.refit_steps(w, codes, fit, s) if refit_steps else s
        errors[d] = _held_out_error(w, codes, sd, check)
    return min(errors, key=errors.get), errors


def _quantize_matrix(w: np.ndarray, tq, method: str, h: np.ndarray | None, halves: tuple | None, *,
                     act_order: bool, refit_steps: bool, damp: float) -> tuple[np.ndarray, np.ndarray, float]:
    """One layer matrix on its grid: (codes x step, per-channel step, the dampening used)."""
    s = np.asarray(init_step_mse(w, tq), np.float32)
    if method != "gptq":
        return np.asarray(gptq.rtn(w, s, tq.bits)).astype(np.float32) * s, s, 0.0
    d = damp
    if halves is not None:
        kw = dict(act_order=act_order, refit_steps=refit_steps)
        errs = [choose_damp(w, s, tq.bits, f, c, **kw)[1] for f, c in (halves, halves[::-1])]
        d = min(GPTQ_DAMPS, key=lambda c: errs[0][c] + errs[1][c])
    codes = np.asarray(gptq.gptq(w, h, s, tq.bits, percdamp=d, act_order=act_order))
    if refit_steps:
        s = gptq.refit_steps(w, codes, h, s)
    return codes.astype(np.float32) * s, s, d


def _quantize_head(params: llama.Params, prec) -> llama.Params:
    """The output layer at its width, round to nearest."""
    tq = prec.head("w")
    if tq.is_float:
        return params
    w = llama.lm_head_weight(params)
    s = init_step_mse(w, tq)
    codes = gptq.rtn(w, s, tq.bits)
    return {**params, "lm_head": {**params["lm_head"], "w": codes.astype(jnp.float32) * s, "s_w": s}}


def quantize_weights(params: llama.Params, cfg: ModelConfig, policy, method: str, hessians: dict | None,
                     log: Log, progress_log: Log | None = None, *, act_order: bool = False,
                     refit_steps: bool = False, damp: float = 0.01, halves: tuple | None = None) -> llama.Params:
    """Every layer matrix on its integer grid (codes x per-channel MSE steps): GPTQ with the
    layers' input Hessians (dampened by `damp` x their mean diagonal; `act_order`: most active
    inputs first; `refit_steps`: each channel's
    step then refitted to its codes, `gptq.refit_steps`), or round to nearest; the output layer at
    its width, round to nearest. `halves`: the Hessians of the two halves of the calibration windows
    (`layer_hessians(..., halves=True)`); then each matrix's dampening is chosen by `choose_damp`,
    made on each half and checked on the other (two-fold), and `damp` is not used.
    The weights become `codes * step` (float, exactly on the grid), so the serving form (and
    training's integer forward) reproduces the codes."""
    prec = llama.resolve(policy, cfg)
    lay = params["layers"]
    t0 = time.perf_counter()
    n_mats = sum(map(len, _Hessians.PATHS.values())) * cfg.n_layers
    chosen: dict = {name: {} for names in _Hessians.PATHS.values() for name in names}
    with Progress(f"weights: {method}", n_mats, unit="matrix", log=progress_log) as bar:
        for hpath, names in _Hessians.PATHS.items():
            for name in names:
                w = np.asarray(_linear(lay, name)["w"], np.float32)
                steps, out = [], []
                scale = np.ones(cfg.n_layers) if hessians is None else hessians.get(hpath + ("damp",),
                                                                                       np.ones(cfg.n_layers))
                for i in range(cfg.n_layers):
                    wq, s, d = _quantize_matrix(
                        w[i], prec.at(i).layer(f"{name}.w"), method, None if hessians is None else hessians[hpath][i],
                        None if halves is None else tuple(hh[hpath][i] for hh in halves),
                        act_order=act_order, refit_steps=refit_steps, damp=damp * float(scale[i]))
                    if halves is not None:
                        chosen[name][d] = chosen[name].get(d, 0) + 1
                    steps.append(s)
                    out.append(wq)
                    bar.update()
                lay = llama._set(lay, tuple(name.split(".")) + ("w",), jnp.asarray(np.stack(out)))
                lay = llama._set(lay, tuple(name.split(".")) + ("s_w",), jnp.asarray(np.stack(steps)))
    log(f"weights: {method} for {cfg.n_layers} layers x 7 matrices in {time.perf_counter() - t0:.1f} s")
    if halves is not None:
        log("weights: GPTQ dampening chosen per matrix on held-out calibration windows: " + "; ".join(
            f"{name} " + ", ".join(f"{d:g} x{c}" for d, c in sorted(counts.items())) for name, counts in chosen.items()))
    return _quantize_head({**params, "layers": lay}, prec)


def quantize_weights_sequential(params: llama.Params, cfg: ModelConfig, policy, windows: np.ndarray, log: Log,
                                progress_log: Log | None = None, *, act_order: bool = False,
                                refit_steps: bool = False, damp: float = 0.01, asymmetric: bool = False,
                                sink_weight: float = 0.0, batch: int = 8) -> llama.Params:
    """GPTQ layer by layer, in the reference implementation's order: each layer's input Hessians
    come from the calibration windows run through the layers before it with their weights already
    quantized (activations in float), so that each layer's codes are chosen for the inputs the
    quantized model gives it rather than the float model's. Otherwise as `quantize_weights`.

    `asymmetric` (as GPTAQ, arXiv 2504.02692): each matrix is fitted to the float model's output
    on the float model's inputs X from the quantized model's inputs X^: min ||X^ W^ - X W||^2, which
    is GPTQ on H^ = X^T^ X^ towards W~ = W + (H^ + damping)^-1 X^T^ (X - X^) W, so that each layer
    also takes back some of the error of the layers before it. `sink_weight`: as `weigh_sink_rows`."""
    prec = llama.resolve(policy, cfg)
    fprec = llama.Precision(get_policy("float"), jnp.float32, llama.resolve("float", cfg).tilings)

    def layer_inputs(lp, x):
        pos = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
        seen = _Inputs()
        x_new, _ = llama.layer(lp, x, pos, None, cfg, fprec, seen)
        return x_new.astype(jnp.float32), seen.xtx

    def hessians(xs):
        """GPTQ's Hessians of the inputs (the sink rows left out), and the sink rows' own when weighed."""
        out = {k: kept.T @ kept for k, (kept, _) in xs.items()}
        for k in _Hessians.PATHS if sink_weight else ():
            out[k + ("sink",)] = _sink_xtx(*xs[k])
        return out

    @jax.jit
    def run(lp, x):
        x_new, xs = layer_inputs(lp, x)
        return x_new, hessians(xs)

    @jax.jit
    def run_pair(lp, x_q, x_f):
        """The float stream's next input; GPTQ's Hessians of the quantized model's inputs (the sink
        rows left out); and, the sink rows included (so that the target keeps the sink's output),
        X^T^ X^ and X^T^ X."""
        _, xq = layer_inputs(lp, x_q)
        xf_new, xf = layer_inputs(lp, x_f)
        return xf_new, hessians(xq), {k: (v.T @ v, v.T @ xf[k][1]) for k, (_, v) in xq.items()}

    embed = jax.jit(lambda p, t: llama.embed(p, t, fprec))
    xs = [embed(params, jnp.asarray(windows[i:i + batch])) for i in range(0, len(windows), batch)]
    xs_f = list(xs)  # the float model's stream (asymmetric only)
    add = lambda a, b: b if a is None else jax.tree.map(jnp.add, a, b)  # noqa: E731
    t0 = time.perf_counter()
    layers = []
    with Progress("weights: gptq, layer by layer", cfg.n_layers, unit="layer", log=progress_log) as bar:
        for i, lp in enumerate(llama.unstack_layers(params["layers"])):
            hess = cross = None
            for j, x in enumerate(xs):
                if asymmetric:
                    xf_new, h, c = run_pair(lp, x, xs_f[j])
                    xs_f[j], cross = xf_new, add(cross, c)
                else:
                    h = run(lp, x)[1]
                hess = add(hess, h)
            hess = {k: np.asarray(v, np.float64) for k, v in hess.items()}
            if sink_weight:
                hess = weigh_sink_rows(hess, sink_weight)
            for hpath, names in _Hessians.PATHS.items():
                h = hess[hpath]
                d = damp * float(hess.get(hpath + ("damp",), 1.0))
                for name in names:
                    path = tuple(name.split("."))
                    w = np.asarray(llama._get(lp, path + ("w",)), np.float32)
                    if asymmetric:
                        h_all, c_all = (np.asarray(a, np.float64) for a in cross[hpath])
                        w = gptq.asymmetric_target(w, h_all, c_all, damp).astype(np.float32)
                    wq, s, _ = _quantize_matrix(w, prec.at(i).layer(f"{name}.w"), "gptq", h, None,
                                                act_order=act_order, refit_steps=refit_steps, damp=d)
                    lp = llama._set(llama._set(lp, path + ("w",), jnp.asarray(wq)), path + ("s_w",), jnp.asarray(s))
            xs = [run(lp, x)[0] for x in xs]
            layers.append(lp)
            bar.update()
    log(f"weights: gptq layer by layer{' (asymmetric)' if asymmetric else ''} for {cfg.n_layers} layers x 7 "
        f"matrices on {len(windows)} windows in {time.perf_counter() - t0:.1f} s")
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)
    return _quantize_head({**params, "layers": stacked}, prec)


# --- block-wise reconstruction ---------------------------------------------------------------------------

def _log_steps(lp: llama.Params, cfg: ModelConfig, prec: llama.Precision, max_bits: int = 8) -> dict:
    """The steps block-wise reconstruction fits in one layer, as logarithms: every activation step
    and every weight step (per output channel) of the layer matrices; with `max_bits` < 8 only
    those whose role in `prec`'s layer is that narrow or narrower (the sink's steps are INT8)."""
    def narrow(role):
        return max_bits >= 8 or (role != "sink" and prec.layer(role).bits <= max_bits)
    out = {"act": {".".join(path): jnp.log(llama._get(lp, path)) for path, role in llama.act_steps(cfg).items()
                   if narrow(role)}}
    out["w"] = {name: jnp.log(_linear(lp, name)["s_w"]) for name in llama.LINEARS if narrow(f"{name}.w")}
    return out


def _with_log_steps(lp: llama.Params, theta: dict, codes: dict) -> llama.Params:
    """`lp` with the steps exp(theta); each matrix is its integer codes times its new steps: the fixed
    `codes`, or, where `theta["codes"]` has the matrix, those continuous codes (the layer's weight
    quantizer rounds them, with its straight-through gradient)."""
    for key, t in theta["act"].items():
        lp = llama._set(lp, tuple(key.split(".")), jnp.exp(t))
    for name, t in theta["w"].items():
        s = jnp.exp(t)
        path = tuple(name.split("."))
        lp = llama._set(lp, path + ("s_w",), s)
        lp = llama._set(lp, path + ("w",), theta.get("codes", codes).get(name, codes[name]) * s)
    return lp


def _rounded_codes(theta: dict, p: llama.Precision) -> dict:
    """The integer codes the continuous `theta["codes"]` stand for: what the layer's weight quantizer
    makes of codes x step (rounded to nearest, clipped to the role's grid), so that the matrix that
    is kept is the one the last loss was computed with."""
    out = {}
    for name, v in theta.get("codes", {}).items():
        s, tq = jnp.exp(theta["w"][name]), p.layer(f"{name}.w")
        out[name] = quantize(v * s, s, tq.bits, tq.signed).astype(jnp.float32)
    return out


def layer_output_fisher(params: llama.Params, cfg: ModelConfig, windows: np.ndarray, batch: int = 2) -> jax.Array:
    """The squared gradient of the float model's next-token loss with respect to every layer's
    output, [layers, B, L, D] (BRECQ's diagonal Fisher, arXiv 2102.05426 sec. 3.2): how much
    the model's loss cares about each element of each layer's output on these windows. Computed
    `batch` windows at a time (the output layer's logits are the memory)."""
    prec = llama.Precision(get_policy("float"), jnp.float32, llama.model_tilings(cfg))

    @jax.jit
    def grads(tokens):
        B, L = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(L), (B, L))

        def loss(deltas):
            def body(x, xs):
                lp, d = xs
                return llama.layer(lp, x, pos, None, cfg, prec)[0].astype(jnp.float32) + d, None

            x, _ = jax.lax.scan(body, llama.embed(params, tokens, prec).astype(jnp.float32),
                                (params["layers"], deltas))
            logp = jax.nn.log_softmax(llama.head(params, x, cfg, prec)[:, :-1])
            return -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

        return jax.grad(loss)(jnp.zeros((cfg.n_layers, B, L, cfg.d_model), jnp.float32)) ** 2

    windows = np.asarray(windows)
    return jnp.concatenate([grads(jnp.asarray(windows[i:i + batch])) for i in range(0, len(windows), batch)], axis=1)


def reconstruct(params: llama.Params, float_params: llama.Params, cfg: ModelConfig, policy, windows: np.ndarray,
                iters: int, lr: float = 5e-3, log: Log | None = None, errors: list | None = None,
                max_bits: int = 8, codes_lr: float = 0.0, sink_weight: float = 0.0, fisher: bool = False,
                own_input: bool = False) -> llama.Params:
    """Block-wise reconstruction of the step sizes (BRECQ, arXiv 2102.05426; OmniQuant, arXiv
    2308.13137, with the integer codes kept): layer by layer, in order, every activation step and
    every weight step of the layer (the GPTQ codes fixed, so a matrix stays on its grid) is fitted
    by `iters` Adam steps on log(step) to make the quantized layer's output, on the quantized
    model's own input, match the float layer's output on the float model's input (relative squared
    error, the sink positions left out: they have their own INT8 steps). The training forward is
    the chip's integer forward with LSQ gradients, so what is fitted is what runs. `errors` (a list)
    receives each layer's (relative error before, after). `max_bits` < 8: only the steps of roles
    that narrow are fitted, the wider ones keep their calibration (`_log_steps`).

    `codes_lr` > 0: the integer codes of the matrices whose steps are fitted move too (AdaRound,
    arXiv 2004.10568, and the block-wise weight fitting of BRECQ and PrefixQuant, in the simplest
    form): each code is a continuous parameter started at its GPTQ value, moved by Adam at
    `codes_lr` codes per step through the weight quantizer's straight-through gradient, and rounded
    to the grid at the end (`scale_by_tensor_rms`: each code moves in proportion to its gradient);
    a rounding flip can raise the loss, so the best of the points visited is kept (never worse, on
    the calibration windows, than the start).

    `sink_weight` > 0: the sink rows' own relative output error is added to the loss at this weight.
    Their activation steps are their own, but the weight steps and codes are shared with every
    other row: left out of the loss, the sink rows, which every later layer's attention reads, may
    drift while the ordinary rows' error falls.

    `fisher`: each element of the squared error weighed by how much the float model's loss cares
    about it (`layer_output_fisher`, BRECQ's objective) instead of alike: a layer's output error
    is then measured in what the later layers and the output layer make of it.

    `own_input`: the target is the float layer on the quantized model's own input (each layer
    fits its own error only, BRECQ's and AdaRound's target) instead of the float model's output
    there (which also asks each layer to undo the error of the layers before it)."""
    import optax

    prec = llama.resolve(policy, cfg)
    fprec = llama.Precision(get_policy("float"), jnp.float32, prec.tilings)
    tokens = jnp.asarray(windows)
    B, L = tokens.shape
    pos = jnp.broadcast_to(jnp.arange(L), (B, L))
    keep = (pos >= cfg.sink_positions)[..., None].astype(jnp.float32)
    codes_opt = optax.chain(scale_by_tensor_rms(), optax.scale_by_learning_rate(codes_lr or lr))
    opt = optax.multi_transform({"steps": optax.adam(lr), "codes": codes_opt},
                                lambda theta: {k: jax.tree.map(lambda _: "codes" if k == "codes" else "steps", t)
                                               for k, t in theta.items()})

    @jax.jit
    def float_layer(lp, x):
        return llama.layer(lp, x, pos, None, cfg, fprec)[0].astype(jnp.float32)

    @functools.partial(jax.jit, static_argnums=(4,))
    def fit(lp, x, y, codes, p, weight):
        def loss(theta):
            out = llama.layer(_with_log_steps(lp, theta, codes), x, pos, None, cfg, p)[0].astype(jnp.float32)
            rows = keep if weight is None else keep * weight
            e = jnp.sum(rows * (out - y) ** 2) / jnp.sum(rows * y ** 2)
            if sink_weight and cfg.sink_positions:  # the sink rows' own relative error (their norms are far larger)
                sink = 1 - keep if weight is None else (1 - keep) * weight
                e = e + sink_weight * jnp.sum(sink * (out - y) ** 2) / jnp.sum(sink * y ** 2)
            return e

        def body(carry, _):
            theta, state, best, best_value = carry
            value, grads = jax.value_and_grad(loss)(theta)
            if codes_lr:  # a rounding flip may raise the loss: the best point seen is kept
                best, best_value = jax.lax.cond(value < best_value, lambda: (theta, value), lambda: (best, best_value))
            updates, state = opt.update(grads, state)
            return (optax.apply_updates(theta, updates), state, best, best_value), value

        theta0 = _log_steps(lp, cfg, p, max_bits)
        if codes_lr:
            theta0["codes"] = {name: codes[name] for name in theta0["w"]}
        (theta, _, best, best_value), losses = jax.lax.scan(body, (theta0, opt.init(theta0), theta0, jnp.inf), None,
                                                            length=iters)
        last = loss(theta)
        if codes_lr:
            theta, last = jax.lax.cond(last < best_value, lambda: (theta, last), lambda: (best, best_value))
        kept = _with_log_steps(lp, {"act": theta["act"], "w": theta["w"]}, {**codes, **_rounded_codes(theta, p)})
        return kept, losses[0], last

    @functools.partial(jax.jit, static_argnums=(2,))
    def quant_layer(lp, x, p):
        return llama.layer(lp, x, pos, None, cfg, p)[0]

    fisher_w = None
    if fisher:
        with Progress(f"the float model's loss gradients at every layer's output ({B * L} tokens)", log=log):
            fisher_w = layer_output_fisher(float_params, cfg, windows)
    layers, flayers = llama.unstack_layers(params["layers"]), llama.unstack_layers(float_params["layers"])
    x_f = llama.embed(float_params, tokens, fprec).astype(jnp.float32)
    x_q = llama.embed(params, tokens, prec)
    out, errs = ([], []) if errors is None else ([], errors)
    with Progress(f"block-wise reconstruction ({iters} steps per layer, {B * L} tokens)", cfg.n_layers,
                  unit="layer", log=log) as bar:
        for i, (lp, lf) in enumerate(zip(layers, flayers)):
            p = prec.at(i)
            y = float_layer(lf, x_q.astype(jnp.float32) if own_input else x_f)  # own_input: no float trajectory
            codes = {name: jnp.round(_linear(lp, name)["w"] / _linear(lp, name)["s_w"]) for name in llama.LINEARS}
            lp, before, after = fit(lp, x_q, y, codes, p, None if fisher_w is None else fisher_w[i])
            out.append(lp)
            errs.append((float(before), float(after)))
            x_q, x_f = quant_layer(lp, x_q, p), y
            bar.update()
    if log is not None:
        e = np.asarray(errs)
        log(f"block-wise reconstruction: each layer's relative output error, mean {e[:, 0].mean():.4f} -> "
            f"{e[:, 1].mean():.4f}, last layer {e[-1, 0]:.4f} -> {e[-1, 1]:.4f}")
    return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *out)}


# --- the pipeline --------------------------------------------------------------------------------------

def transformed_config(cfg: ModelConfig, recipe: str | Recipe, policy) -> ModelConfig:
    """The config a recipe makes of `cfg` at `policy` (to map a model before its weights are loaded)."""
    recipe = get_recipe(recipe)
    return cfg.replace(tied_embeddings=cfg.tied_embeddings and not recipe.fold_norms,
                       qk_rotation=recipe.qk_rotation_for(policy, cfg.n_layers),
                       down_rotation=hadamard.factors(cfg.d_ff) if recipe.down_rotation else (),
                       sink_positions=recipe.sink)


def transform(params: llama.Params, cfg: ModelConfig, recipe: str | Recipe, policy) -> tuple[ModelConfig, llama.Params]:
    """The recipe's transforms alone (folds, rotations, the sink and online flags): in float, the
    transformed model computes the same function (tests/test_recipe.py)."""
    recipe = get_recipe(recipe)
    if recipe.fold_norms:
        cfg, params = fold_norms(params, cfg)
    if recipe.rotate_residual:
        params = rotate_residual(params, cfg, recipe.seed)
    if recipe.rotate_vo:
        params = rotate_vo(params, cfg)
    if recipe.down_rotation:
        cfg, params = fold_down_rotation(params, cfg, recipe.seed)
    cfg = cfg.replace(qk_rotation=recipe.qk_rotation_for(policy, cfg.n_layers), sink_positions=recipe.sink)
    return cfg, {**params, "layers": llama.with_act_steps(params["layers"], cfg)}


def apply(params: llama.Params, cfg: ModelConfig, recipe: str | Recipe, policy, windows: np.ndarray,
          log: Log | None = None, learned: dict | None = None) -> tuple[ModelConfig, llama.Params]:
    """Run `recipe` on float `params`: (transformed config, parameters with every step set).

    `windows`: calibration token windows [n, L] from the training split (the first
    `recipe.calib_windows` are used). `log`: each stage's line and its progress (none if None).
    `learned` (a dict): receives the learned residual rotation R as "residual_rotation"
    (`learn_rotation`: the residual stream is then x Q R).
    """
    progress_log, log = log, log or (lambda m: None)
    recipe = get_recipe(recipe)
    policy = get_policy(policy)
    if policy.is_float:
        return cfg, params
    windows = np.asarray(windows)[: recipe.calib_windows]
    t0 = time.perf_counter()
    cfg, params = transform(params, cfg, recipe, policy)
    done = [s for s in recipe.steps(policy, cfg.n_layers)
            if not s.startswith(("learn_rotation:", "weights:", "activations:", "reconstruct:"))]
    log(f"recipe {recipe.name}: transforms {', '.join(done) or 'none'} in {time.perf_counter() - t0:.1f} s")
    if recipe.learn_rotation:
        t0 = time.perf_counter()
        x = rotation_inputs(params, cfg, windows[:ROTATION_WINDOWS], recipe.seed)
        r = learn_residual_rotation(x, recipe.learn_rotation, recipe.learn_rotation_lr, log=progress_log)
        params = rotate_residual_by(params, r)
        if learned is not None:
            learned["residual_rotation"] = r
        log(f"recipe {recipe.name}: learned residual rotation ({recipe.learn_rotation} steps on "
            f"{min(len(windows), ROTATION_WINDOWS)} windows) in {time.perf_counter() - t0:.1f} s")
    hess, halves = None, None
    float_params = params  # the transformed float model: the reconstruction's reference
    if recipe.weights == "gptq" and recipe.gptq_sequential:
        params = quantize_weights_sequential(params, cfg, policy, windows, log, progress_log, act_order=recipe.act_order,
                                             refit_steps=recipe.refit_steps, damp=recipe.gptq_damp,
                                             asymmetric=recipe.gptq_asymmetric,
                                             sink_weight=recipe.gptq_sink_weight)
    elif recipe.weights == "gptq":
        t0 = time.perf_counter()
        hess = layer_hessians(params, cfg, windows, log=progress_log, halves=recipe.gptq_damp_select,
                              sink_rows=bool(recipe.gptq_sink_weight))
        hess, halves = hess if recipe.gptq_damp_select else (hess, None)
        if recipe.gptq_sink_weight:
            hess = weigh_sink_rows(hess, recipe.gptq_sink_weight)
        log(f"recipe {recipe.name}: input Hessians of every layer on {len(windows)} windows in "
            f"{time.perf_counter() - t0:.1f} s")
    if not (recipe.weights == "gptq" and recipe.gptq_sequential):
        params = quantize_weights(params, cfg, policy, recipe.weights, hess, log, progress_log,
                                  act_order=recipe.act_order, refit_steps=recipe.refit_steps, damp=recipe.gptq_damp,
                                  halves=halves)
    t0 = time.perf_counter()
    stats: dict = {}
    with Progress(f"activation steps ({recipe.activations}), one pass over {len(windows)} windows", log=progress_log):
        params = llama.calibrate(params, jnp.asarray(windows), cfg, policy, recipe.activations, weights=False,
                                 stats=stats, sink_method=recipe.sink_activations)
    log(f"recipe {recipe.name}: activation steps ({recipe.activations}) in {time.perf_counter() - t0:.1f} s")
    if recipe.reconstruct:
        t0 = time.perf_counter()
        params = reconstruct(params, float_params, cfg, policy, windows[: recipe.reconstruct_windows],
                             recipe.reconstruct, recipe.reconstruct_lr, log=progress_log,
                             max_bits=recipe.reconstruct_max_bits, codes_lr=recipe.reconstruct_codes_lr,
                             sink_weight=recipe.reconstruct_sink_weight, fisher=recipe.reconstruct_fisher,
                             own_input=recipe.reconstruct_own_input)
        log(f"recipe {recipe.name}: block-wise reconstruction ({recipe.reconstruct} steps per layer on "
            f"{min(len(windows), recipe.reconstruct_windows)} windows) in {time.perf_counter() - t0:.1f} s")
    if "down_input_token_max" in stats:
        found = outlier_tokens(stats["down_input_token_max"], cfg.sink_positions)
        log(f"recipe {recipe.name}: {describe_outliers(found, windows, cfg.sink_positions)}")
    return cfg, params


OUTLIER_RATIO = 64.0  # PrefixQuant's (arXiv 2410.05265) outlier-token threshold: 64x the median token


def outlier_tokens(token_max_LxBxT: np.ndarray, sink: int = 0, ratio: float = OUTLIER_RATIO) -> list[tuple[int, int, int]]:
    """The outlier tokens the sink prefix does not cover: (layer, window, position) of every token at
    position >= `sink` whose largest |down-projection input| exceeds `ratio` times that layer's
    median token's (`llama.calibrate`'s "down_input_token_max")."""
    m = np.asarray(token_max_LxBxT, np.float64)
    med = np.median(m.reshape(m.shape[0], -1), axis=1)[:, None, None]
    hit = m > ratio * np.maximum(med, np.finfo(np.float64).tiny)
    hit[:, :, :sink] = False
    return [tuple(int(v) for v in t) for t in np.argwhere(hit)]


def describe_outliers(found: list[tuple[int, int, int]], windows: np.ndarray, sink: int) -> str:
    """One line: how many outlier tokens beyond the sink the calibration windows hold, and which."""
    n_tok = int(np.asarray(windows).shape[0] * np.asarray(windows).shape[1])
    head = f"outlier tokens (down-projection input > {OUTLIER_RATIO:g}x the median token) after the {sink}-position sink"
    if not found:
        return f"{head}: none in {n_tok} calibration tokens"
    tokens = sorted({(w, t) for _, w, t in found})
    ids = sorted({int(np.asarray(windows)[w, t]) for w, t in tokens})
    layers = sorted({l for l, _, _ in found})
    return (f"{head}: {len(tokens)} of {n_tok} calibration tokens (token ids {', '.join(map(str, ids[:8]))}"
            f"{', ...' if len(ids) > 8 else ''}; layers {', '.join(map(str, layers))}); they share the other tokens' static steps")
