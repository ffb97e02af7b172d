"""Differentiable design-space exploration over the performance model (np_jax.cost).

- `sensitivities`: elasticities d log(metric) / d log(parameter) at a design, by `jax.grad`.
- `sweep`: a grid of designs evaluated at once with `jax.vmap` (one compiled call), the best
  feasible design for an objective, and the Pareto front (latency vs energy metric).
- `gradient_search`: multi-start optax Adam on a box-bounded, log-scaled parameterisation:
  maximise the energy metric (or another metric) subject to fitting in core memory and a
  latency bound, both as softplus penalties; then snap the discrete parameters (users,
  micro-batches, a square core grid, cards) and re-evaluate.

Parameter names are the fields of `Design`, `Workload` and `Bits` (the latter
prefixed `bits.`, e.g. `bits.w`). Feasible = fits in core memory (relaxed structure), latency
<= the bound, and 1 <= micro-batches <= users.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from np_jax.cost.params import Bits, Design, ModelShape, Workload
from np_jax.cost.estimate import evaluate
from np_jax.spec import MIB

DEFAULT_GRID: dict[str, list[float]] = {
    "clock_hz": [200e6, 300e6, 400e6, 500e6, 600e6, 700e6, 800e6, 1000e6],
    "sram_per_core_bytes": [0.5 * MIB, 0.625 * MIB, 0.75 * MIB, 1.0 * MIB, 1.25 * MIB, 1.5 * MIB],
    "n_cores": [144.0, 196.0, 256.0, 324.0, 400.0],
    "users": [8.0, 14.0, 28.0, 42.0, 56.0, 84.0],
    "micro_batches": [4.0, 7.0, 14.0, 28.0, 42.0],
}
# A quick look (`np-jax dse --grid small`): 48 designs around the published one, which is among them.
SMALL_GRID: dict[str, list[float]] = {
    "clock_hz": [300e6, 400e6, 600e6], "sram_per_core_bytes": [0.75 * MIB, 1.0 * MIB],
    "n_cores": [196.0, 256.0], "users": [14.0, 28.0], "micro_batches": [7.0, 14.0]}

# Box bounds of the gradient search (log-scaled inside).
DEFAULT_BOUNDS: dict[str, tuple[float, float]] = {
    "clock_hz": (100e6, 1200e6),
    "sram_per_core_bytes": (0.25 * MIB, 2.0 * MIB),
    "n_cores": (64.0, 1024.0),
    "users": (2.0, 128.0),
    "micro_batch_size": (1.0, 8.0),
}

# Limits of the gradient search, checked before any work. Each start is one lane of a single
# vmapped program; 1,024 starts x 10,000 steps (10^7 value-and-gradient evaluations) peaked at
# 0.7 GB and ran 46 s after a 19 s compile on 2 CPU cores. The default is 8 x 300.
MAX_STARTS = 1024
MAX_EVALUATIONS = 10_000_000  # steps x starts

OBJECTIVES = ("energy_tok_s_W", "space_tok_s_per_transistor", "system_throughput_tok_s", "throughput_tok_s_card")


def _split(params: dict) -> tuple[dict, dict, dict]:
    dn = {f.name for f in dataclasses.fields(Design)}
    wn = {f.name for f in dataclasses.fields(Workload)}
    bn = {f"bits.{f.name}" for f in dataclasses.fields(Bits)}
    d, w, b = {}, {}, {}
    for k, v in params.items():
        if k in dn:
            d[k] = v
        elif k in wn:
            w[k] = v
        elif k in bn:
            b[k[5:]] = v
        else:
            raise ValueError(f"unknown design parameter {k!r}; choose from Design, Workload or bits.* fields")
    return d, w, b


def apply(params: dict, design: Design, workload: Workload, bits: Bits):
    """(design, workload, bits) with the named fields replaced by `params`' values."""
    d, w, b = _split(params)
    return design.replace(**d), workload.replace(**w), bits.replace(**b)


def model_fn(shape, design: Design | None = None, workload: Workload | None = None,
             bits: Bits | None = None):
    """`f(params: dict) -> metrics dict`: the relaxed model over the named parameters."""
    s = ModelShape.from_decoder(shape)
    d0, w0, b0 = design or Design(), workload or Workload(), bits or Bits()

    def f(params):
        d, w, b = apply({k: jnp.asarray(v, jnp.float32) for k, v in params.items()}, d0, w0, b0)
        return evaluate(d, w, b, s)

    return f


def sensitivities(shape, names=("clock_hz", "n_cores", "sram_per_core_bytes", "vmm_ops_per_cycle_int8", "pcie_bytes_s",
                                "pcie_latency_s", "host_s_per_microbatch", "phase_latency_cycles", "users",
                                "micro_batches", "bits.w", "bits.a"),
                  metrics=("system_throughput_tok_s", "latency_ms", "energy_tok_s_W"), *,
                  design: Design | None = None, workload: Workload | None = None,
                  bits: Bits | None = None) -> dict:
    """Elasticities `d log metric / d log parameter` (by `jax.jacfwd`) at a design point."""
    d0, w0, b0 = design or Design(), workload or Workload(), bits or Bits()
    f = model_fn(shape, d0, w0, b0)
    base = {}
    for n in names:
        obj = b0 if n.startswith("bits.") else (w0 if n in {x.name for x in dataclasses.fields(Workload)} else d0)
        base[n] = float(getattr(obj, n.removeprefix("bits.")))
    logp = {n: jnp.log(jnp.float32(v)) for n, v in base.items()}

    def logm(lp):
        out = f({n: jnp.exp(v) for n, v in lp.items()})
        return {m: jnp.log(out[m]) for m in metrics}

    jac = jax.jit(jax.jacfwd(logm))(logp)
    return {m: {n: float(jac[m][n]) for n in names} for m in metrics}


# --- grid sweep ---------------------------------------------------------------------------------

def _feasible(out, bound_ms):
    return (out["fits_margin_bytes"] >= 0) & (out["latency_ms"] <= bound_ms) & jnp.isfinite(out["latency_ms"])


def pareto_front(latency: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Indices of the points not dominated in (lower latency, higher value), by latency."""
    order = np.lexsort((-value, latency))
    front, best = [], -np.inf
    for i in order:
        if value[i] > best:
            front.append(i)
            best = value[i]
    return np.asarray(front, np.int64)


def sweep(shape, grid: dict[str, list[float]] | None = None, *, latency_bound_ms: float = 1.0,
          objective: str = "energy_tok_s_W", design: Design | None = None,
          workload: Workload | None = None, bits: Bits | None = None) -> dict:
    """Evaluate the Cartesian grid of `grid` (name -> values) in one vmapped, jitted call.

    Returns the per-design parameters and metrics (numpy), the feasibility mask, the best
    feasible design for `objective`, the Pareto front (latency vs objective) and the
    evaluation rate (designs/s, compile time excluded).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    grid = grid or DEFAULT_GRID
    names = list(grid)
    if any(len(v) == 0 for v in grid.values()):
        raise ValueError("every grid axis needs at least one value")
    combos = np.array(list(itertools.product(*[grid[n] for n in names])), np.float32)  # [n_designs, n_params]
    f = model_fn(shape, design, workload, bits)
    run = jax.jit(jax.vmap(lambda row: f({n: row[i] for i, n in enumerate(names)})))
    x = jnp.asarray(combos)
    t0 = time.perf_counter()
    jax.block_until_ready(run(x))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(run(x))
    eval_s = time.perf_counter() - t0
    out = {k: np.asarray(v) for k, v in out.items() if np.ndim(v) == 1}
    feasible = np.array(_feasible(out, latency_bound_ms))
    if "micro_batches" in names and "users" in names:
        m, u = combos[:, names.index("micro_batches")], combos[:, names.index("users")]
        feasible &= m <= u
    params = {n: combos[:, i] for i, n in enumerate(names)}
    res = {"names": names, "params": params, "metrics": out, "feasible": feasible, "n_designs": len(combos),
           "n_feasible": int(feasible.sum()), "compile_s": compile_s, "eval_s": eval_s,
           "designs_per_s": len(combos) / max(eval_s, 1e-9), "objective": objective,
           "latency_bound_ms": latency_bound_ms}
    if feasible.any():
        idx = np.flatnonzero(feasible)
        best = idx[np.argmax(out[objective][idx])]
        front = idx[pareto_front(out["latency_ms"][idx], out[objective][idx])]
        res["best"] = _row(params, out, best)
        res["pareto"] = [_row(params, out, i) for i in front]
    else:
        res["best"], res["pareto"] = None, []
    return res


KEY_METRICS = ("system_throughput_tok_s", "throughput_tok_s_card", "latency_ms", "inter_token_ms", "energy_tok_s_W",
               "space_tok_s_per_1e9_transistors", "power_w_per_card", "transistors", "fits_margin_bytes",
               "prefill_chunk")


def _row(params, out, i) -> dict:
    return {"params": {n: float(v[i]) for n, v in params.items()},
            "metrics": {k: float(out[k][i]) for k in KEY_METRICS if k in out}}


# --- gradient search ----------------------------------------------------------------------------

def _to_params(z, bounds):
    """Unconstrained z -> parameters inside their boxes, log-scaled: lo * (hi / lo) ** sigmoid(z)."""
    return {n: lo * (hi / lo) ** jax.nn.sigmoid(z[i]) for i, (n, (lo, hi)) in enumerate(bounds.items())}


def _model_params(p: dict) -> dict:
    """Search parameters -> model parameters (micro-batch size -> micro-batch count)."""
    p = dict(p)
    if "micro_batch_size" in p:
        p["micro_batches"] = p.get("users", Workload().users) / p.pop("micro_batch_size")
    return p


def gradient_search(shape, *, bounds: dict[str, tuple[float, float]] | None = None, objective: str = "energy_tok_s_W",
                    latency_bound_ms: float = 1.0, steps: int = 300, starts: int = 8, learning_rate: float = 0.05,
                    penalty: float = 20.0, seed: int = 0, design: Design | None = None,
                    workload: Workload | None = None, bits: Bits | None = None) -> dict:
    """Maximise `objective` subject to fitting in core memory and `latency <= latency_bound_ms`.

    Loss (per start): -log(objective) + penalty * [softplus(k * (-margin / core bytes)) +
    softplus(k * (latency / bound - 1))] / k with k = 50. `starts` random starting points run
    at once (vmap over optax Adam, `lax.scan` over steps). The best feasible result is then
    snapped (users to an integer, micro-batches to a divisor of it, the core grid to a square,
    cards to an integer) and re-evaluated.
    """
    bounds = check_search(objective=objective, latency_bound_ms=latency_bound_ms, steps=steps, starts=starts,
                          seed=seed, bounds=bounds)
    d0, w0, b0 = design or Design(), workload or Workload(), bits or Bits()
    f = model_fn(shape, d0, w0, b0)
    k = 50.0
    sram_ref = float(d0.sram_per_core_bytes)

    def metrics(z):
        return f(_model_params(_to_params(z, bounds)))

    def loss(z):
        out = metrics(z)
        sram = _to_params(z, bounds).get("sram_per_core_bytes", sram_ref)
        fit = jax.nn.softplus(-k * out["fits_margin_bytes"] / sram) / k
        lat = jax.nn.softplus(k * (out["latency_ms"] / latency_bound_ms - 1.0)) / k
        return -jnp.log(out[objective]) + penalty * (fit + lat)

    opt = optax.adam(learning_rate)

    def run_one(z0):
        def step(carry, _):
            z, s = carry
            val, g = jax.value_and_grad(loss)(z)
            upd, s = opt.update(g, s, z)
            return (optax.apply_updates(z, upd), s), val

        (z, _), hist = jax.lax.scan(step, (z0, opt.init(z0)), None, length=steps)
        return z, hist

    z0 = jax.random.normal(jax.random.key(seed), (starts, len(bounds))) * 1.5
    t0 = time.perf_counter()
    run = jax.jit(jax.vmap(run_one)).lower(z0).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    z, hist = jax.block_until_ready(run(z0))
    wall = time.perf_counter() - t0
    # jitted: run op by op, the vmapped model dispatches (and compiles) a few hundred small programs
    final = jax.jit(jax.vmap(metrics))(z)
    final = {k2: np.asarray(v) for k2, v in final.items() if np.ndim(v) == 1}
    params = jax.jit(jax.vmap(lambda zz: _to_params(zz, bounds)))(z)
    params = {n: np.asarray(v) for n, v in params.items()}
    feas = np.asarray(_feasible(final, latency_bound_ms))
    pick = np.flatnonzero(feas) if feas.any() else np.arange(starts)
    best = int(pick[np.argmax(final[objective][pick])])
    cont = _model_params({n: float(v[best]) for n, v in params.items()})
    snapped, snapped_out, snapped_ok = snap(cont, f, objective=objective, latency_bound_ms=latency_bound_ms)
    return {
        "objective": objective, "latency_bound_ms": latency_bound_ms, "bounds": bounds, "steps": steps,
        "starts": starts, "compile_s": compile_s, "wall_s": wall,
        "evaluations_per_s": steps * starts / max(wall, 1e-9),  # value-and-gradient evaluations
        "continuous": {"params": cont, "feasible": bool(feas[best]),
                       "metrics": {m: float(final[m][best]) for m in KEY_METRICS if m in final}},
        "snapped": {"params": snapped, "feasible": snapped_ok,
                    "metrics": {m: snapped_out[m] for m in KEY_METRICS if m in snapped_out}},
        "loss_history": np.asarray(hist[best]).tolist(),
        "starts_feasible": int(feas.sum()),
    }


def check_search(*, objective: str, latency_bound_ms: float, steps: int = 1, starts: int = 1, seed: int = 0,
                 bounds: dict[str, tuple[float, float]] | None = None) -> dict[str, tuple[float, float]]:
    """Validate the gradient search's settings before any work (starts <= MAX_STARTS, steps x starts
    <= MAX_EVALUATIONS, a 64-bit seed); returns the bounds to use."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if steps < 1 or starts < 1:
        raise ValueError(f"steps and starts must be >= 1, got {steps} and {starts}")
    if starts > MAX_STARTS:
        raise ValueError(f"starts {starts:,} is above the limit of {MAX_STARTS:,} (each start is a lane of one "
                         "vmapped program, held in memory at once)")
    if steps * starts > MAX_EVALUATIONS:
        raise ValueError(f"steps x starts = {steps:,} x {starts:,} is above the limit of {MAX_EVALUATIONS:,} "
                         "value-and-gradient evaluations (about a minute of search on 2 CPU cores)")
    if not -2**63 <= seed < 2**63:
        raise ValueError(f"the seed must be a 64-bit integer, got {seed}")
    if not (math.isfinite(latency_bound_ms) and latency_bound_ms > 0):
        raise ValueError(f"the latency bound must be positive, got {latency_bound_ms}")
    bounds = dict(bounds or DEFAULT_BOUNDS)
    for n, (lo, hi) in bounds.items():
        if not (0 < lo < hi):
            raise ValueError(f"bounds of {n!r} must satisfy 0 < lo < hi, got ({lo}, {hi})")
    return bounds


def _neighbours(p: dict) -> list[dict]:
    """Integer designs around a continuous one: users floor/ceil, micro-batches the divisors of
    the users within a factor 2, a square core grid either side, cards floor/ceil."""
    p = {k: float(v) for k, v in p.items()}
    users = sorted({max(1, math.floor(p["users"])), max(1, math.ceil(p["users"]))}) if "users" in p else [None]
    sides = sorted({max(1, math.floor(math.sqrt(p["n_cores"]))), max(1, math.ceil(math.sqrt(p["n_cores"])))}) \
        if "n_cores" in p else [None]
    cards = sorted({max(2, math.floor(p["cards"])), max(2, math.ceil(p["cards"]))}) if "cards" in p else [None]
    out = []
    for u, side, c in itertools.product(users, sides, cards):
        q = dict(p)
        if u is not None:
            q["users"] = float(u)
        if side is not None:
            q["n_cores"] = float(side * side)
        if c is not None:
            q["cards"] = float(c)
        if "micro_batches" in p:
            uu = int(q.get("users", Workload().users))
            m0 = max(p["micro_batches"], 1.0)
            divs = [m for m in range(1, uu + 1) if uu % m == 0 and m0 / 2 <= m <= 2 * m0] or [1]
            for m in divs:
                out.append(q | {"micro_batches": float(m)})
        else:
            out.append(q)
    return out


def snap(p: dict, f=None, *, objective: str = "energy_tok_s_W", latency_bound_ms: float = 1.0):
    """Round the parameters that are integers in hardware (users, micro-batches dividing them, a
    square core grid, cards) to the best feasible neighbour of `p` under model `f`.

    Returns (params, metrics, feasible). Without `f`, the nearest neighbour (no evaluation).
    """
    cands = _neighbours(p)
    if f is None:
        return cands[0], {}, False
    names = list(cands[0])
    x = jnp.asarray([[c[n] for n in names] for c in cands], jnp.float32)
    outs = jax.jit(jax.vmap(lambda row: f({n: row[i] for i, n in enumerate(names)})))(x)
    outs = {k: np.asarray(v) for k, v in outs.items() if np.ndim(v) == 1}
    feas = np.asarray(_feasible(outs, latency_bound_ms))
    pool = np.flatnonzero(feas) if feas.any() else np.arange(len(cands))
    i = int(pool[np.argmax(outs[objective][pool])])
    return cands[i], {k: float(v[i]) for k, v in outs.items()}, bool(feas[i])
