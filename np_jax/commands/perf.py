"""`np-jax perf`, `np-jax dse`, `np-jax plan`: the performance, design-space and scale-out commands.

Registered into the `np-jax` CLI through the `np_jax.commands` entry point. The model is
np_jax.cost / np_jax.cost.dse; this module resolves named model configs (models.config) and prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from np_jax.cli import (PRECISIONS, Formatter, add_mapping_arguments, add_rotation_argument, count, get_shape,
                        model_shapes, positive, precision_type, shape_with_rotations)
from np_jax.commands.map import mapping_from_args
from np_jax.spec import GPU_POINTS, PUBLISHED_RUN, RACK



def _choices(names) -> str:
    return "one of " + ", ".join(names)


def register(sub) -> None:
    models = _choices(model_shapes())
    precisions = _choices(PRECISIONS)
    p = sub.add_parser(
        "perf", help="predict the appliance's throughput, latency, energy and space metrics (HPEC24 Table I)",
        description="Predict what the real NorthPole appliance delivers for a model, mapping and run, and compare "
                    "it with HPEC24's GPU points P1-P4. Defaults are the published run (granite-3b-northpole, "
                    "w4a4, 28 users, 1024 prompt + 1024 generated tokens, 16 cards); the mapping is the one with "
                    "the best predicted throughput (for the published run: HPEC24's, 14 micro-batches).",
        formatter_class=Formatter)
    p.add_argument("--model", default=PUBLISHED_RUN.model, help=f"named model config: {models}")
    add_mapping_arguments(p, users=PUBLISHED_RUN.users)
    add_rotation_argument(p)
    p.add_argument("--prompt-tokens", type=int, default=PUBLISHED_RUN.prompt_tokens, help="prompt tokens per user")
    p.add_argument("--gen-tokens", type=int, default=PUBLISHED_RUN.generated_tokens, help="generated tokens per user")
    p.add_argument("--context", type=count, default=None, help="KV-cache positions per user (default: prompt + generated)")
    p.add_argument("--precision", default="w4a4", type=precision_type(PRECISIONS),
                   help=f"precision policy: {precisions}, or a policy file (.json)")
    p.add_argument("--prefill-chunk", type=count, default=None,
                   help="prompt tokens per user per pipeline pass (default: as many as the free core memory allows)")
    p.add_argument("--allow-overflow", action="store_true",
                   help="report the figures of a mapping that does not fit (as if it did) with exit status 0")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="write Fig. 1/2-style PNGs (energy and throughput vs latency) into DIR (default: no plots)")
    p.add_argument("--params", action="store_true", help="also list every model parameter with its source")
    p.set_defaults(func=perf_command)

    d = sub.add_parser(
        "dse", help="differentiable design-space exploration: vmapped grid sweep and optax gradient search",
        description="Sweep a grid of designs (clock, core SRAM, cores, users, micro-batches) in one vmapped call, "
                    "then run a multi-start gradient search (optax Adam) that maximises an objective subject to "
                    "fitting in core memory and a latency bound. Also prints elasticities d log(metric) / "
                    "d log(parameter) at the published design.",
        formatter_class=Formatter)
    d.add_argument("--model", default=PUBLISHED_RUN.model, help=f"named model config: {models}")
    d.add_argument("--precision", default="w4a4", type=precision_type(PRECISIONS),
                   help=f"precision policy: {precisions}, or a policy file (.json)")
    d.add_argument("--objective", default="energy", choices=["energy", "space", "throughput", "throughput-card"],
                   help="metric to maximise")
    d.add_argument("--latency-bound-ms", type=float, default=1.0, help="latency bound (ms/token)")
    d.add_argument("--steps", type=count, default=300,
                   help="gradient steps per start (steps x starts is capped: np_jax.cost.dse.MAX_EVALUATIONS)")
    d.add_argument("--starts", type=count, default=8,
                   help="random starting points, run at once with vmap (capped: np_jax.cost.dse.MAX_STARTS)")
    d.add_argument("--grid", default="default", choices=["default", "small"], help="grid size (small: for a quick look)")
    d.add_argument("--seed", type=int, default=0, help="seed of the starting points (default: 0)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw the designs and the Pareto front (.png is added when missing; default: no plot)")
    d.set_defaults(func=dse_command)

    q = sub.add_parser(
        "plan", help="scale-out planner: cards per instance, instances per rack, latency and throughput",
        description="Plan instances of a model on the scaled-out NorthPole rack (spec sec. 8: 288 cards, 16 per "
                    "server, 200 Gb Ethernet between servers, A8-C8-W4): the fewest cards one instance needs "
                    "(layers split over several cards where one card cannot hold a layer), how many instances "
                    "fit, and what each delivers.",
        formatter_class=Formatter)
    q.add_argument("--model", default=RACK.model, help=f"named model config: {models}")
    q.add_argument("--cards", type=count, default=RACK.cards, help=f"cards in the rack (at most {RACK.cards})")
    q.add_argument("--cards-per-server", type=count, default=RACK.cards_per_server,
                   help="cards per server (at most --cards)")
    q.add_argument("--precision", default=RACK.precision, type=precision_type(PRECISIONS),
                   help=f"precision policy: {precisions}, or a policy file (.json)")
    q.add_argument("--users", type=count, default=RACK.users, help="users per instance")
    q.add_argument("--context", type=count, default=RACK.context, help="context positions per user")
    q.add_argument("--micro-batches", type=count, default=None, help="micro-batches (default: the best divisor of the users)")
    q.add_argument("--prompt-tokens", type=count, default=None, help="prompt tokens (default: half the context)")
    q.add_argument("--gen-tokens", type=count, default=None, help="generated tokens (default: the rest of the context)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=plan_command)


# --- perf ---------------------------------------------------------------------------------------

def _predict(args, shape, users=None):
    from np_jax import cost

    positive("prompt-tokens", args.prompt_tokens)
    positive("gen-tokens", args.gen_tokens)
    context = args.context or args.prompt_tokens + args.gen_tokens
    a = args if users is None else argparse.Namespace(**{**vars(args), "users": users, "micro_batches": None})
    m = mapping_from_args(shape, args.precision, a, context=context, prompt_tokens=args.prompt_tokens,
                          gen_tokens=args.gen_tokens)
    return cost.predict(shape, args.precision, users=a.users, prompt_tokens=args.prompt_tokens,
                        gen_tokens=args.gen_tokens, context=context, prefill_chunk=args.prefill_chunk, mapping=m)


def _check_writable(folder: Path) -> None:
    """Refuse an unwritable plot destination before any work: create the folder (as the plot
    would) and write a temporary file in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except (FileExistsError, NotADirectoryError):
        raise OSError(f"cannot write the plot into {folder}: a file stands where a folder is needed") from None
    except OSError as e:
        raise OSError(f"cannot write the plot into {folder}: {e.strerror or e}") from None


def _fmt(v, spec=".3g"):
    return "-" if v is None else format(v, spec)


def perf_command(args) -> int:
    from np_jax import cost

    shape = shape_with_rotations(get_shape(args.model), args.precision, args.rotations)
    if args.plot:
        _check_writable(Path(args.plot))
    pred = _predict(args, shape)
    table = cost.gpu_table(pred)
    published = (args.model, args.precision, args.users, pred["micro_batches"], args.prompt_tokens, args.gen_tokens,
                 pred["cards"]) == (PUBLISHED_RUN.model, "w4a4", PUBLISHED_RUN.users, PUBLISHED_RUN.micro_batches,
                                    PUBLISHED_RUN.prompt_tokens, PUBLISHED_RUN.generated_tokens, 16)
    resid = cost.published_comparison(pred) if published else None
    plots = []
    if args.plot:
        from np_jax.plots import plot_figures

        curve = [_predict(args, shape, users=u) for u in (2, 4, 8, 14, 28) if u != args.users]
        plots = plot_figures(pred, args.plot, curve=[c for c in curve if c["fits"]] + [pred])
    if args.json:
        out = pred | {"table": table, "published_residuals": resid, "plots": plots,
                      "calibrated": {"phase_latency_cycles": cost.Design().phase_latency_cycles,
                                     "against": "HPEC24 Table I: 28,356 tokens/s"}}
        if args.params:
            out["parameters"] = cost.parameters()
        print(json.dumps(out, indent=2, default=str))
        return _overflow_status(pred, args)
    print(f"NorthPole appliance (predicted): {pred['model']}, {pred['precision']}, {pred['users']} users = "
          f"{pred['micro_batches']} micro-batches of {pred['micro_batch_size']}, {pred['prompt_tokens']} prompt + "
          f"{pred['gen_tokens']} generated tokens, {pred['cards']} cards")
    print(f"mapping: {pred['mapping']}")
    if not pred["fits"]:
        print(f"WARNING: the mapping does not fit in core memory ({pred['error']}); the figures assume it did")
    bound = "throughput-bound (M x slowest card)" if pred["decode_throughput_bound"] else \
        "round-trip-bound (one micro-batch's trip through all cards and the host)"
    print(f"prompt {pred['prompt_time_s'] * 1e3:.1f} ms ({pred['prefill_passes']:.0f} pass(es) of {pred['prefill_chunk']:.0f} "
          f"prompt tokens per user) + generation {pred['token_gen_time_s'] * 1e3:.1f} ms; decode step {pred['inter_token_ms']:.3f} ms, "
          f"{bound}")
    print(f"per layer and micro-batch: {pred['layer_ms_decode'] * 1e3:.1f} us decode "
          f"({pred['layer_work_cycles_decode']:.0f} work + {pred['layer_latency_cycles']:.0f} phase-latency cycles; "
          f"VMM utilisation {pred['vmm_utilisation_decode'] * 100:.1f} %)")
    print()
    cols = ["NorthPole pred", "NorthPole HPEC24"] + [f"{p.name} {p.gpu}" for p in GPU_POINTS.values()]
    r = PUBLISHED_RUN
    rows = [
        ("process (nm)", [12, 12] + [p.node_nm for p in GPU_POINTS.values()], "d"),
        ("throughput/card (tok/s)", [pred["throughput_tok_s_card"], r.system_throughput_tok_s / 16]
         + [t["throughput_tok_s_card"] for t in table], ".1f"),
        ("latency (ms/token)", [pred["latency_ms"], r.latency_ms] + [t["latency_ms"] for t in table], ".3f"),
        ("energy (tok/s/W)", [pred["energy_tok_s_W"], r.energy_tok_s_w] + [t["energy_tok_s_W"] for t in table], ".3f"),
        ("space (tok/s/1e9 transistors)", [pred["space_tok_s_per_1e9_transistors"], r.space_tok_s_per_1e9_transistors]
         + [t["space_tok_s_per_1e9_transistors"] for t in table], ".2f"),
    ]
    w0 = 31
    print("Table I".ljust(w0) + "".join(c.rjust(17) for c in cols))
    for name, vals, spec in rows:
        print(name.ljust(w0) + "".join(_fmt(v, spec).rjust(17) for v in vals))
    print()
    print("NorthPole (predicted) / GPU, with HPEC24's stated ratio in brackets (latency: GPU / NorthPole)")
    print("ratio".ljust(w0) + "".join(f"{t['point']} {t['gpu']}".rjust(17) for t in table))
    for key, label in (("energy", "energy metric"), ("space", "space metric"), ("latency", "latency"),
                       ("throughput", "throughput/card")):
        cells = []
        for t in table:
            v, s = t[f"ratio_{key}"], t["stated_ratios"].get(key)
            cells.append(("-" if v is None else f"{v:.1f}x") + (f" ({s}x)" if s else ""))
        print(label.ljust(w0) + "".join(c.rjust(17) for c in cells))
    if resid:
        print()
        print("residuals against HPEC24's NorthPole row: " + ", ".join(
            f"{k} {v['predicted']:.4g} vs {v['published']:.4g} ({v['residual'] * 100:+.2f} %)" for k, v in resid.items()))
    print(f"calibrated: phase_latency_cycles = {cost.Design().phase_latency_cycles:g} (against HPEC24's 28,356 tok/s); "
          "every other parameter from the papers or an explicit assumption (--params)")
    if args.params:
        print()
        for name, f in cost.parameters().items():
            print(f"  {name:<34} {f['value']!s:<24} {f['source']}" + (f"  ({f['note']})" if f["note"] else ""))
    for path in plots:
        print(f"wrote {path}")
    return _overflow_status(pred, args)


def _overflow_status(pred: dict, args) -> int:
    """Exit status 1 for figures of a mapping that does not fit, unless --allow-overflow."""
    if pred["fits"] or args.allow_overflow:
        return 0
    print(f"np-jax perf: the mapping does not fit ({pred['error']}); the figures assume it did "
          "(pass --allow-overflow to accept them)", file=sys.stderr)
    return 1


# --- dse ----------------------------------------------------------------------------------------

_OBJ = {"energy": "energy_tok_s_W", "space": "space_tok_s_per_transistor", "throughput": "system_throughput_tok_s",
        "throughput-card": "throughput_tok_s_card"}

_UNITS = {"clock_hz": (1e6, "MHz"), "sram_per_core_bytes": (1024, "KiB"), "n_cores": (1, "cores"), "users": (1, "users"),
          "micro_batches": (1, "micro-batches")}


def _design_str(params: dict) -> str:
    return ", ".join(f"{v / _UNITS.get(k, (1, k))[0]:.4g} {_UNITS.get(k, (1, k))[1]}" for k, v in params.items())


def _metrics_str(m: dict) -> str:
    return (f"{m['system_throughput_tok_s']:,.0f} tok/s, {m['throughput_tok_s_card']:,.0f} tok/s/card, "
            f"latency {m['latency_ms']:.3f} ms, energy {m['energy_tok_s_W']:.2f} tok/s/W, space "
            f"{m['space_tok_s_per_1e9_transistors']:.1f} tok/s/1e9 tr., {m['power_w_per_card']:.1f} W/card, "
            f"margin {m['fits_margin_bytes'] / 1024:.0f} KiB/core")


def dse_command(args) -> int:
    import jax.numpy as jnp

    from np_jax import cost
    from np_jax.cost import dse
    from np_jax.plots import plot_pareto

    cfg = get_shape(args.model)
    dse.check_search(objective=_OBJ[args.objective], latency_bound_ms=args.latency_bound_ms, steps=args.steps,
                     starts=args.starts, seed=args.seed)
    if args.plot:
        _check_writable(Path(args.plot).parent)
    bits = cost.Bits.from_policy(args.precision)
    objective = _OBJ[args.objective]
    grid = dse.DEFAULT_GRID if args.grid == "default" else dse.SMALL_GRID
    base = {k: float(v) for k, v in cost.evaluate(cost.Design(), cost.Workload(), bits, cfg).items()
            if jnp.ndim(v) == 0}
    sens = dse.sensitivities(cfg, bits=bits)
    sw = dse.sweep(cfg, grid, latency_bound_ms=args.latency_bound_ms, objective=objective, bits=bits)
    gs = dse.gradient_search(cfg, objective=objective, latency_bound_ms=args.latency_bound_ms, steps=args.steps,
                             starts=args.starts, seed=args.seed, bits=bits)
    if args.plot:
        args.plot = plot_pareto(sw, args.plot, model=f"{cfg.name} {args.precision}", search=gs, baseline=base)
    if args.json:
        out = {"model": cfg.name, "precision": args.precision, "objective": objective,
               "latency_bound_ms": args.latency_bound_ms, "baseline": {k: base[k] for k in dse.KEY_METRICS},
               "sensitivities": sens,
               "sweep": {"grid": grid, "n_designs": sw["n_designs"], "n_feasible": sw["n_feasible"],
                         "compile_s": sw["compile_s"], "eval_s": sw["eval_s"], "designs_per_s": sw["designs_per_s"],
                         "best": sw["best"], "pareto": sw["pareto"]},
               "gradient_search": {k: v for k, v in gs.items() if k != "loss_history"}
               | {"loss_first_last": [gs["loss_history"][0], gs["loss_history"][-1]]},
               "plot": args.plot}
        print(json.dumps(out, indent=2))
        return 0
    print(f"design-space exploration: {cfg.name}, {args.precision}; maximise {objective} subject to fitting in core "
          f"memory and latency <= {args.latency_bound_ms} ms/token")
    print(f"published design: {_metrics_str(base)}")
    print()
    print("elasticities at the published design, d log(metric) / d log(parameter) (jax.jacfwd):")
    names = list(next(iter(sens.values())))
    print("parameter".ljust(26) + "".join(m.rjust(26) for m in sens))
    for n in names:
        print(n.ljust(26) + "".join(f"{sens[m][n]:+.3f}".rjust(26) for m in sens))
    print()
    print(f"(a) grid sweep: {sw['n_designs']:,} designs in one vmapped call: compile {sw['compile_s']:.2f} s, then "
          f"{sw['eval_s'] * 1e3:.1f} ms = {sw['designs_per_s']:,.0f} designs/s; {sw['n_feasible']:,} feasible")
    if sw["best"]:
        print(f"    best: {_design_str(sw['best']['params'])}")
        print(f"          {_metrics_str(sw['best']['metrics'])}")
        print(f"    Pareto front (latency vs {objective}), {len(sw['pareto'])} designs; every 4th:")
        for p in sw["pareto"][::4]:
            print(f"      {p['metrics']['latency_ms']:.3f} ms  {p['metrics'][objective]:.4g}  <- {_design_str(p['params'])}")
    else:
        print("    no feasible design in the grid")
    print()
    print(f"(b) gradient search: optax Adam, {gs['starts']} starts x {gs['steps']} steps (vmap x lax.scan): compile "
          f"{gs['compile_s']:.2f} s, then {gs['wall_s'] * 1e3:.1f} ms = {gs['evaluations_per_s']:,.0f} "
          f"value-and-gradient evaluations/s; {gs['starts_feasible']} of {gs['starts']} starts end feasible")
    c, s = gs["continuous"], gs["snapped"]
    print(f"    continuous optimum: {_design_str(c['params'])}")
    print(f"          {_metrics_str(c['metrics'])}")
    print(f"    snapped to integers ({'feasible' if s['feasible'] else 'NOT feasible'}): {_design_str(s['params'])}")
    print(f"          {_metrics_str(s['metrics'])}")
    if args.plot:
        print(f"wrote {args.plot}")
    return 0


# --- plan ---------------------------------------------------------------------------------------

def plan_command(args) -> int:
    from np_jax import cost

    cfg = get_shape(args.model)
    positive("cards", args.cards, upper=RACK.cards, why="the largest published NorthPole system, the 288-card rack")
    positive("cards-per-server", args.cards_per_server, upper=args.cards, why="a server holds at most the rack's cards")
    r = cost.plan_instance(cfg, args.precision, users=args.users, context=args.context,
                           micro_batches=args.micro_batches, prompt_tokens=args.prompt_tokens,
                           gen_tokens=args.gen_tokens, total_cards=args.cards, cards_per_server=args.cards_per_server)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    if r["cards_per_layer"] > 1:
        per = f"each layer over {r['cards_per_layer']} cards"
    else:
        per = f"{r['layers_per_card']} layer(s) per card (at most)"
    print(f"{r['model']}, {r['precision']}, {r['users']} users x {r['context']} context, on {r['total_cards']} cards "
          f"({r['cards_per_server']} per server)")
    print(f"one instance: {r['cards_per_instance']} cards = {r['layer_cards']} layer cards ({per}, "
          f"{r['layer_bytes_per_core'] / 1024:.0f} KiB of a layer per core vs {r['core_bytes'] / 1024:.0f} KiB) "
          f"+ {r['output_cards']} output-layer card(s)")
    print(f"instances: {r['instances']} ({r['cards_used']} of {r['total_cards']} cards); worst instance crosses "
          f"{r['ethernet_hops']} server boundaries (Ethernet)")
    print(f"per instance: {r['micro_batches']} micro-batches of {r['micro_batch_size']:g}; latency "
          f"{r['latency_ms']:.3f} ms/token (decode step {r['inter_token_ms']:.3f} ms), "
          f"{r['throughput_tok_s_instance']:,.0f} tok/s; rack {r['throughput_tok_s_rack']:,.0f} tok/s; "
          f"energy {r['energy_tok_s_W']:.2f} tok/s/W")
    print(f"prompt {r['prompt_tokens']} + generated {r['gen_tokens']} tokens per user: prefill "
          f"{r['prompt_time_s'] * 1e3:.1f} ms in chunks of {r['prefill_chunk']:.0f}")
    return 0
