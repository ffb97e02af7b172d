"""The width search: per-layer precisions chosen from measured layer sensitivities and the
appliance's cost model, with the Pareto front of quality against predicted throughput.

Each layer takes one of a few options, each a preset applied to the whole layer (`--options`, by
default w4a4-pdd, a8c8w4-pdd, w8a8-pdd: the cost model charges a layer by its widest weight, its widest
linear input and its KV cache, so options finer than a layer's class change its cost little). The
output layer and the online rotations keep the widest option's widths.

1. **The table.** For every (layer, option), the loss change of that one layer at that option,
   every other layer at the widest option, measured (not estimated) on held-out windows apart
   from those that verify. No model is prepared per entry: a recipe prepares each layer's weights
   from that layer's calibration inputs alone (GPTQ's Hessians come from the float forward), so
   the options are prepared once each, with the transforms the mixed models share, and spliced
   (`splice`; a layer's activation steps are calibrated behind the earlier layers' quantized
   weights, which the splice takes from the uniform model: the verification measures the
   difference). The forward runs layer by layer at each layer's option, each option's layer
   compiled once (`LayerwiseModel`), from the widest model's cached activations: an entry costs
   the layers after it. Every option has the recipe's online q/k rotation (on whenever the KV
   cache is quantized, `tables_needed`), so one table holds every candidate.
2. **The candidates.** Assuming the changes add (checked below), the assignment with the least
   total change for each count of layers per option comes from one dynamic program over the layers
   (`count_optimal`): exact, for every count vector at once.
3. **The cost.** Every candidate's policy goes through the appliance's planner and cost model
   (`np_jax.cost.predict`: the mapping with the best throughput, each card charged its own layers'
   widths): predicted tokens/s, tokens/s/W and whether it fits. A candidate's throughput depends
   only on its counts when a card holds every layer or one layer; otherwise it also depends on
   which layers share a card, and the candidates are the best placements for quality, not for
   throughput.
4. **The front.** The candidates not beaten on both predicted loss and predicted throughput;
   the constraint picks one of them; `verify` prepares the chosen points for real (the recipe on
   the mixed policy, as `np-jax run` would) and evaluates them on the held-out split, which shows
   how far additivity and the splice hold.

An integer program over the same table would give the same answer on counts: the dynamic program is
exact and needs no solver. The DSE's gradients (np_jax.cost.dse) would relax widths to reals and
round; with three options per layer and exact enumeration this cheap, nothing is gained.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models import recipe as recipes
from models.config import ModelConfig
from models.evaluate.perplexity import token_nll
from np_jax.quant import POLICIES, TRANSFORM_RULES, PrecisionPolicy

DEFAULT_OPTIONS = ("w4a4-pdd", "a8c8w4-pdd", "w8a8-pdd")
Log = Callable[[str], None]


# --- policies of assignments -------------------------------------------------------------------------

def check_options(options: Sequence[str]) -> tuple[str, ...]:
    """The options, checked: at least two distinct integer presets; the last is the widest (the base)."""
    options = tuple(dict.fromkeys(options))
    if len(options) < 2:
        raise ValueError(f"the search needs at least two options, got {', '.join(options) or 'none'}")
    for o in options:
        if o not in POLICIES or POLICIES[o].is_float:
            raise ValueError(f"option {o!r} is not an integer preset; choose among "
                             f"{', '.join(p for p in POLICIES if not POLICIES[p].is_float)}")
    return options


def policy_json(options: Sequence[str], assignment: Sequence[int], name: str, description: str = "") -> dict:
    """The policy file of an assignment (layer i at `options[assignment[i]]`): the widest option
    (the last) as the base, one rule per layer that differs from it."""
    base = options[-1]
    rules = [[f"layers.{i}.*", options[a]] for i, a in enumerate(assignment) if options[a] != base]
    return {"name": name, "description": description, "base": base, "rules": rules}


def assignment_policy(options: Sequence[str], assignment: Sequence[int], name: str = "search") -> PrecisionPolicy:
    """The policy `policy_json` describes, built as `np_jax.quant.load_policy` builds it from the file."""
    base = POLICIES[options[-1]]
    rules = tuple((f"layers.{i}.*", POLICIES[options[a]]) for i, a in enumerate(assignment) if a != len(options) - 1)
    return PrecisionPolicy(name, TRANSFORM_RULES + rules + base.rules)


def describe(options: Sequence[str], assignment: Sequence[int]) -> str:
    """e.g. "w8a8 x 27, w4a4 x 3 (layers 0, 5, 29)": each option's count, the minority options' layers."""
    counts = np.bincount(np.asarray(assignment, int), minlength=len(options))
    parts = []
    for k in np.argsort(-counts, kind="stable"):
        if counts[k]:
            layers = [i for i, a in enumerate(assignment) if a == k]
            where = f" (layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))})" \
                if counts[k] <= len(assignment) // 2 else ""
            parts.append(f"{options[k]} x {counts[k]}{where}")
    return ", ".join(parts)


# --- the spliced models --------------------------------------------------------------------------------

def splice(params_by_option: Sequence[llama.Params], assignment: Sequence[int]) -> llama.Params:
    """The training-form parameters of a mixed model: layer i from `params_by_option[assignment[i]]`'s
    stack; everything outside the layers (embedding, output layer) from the last option's."""
    idx = jnp.asarray(np.asarray(assignment, np.int32))

    def pick(*leaves):
        stacked = jnp.stack(leaves)  # [options, layers, ...]
        return stacked[idx, jnp.arange(len(assignment))]
    layers = jax.tree.map(pick, *[p["layers"] for p in params_by_option])
    return {**params_by_option[-1], "layers": layers}


class LayerwiseModel:
    """The forward of any assignment, layer by layer, each option's layer compiled once; and the
    loss change of every (layer, option) from one pass over the base model's activations.

    `params_by_option`: each option's prepared model (training form, one config `cfg`)."""

    def __init__(self, cfg: ModelConfig, options: Sequence[str], params_by_option: Sequence[llama.Params]):
        self.cfg, self.options = cfg, tuple(options)
        self.params = list(params_by_option)
        self.precs = [llama.resolve(o, cfg) for o in self.options]
        self.layers = [llama.unstack_layers(p["layers"]) for p in self.params]
        self._layer = [jax.jit(functools.partial(_layer_fn, cfg=cfg, prec=p)) for p in self.precs]
        top = self.precs[-1]
        self._embed = jax.jit(lambda params, toks: llama.embed(params, toks, top))
        self._nll = jax.jit(lambda params, x, targets: token_nll(llama.head(params, x, cfg, top), targets).sum(-1))

    def nll(self, assignment: Sequence[int], windows_NxL1: np.ndarray, batch_size: int = 4) -> float:
        """Mean next-token NLL of the assignment's model over the windows."""
        total, n_tok = 0.0, 0
        for chunk in _chunks(windows_NxL1, batch_size):
            x = self._embed(self.params[-1], chunk[:, :-1])
            pos = _positions(chunk)
            for i, a in enumerate(assignment):
                x = self._layer[a](self.layers[a][i], x, pos)
            total += float(np.asarray(self._nll(self.params[-1], x, chunk[:, 1:]), np.float64).sum())
            n_tok += chunk.shape[0] * (chunk.shape[1] - 1)
        return total / n_tok

    def table(self, windows_NxL1: np.ndarray, batch_size: int = 4, progress: Callable[[int], None] | None = None
              ) -> tuple[float, np.ndarray]:
        """(the base model's mean NLL, [layers, options] mean NLL change of each layer alone at each
        option, the others at the last option: zero in the last column)."""
        L, top = self.cfg.n_layers, len(self.options) - 1
        total = np.zeros((L, len(self.options)))
        base, n_tok = 0.0, 0
        for chunk in _chunks(windows_NxL1, batch_size):
            pos = _positions(chunk)
            xs = [self._embed(self.params[-1], chunk[:, :-1])]
            for i in range(L):  # the base model's activations entering each layer
                xs.append(self._layer[top](self.layers[top][i], xs[-1], pos))
            targets = chunk[:, 1:]
            b = float(np.asarray(self._nll(self.params[-1], xs[-1], targets), np.float64).sum())
            base += b
            n_tok += targets.size
            for i in range(L):
                for a in range(top):
                    x = self._layer[a](self.layers[a][i], xs[i], pos)
                    for j in range(i + 1, L):
                        x = self._layer[top](self.layers[top][j], x, pos)
                    total[i, a] += float(np.asarray(self._nll(self.params[-1], x, targets), np.float64).sum()) - b
                    if progress:
                        progress(1)
        return base / n_tok, total / n_tok


def _layer_fn(lp, x, pos, *, cfg, prec):
    return llama.layer(lp, x, pos, None, cfg, prec)[0].astype(x.dtype)


def _positions(chunk: jax.Array) -> jax.Array:
    B, L1 = chunk.shape
    return jnp.broadcast_to(jnp.arange(L1 - 1), (B, L1 - 1))


def _chunks(windows: np.ndarray, b: int):
    windows = np.asarray(windows, np.int32)
    for i in range(0, len(windows), b):
        yield jnp.asarray(windows[i: i + b])


# --- the search ------------------------------------------------------------------------------------------

def count_optimal(delta_LxO: np.ndarray) -> dict[tuple[int, ...], tuple[float, tuple[int, ...]]]:
    """For every count vector (layers per option, summing to the layer count), the assignment with the
    least summed change: {counts: (sum, assignment)}, one dynamic program over the layers (exact)."""
    delta = np.asarray(delta_LxO, float)
    L, O = delta.shape
    best: dict[tuple[int, ...], tuple[float, tuple[int, ...]]] = {(0,) * O: (0.0, ())}
    for i in range(L):
        nxt: dict = {}
        for counts, (cost, assign) in best.items():
            for a in range(O):
                c = counts[:a] + (counts[a] + 1,) + counts[a + 1:]
                v = cost + delta[i, a]
                if c not in nxt or v < nxt[c][0]:
                    nxt[c] = (v, assign + (a,))
        best = nxt
    return best


def pareto(loss: Sequence[float], throughput: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both (lower loss, higher throughput), by loss."""
    order = sorted(range(len(loss)), key=lambda k: (loss[k], -throughput[k]))
    front, best_t = [], -math.inf
    for k in order:
        if throughput[k] > best_t:
            front.append(k)
            best_t = throughput[k]
    return front


def cost_of(shape, policy: PrecisionPolicy, *, users: int, context: int, cards: int,
            qk_rotation: bool | None = None) -> dict:
    """The appliance's predicted figures for `policy` (the planner's best mapping), with the recipe's
    online rotations (`qk_rotation` overrides the q/k one's rule, as a recipe that fixes it does)."""
    from np_jax.cli import shape_with_rotations
    from np_jax.cost import predict

    s = shape_with_rotations(shape, policy, "recipe")
    if qk_rotation is not None:
        s = dataclasses.replace(s, qk_rotation=qk_rotation)
    r = predict(s, policy, users=users, context=context, cards=cards)
    return {k: r[k] for k in ("system_throughput_tok_s", "energy_tok_s_W", "latency_ms", "fits", "mapping")}


def choose(points: list[dict], *, max_ratio: float | None = None, min_throughput: float | None = None) -> dict | None:
    """The point the constraint picks among `points` (each with predicted `ratio` and `throughput`):
    the fastest within `max_ratio`, or the best quality at `min_throughput` or more; None if none."""
    ok = [p for p in points if p["fits"]]
    if max_ratio is not None:
        ok = [p for p in ok if p["ratio"] <= max_ratio]
        return max(ok, key=lambda p: (p["throughput"], -p["ratio"]), default=None)
    ok = [p for p in ok if p["throughput"] >= min_throughput]
    return min(ok, key=lambda p: (p["ratio"], -p["throughput"]), default=None)


@dataclasses.dataclass(frozen=True)
class Table:
    """A measured table: `delta` [layers, len(options)] for the search's options `options` (indices,
    the last the base), from models prepared with the q/k rotation on or off (`qk_rotation`)."""

    options: tuple[int, ...]
    delta: np.ndarray
    base_nll: float
    qk_rotation: bool


def tables_needed(recipe, options: Sequence[str], n_layers: int) -> list[tuple[bool, tuple[int, ...]]]:
    """(q/k rotation, option indices) of each table the search measures: one, every option prepared
    with the transforms the mixed models share. The recipe rotates q and k whenever a KV cache is
    quantized (`wants_qk_rotation`), so every option has the rotation unless the recipe fixes it off."""
    r = recipes.get_recipe(recipe)
    return [(any(r.qk_rotation_for(o, n_layers) for o in options), tuple(range(len(options))))]


def _picked(tables: Sequence[Table]) -> list[tuple[Table, float, tuple[int, ...]]]:
    """(table, summed change, assignment in the search's option indices) of every count vector's
    quality-optimal candidate in each table."""
    return [(t, d, tuple(t.options[a] for a in assign))
            for t in tables for counts, (d, assign) in sorted(count_optimal(t.delta).items())]


def search(tables: Sequence[Table], options: Sequence[str], *, float_nll: float, shape, users: int, context: int,
           cards: int, progress: Callable[[int], None] | None = None) -> list[dict]:
    """Every count vector's quality-optimal candidate in each table, with its
    predicted ratio to float (changes added) and its predicted appliance figures."""
    out = []
    for t, d, full in _picked(tables):
        pol = assignment_policy(options, full)
        c = cost_of(shape, pol, users=users, context=context, cards=cards, qk_rotation=t.qk_rotation)
        counts = np.bincount(np.asarray(full, int), minlength=len(options))
        out.append({"counts": dict(zip(options, (int(v) for v in counts))), "assignment": [options[a] for a in full],
                    "describe": describe(options, full), "qk_rotation": t.qk_rotation, "delta_nll": d,
                    "ratio": math.exp(t.base_nll + d - float_nll), "throughput": c["system_throughput_tok_s"],
                    "energy_tok_s_W": c["energy_tok_s_W"], "latency_ms": c["latency_ms"], "fits": c["fits"],
                    "mapping": c["mapping"]})
        if progress:
            progress(1)
    return out


def n_candidates(tables: Sequence[Table]) -> int:
    return len(_picked(tables))


def front_figure(result: dict):
    """Predicted ratio to float against predicted tokens/s: every candidate, the front, the uniform
    options, the chosen point; a second panel zoomed on the front with the verified points (their
    prediction joined to their measurement)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    cands = result["candidates"]
    fr = [cands[k] for k in result["front"]]
    fig = Figure(figsize=(15.0, 6.5), dpi=100)
    axes = fig.subplots(1, 2)
    for n, ax in enumerate(axes):
        ax.scatter([c["throughput"] for c in cands], [c["ratio"] for c in cands], s=9, color="0.7",
                   label=f"candidates ({len(cands)}: the best layers for each count per option)")
        ax.plot([c["throughput"] for c in fr], [c["ratio"] for c in fr], "o-", color="tab:blue", ms=4,
                label="Pareto front (predicted)")
        for o in result["options"]:
            u = next(c for c in cands if c["counts"][o] == len(c["assignment"]))
            ax.scatter([u["throughput"]], [u["ratio"]], marker="s", s=50, color="tab:orange", zorder=3,
                       label="uniform options (predicted)" if o == result["options"][0] else None)
            ax.annotate(f"uniform {o}", (u["throughput"], u["ratio"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=9)
        ch = result.get("chosen")
        if ch:
            ax.scatter([ch["throughput"]], [ch["ratio"]], marker="*", s=200, color="tab:green", zorder=5,
                       label=f"chosen by the prediction ({result['constraint']})")
        ax.grid(True, alpha=0.3)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.set_xlabel("predicted throughput (tokens/s)")
        ax.set_ylabel("perplexity / float")
    ax0, ax1 = axes
    ax0.set_title(f"all candidates ({result['users']} users, {result['cards']} cards, context {result['context']})")
    ax0.legend(loc="center", fontsize=8)
    ax0.annotate("better", xy=(0.97, 0.05), xytext=(0.78, 0.2), xycoords="axes fraction",
                 arrowprops=dict(arrowstyle="->", color="0.3"), color="0.3", fontsize=10)
    ver = result.get("verified", [])
    pts = fr + [{"throughput": v["throughput"], "ratio": v["measured"]["vs_float"]} for v in ver]
    if pts:
        xs, ys = [p["throughput"] for p in pts], [p["ratio"] for p in pts] + [v["ratio"] for v in ver]
        dx = max(max(xs) - min(xs), 1.0) * 0.15
        ax1.set_xlim(min(xs) - dx, max(xs) + 4 * dx)
        dy = max(max(ys) - min(ys), 0.01) * 0.1
        ax1.set_ylim(min(ys) - dy, max(ys) + 4 * dy)  # room for the legend above the points
    lines = []
    for j, v in enumerate(ver, 1):
        m = v["measured"]["vs_float"]
        ax1.plot([v["throughput"]] * 2, [v["ratio"], m], ":", color="tab:red", lw=1)
        ax1.scatter([v["throughput"]], [m], marker="x", s=60, color="tab:red", zorder=4,
                    label="measured held out (dotted: from its prediction)" if j == 1 else None)
        ax1.annotate(str(j), (v["throughput"], m), textcoords="offset points", xytext=(5, -3), fontsize=9,
                     color="tab:red")
        lines.append(f"{j}: {v['describe'][:44]}{'...' if len(v['describe']) > 44 else ''}\n"
                     f"    predicted {v['ratio']:.3f}x, measured {m:.3f}x")
    if lines:
        ax1.text(0.99, 0.02, "\n".join(lines), transform=ax1.transAxes, ha="right", va="bottom", fontsize=7.5,
                 family="monospace", bbox=dict(boxstyle="round", facecolor="white", alpha=0.85))
    ax1.set_title("zoom on the front, with the verified points")
    ax1.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"{result['model']}: per-layer widths ({', '.join(result['options'])}), recipe {result['recipe']}")
    fig.tight_layout()
    return fig


def spread(front: list[int], n: int) -> list[int]:
    """Up to `n` of the front's points, evenly spaced along it (its two ends included)."""
    if n >= len(front):
        return list(front)
    return [front[k] for k in sorted(set(np.round(np.linspace(0, len(front) - 1, n)).astype(int)))]


def write_policy(path: Path, options: Sequence[str], assignment: Sequence[str], name: str, description: str) -> Path:
    idx = [list(options).index(o) for o in assignment]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(policy_json(options, idx, name, description), indent=1) + "\n")
    return path
