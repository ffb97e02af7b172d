"""Per-layer sensitivity: what lowering one (layer, weight role) from 8 to 4 bits costs in held-out
loss, estimated from the gradients of the integer forward and checked by direct measurement.

The estimate is second order (the first-order term averages out at a trained model): lowering the
weights W of one role to 4 bits moves them by d = Q4(W) - Q8(W) (Q8 at the model's own steps, Q4 at
each channel's MSE-optimal 4-bit step), and the mean next-token loss rises by about

    0.5 * sum_elements F * d^2,   F = n * mean over windows of g^2

with g the gradient of a window's mean loss w.r.t. W through the w8a8 forward (LSQ passes it
straight through the rounding), and n the window's target count: the empirical Fisher per token,
were the tokens' gradients independent (the per-window mean divides their variance by n). One
backward pass per window gives F for every layer and role at once.

Only the weight roles are estimated: an activation's gradient is inside `models.llama.layer`,
which exposes no hook for it (a per-element probe would need one).

The measurement re-runs the held-out evaluation with one entry at 4 bits. The 4-bit weights
c * s4 (codes c in -8..7) are held on the 8-bit grid of step s4 / 16 (codes 16 c in -128..112),
which the w8a8 forward reproduces exactly (the division is by a power of two): every sampled entry
shares one compiled forward. `tests/test_sensitivity.py` checks this against the forward of the
policy with that one rule at 4 bits.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import ModelConfig
from models.evaluate.perplexity import evaluate, token_nll
from np_jax.chip import vector_unit as vu
from np_jax.quant import PrecisionPolicy, TensorQuant, get_policy
from np_jax.quant.lsq import init_step_mse

ROLES = llama.LAYER_ROLES  # "attn.q.w", ..., "mlp.down.w"
W4 = TensorQuant(4, per_channel=True)
GRID = 16  # 2^(8-4): a 4-bit code c is the 8-bit code 16 c at a sixteenth of the step


def _path(role: str) -> tuple[str, str]:
    blk, lin, _ = role.split(".")
    return blk, lin


def check_policy(policy, cfg: ModelConfig) -> PrecisionPolicy:
    """The policy the sensitivities start from: every layer's weight roles at 8 bits, per channel."""
    p = get_policy(policy)
    for i in range(cfg.n_layers):
        for r in ROLES:
            tq = p(f"layers.{i}.{r}")
            if tq.bits != 8 or not tq.per_channel:
                raise ValueError(f"sensitivity starts from 8-bit per-channel weights; precision {p.name!r} gives "
                                 f"layers.{i}.{r} {tq.bits or 'float'} bits" + ("" if tq.per_channel else
                                                                                 " per tensor"))
    return p


@functools.lru_cache(maxsize=8)
def _window_grads(cfg: ModelConfig, policy: PrecisionPolicy) -> Callable:
    """Per-window gradients of the window's mean NLL w.r.t. every weight role's stacked weights."""
    def loss(ws, params, toks_L1):
        lay = params["layers"]
        for role, w in ws.items():
            blk, lin = _path(role)
            lay = {**lay, blk: {**lay[blk], lin: {**lay[blk][lin], "w": w}}}
        logits = llama.forward({**params, "layers": lay}, toks_L1[None, :-1], cfg, policy)
        return token_nll(logits, toks_L1[None, 1:]).mean()

    def f(params, toks_BxL1):
        ws = {r: params["layers"][_path(r)[0]][_path(r)[1]]["w"] for r in ROLES}
        return jax.vmap(jax.grad(loss), in_axes=(None, None, 0))(ws, params, toks_BxL1)
    return jax.jit(f)


def fisher_diagonal(params: llama.Params, cfg: ModelConfig, policy, windows_NxL1: np.ndarray,
                    batch_size: int = 2) -> dict[str, np.ndarray]:
    """role -> mean over the windows of the squared per-window gradient ([layers, K, N]), each
    window's loss its mean next-token NLL through `policy`'s integer forward."""
    policy = get_policy(policy)
    windows = np.asarray(windows_NxL1, np.int32)
    f = _window_grads(cfg, policy)
    total = {r: 0.0 for r in ROLES}
    for i in range(0, len(windows), batch_size):
        chunk = windows[i: i + batch_size]
        pad = batch_size - len(chunk)
        if pad:  # one compiled shape; the padded rows' gradients are dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)])
        g = f(params, jnp.asarray(chunk))
        for r in ROLES:
            total[r] = total[r] + np.square(np.asarray(g[r], np.float64)[: batch_size - pad]).sum(0)
    return {r: total[r] / len(windows) for r in ROLES}


def weight_deltas(w_KxN: jax.Array, s8_N: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Q4(w) - Q8(w), Q4(w), the 4-bit steps): Q8 at the model's per-channel steps `s8_N`, Q4 at
    each channel's MSE-optimal 4-bit step."""
    s4 = init_step_mse(w_KxN, W4)
    q4 = vu.dequantize(vu.quantize(w_KxN, s4, 4), s4)
    q8 = vu.dequantize(vu.quantize(w_KxN, s8_N, 8), s8_N)
    return q4 - q8, q4, s4


def estimates(params: llama.Params, cfg: ModelConfig, fisher: dict[str, np.ndarray], tokens_per_window: int
              ) -> np.ndarray:
    """[layers, roles] estimated increase of the mean NLL (nats/token) of each entry at 4 bits."""
    out = np.zeros((cfg.n_layers, len(ROLES)))
    for j, r in enumerate(ROLES):
        lin = params["layers"][_path(r)[0]][_path(r)[1]]
        for i in range(cfg.n_layers):
            d = np.asarray(weight_deltas(lin["w"][i], lin["s_w"][i])[0], np.float64)
            out[i, j] = 0.5 * tokens_per_window * float(np.sum(fisher[r][i] * d * d))
    return out


def lowered(params: llama.Params, layer: int, role: str) -> llama.Params:
    """`params` with `role` of `layer` at its 4-bit weights, held on the 8-bit grid (module docstring)."""
    blk, lin = _path(role)
    p = params["layers"][blk][lin]
    _, q4, s4 = weight_deltas(p["w"][layer], p["s_w"][layer])
    new = {**p, "w": p["w"].at[layer].set(q4), "s_w": p["s_w"].at[layer].set(s4 / GRID)}
    return {**params, "layers": {**params["layers"], blk: {**params["layers"][blk], lin: new}}}


def lowered_policy(policy, layer: int, role: str) -> PrecisionPolicy:
    """`policy` with `role` of `layer` at 4 bits per channel (what `lowered` emulates at 8)."""
    p = get_policy(policy)
    return PrecisionPolicy(f"{p.name}-l{layer}-{role}-w4", ((f"layers.{layer}.{role}", W4),) + p.rules)


def sample_entries(est: np.ndarray, n: int) -> list[tuple[int, int]]:
    """`n` entries evenly spaced in the order of their estimates (smallest and largest included), so
    that the measured sample spans the estimates' range."""
    order = np.argsort(est, axis=None, kind="stable")
    picks = np.unique(np.round(np.linspace(0, order.size - 1, n)).astype(int))
    return [tuple(int(v) for v in np.unravel_index(order[k], est.shape)) for k in picks]


def spearman(a, b) -> float:
    """Spearman's rank correlation (ties take their mean rank); NaN when either side is constant."""
    def ranks(x):
        x = np.asarray(x, float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def sensitivity(params: llama.Params, cfg: ModelConfig, policy, fisher_windows: np.ndarray,
                eval_windows: np.ndarray, sample: int, batch_size: int = 4,
                log: Callable[[str], None] = lambda m: None) -> dict:
    """The table: every (layer, role)'s estimate, the measured NLL increase of `sample` of them, and
    the rank correlation of the two over the sample."""
    policy = check_policy(policy, cfg)
    t0 = time.perf_counter()
    fisher = fisher_diagonal(params, cfg, policy, fisher_windows)
    est = estimates(params, cfg, fisher, fisher_windows.shape[1] - 1)
    t_est = time.perf_counter() - t0
    log(f"estimates from {len(fisher_windows)} windows in {t_est:.1f} s")
    t0 = time.perf_counter()
    base = evaluate(params, cfg, policy, eval_windows, batch_size)["nll"]
    measured = {}
    for k, (i, j) in enumerate(sample_entries(est, sample)):
        nll = evaluate(lowered(params, i, ROLES[j]), cfg, policy, eval_windows, batch_size)["nll"]
        measured[(i, j)] = nll - base
        log(f"measured {k + 1}/{sample}: layers.{i}.{ROLES[j]} {nll - base:+.5f} nats (estimate {est[i, j]:.5f})")
    t_meas = time.perf_counter() - t0
    keys = sorted(measured)
    return {
        "roles": list(ROLES), "layers": cfg.n_layers, "policy": policy.name, "base_nll": base,
        "estimate": est.tolist(),
        "entries": [{"layer": i, "role": r, "estimate": float(est[i, j]),
                     **({"measured": float(measured[(i, j)])} if (i, j) in measured else {})}
                    for i in range(cfg.n_layers) for j, r in enumerate(ROLES)],
        "spearman": None if np.isnan(rho := spearman([est[k] for k in keys], [measured[k] for k in keys])) else rho,
        "sampled": len(keys),
        "fisher_windows": int(len(fisher_windows)), "eval_windows": int(len(eval_windows)),
        "seq_len": int(fisher_windows.shape[1] - 1),
        "seconds": {"estimate": t_est, "measure": t_meas},
    }


def heatmap_figure(result: dict):
    """Layers x roles, colour the estimate on a log scale; measured entries marked with their value."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    est = np.asarray(result["estimate"], float)
    pos = est[est > 0]
    lo, hi = (pos.min(), pos.max()) if pos.size else (1e-9, 1e-8)
    fig = Figure(figsize=(max(11.0, 0.3 * est.shape[0] + 2.0), 5.5), dpi=120)  # layers along x
    ax = fig.add_subplot()
    im = ax.imshow(np.where(est > 0, est, lo).T, aspect="auto", cmap="viridis", interpolation="nearest",
                   norm=LogNorm(lo, max(hi, lo * 1.0001)))
    ax.set_yticks(range(len(result["roles"])), result["roles"])
    ax.set_xticks(range(est.shape[0]), [str(i) for i in range(est.shape[0])], fontsize=8)
    ax.set_xlabel("layer")
    for e in result["entries"]:
        if "measured" in e:
            ax.text(e["layer"], result["roles"].index(e["role"]), "x", ha="center", va="center", color="red",
                    fontsize=9, fontweight="bold")
    fig.colorbar(im, ax=ax, label="estimated NLL increase at 4 bits (nats/token)")
    rho = "undefined" if result["spearman"] is None else f"{result['spearman']:.2f}"
    ax.set_title(f"8 -> 4-bit weight sensitivity from {result['policy']} (x: measured; Spearman {rho} over "
                 f"{result['sampled']})")
    fig.tight_layout()
    return fig
