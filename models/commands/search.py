"""`np-jax search`: per-layer widths chosen from measured layer sensitivities and the appliance's
cost model; the Pareto front, the chosen policy and the front's points verified (models.search).

Registered into the `np-jax` CLI through the `np_jax.commands` entry point (`register`).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from np_jax.cli import Formatter, count, count_or_zero, positive_number
from models.commands.sensitivity import RECIPES, _writable

OPTIONS = ("w4a4-pdd", "a8c8w4-pdd", "w8a8-pdd")  # models.search.DEFAULT_OPTIONS, spelled out: --help imports no JAX

EPILOG = """\
examples:
  np-jax search --max-ratio 1.3                   # the fastest policy predicted within 1.3x float perplexity
  np-jax search --min-throughput 85%              # the best quality at 85 % of uniform w4a4's tokens/s
  np-jax search --users 28 --context 2048 --verify 4 --out-dir runs/search
"""


def throughput_type(text: str) -> tuple[float, bool]:
    """tokens/s, or a percentage of the first option's uniform throughput ("85%")."""
    pct = text.endswith("%")
    v = positive_number(text[:-1] if pct else text)
    return (v / 100.0, True) if pct else (v, False)


def register(sub) -> None:
    p = sub.add_parser(
        "search", help="choose per-layer widths: measured sensitivities x the cost model, the Pareto front",
        description="Measure what each layer alone at each option (a preset for the whole layer) costs in loss "
                    "on held-out windows apart from the verification's, find for every count of layers per "
                    "option the layers that cost least (an exact dynamic program), predict every candidate's "
                    "appliance throughput and energy with the planner and cost model, and keep the Pareto front. "
                    "The constraint picks a point; its policy file and those of the verified points go to "
                    "--out-dir; --verify points of the front are prepared for real and evaluated on the held-out "
                    "split. Writes search.json and front.png.",
        epilog=EPILOG, formatter_class=Formatter)
    p.add_argument("--model", default="smollm2-135m", help="a named config; smollm2-135m is read from its GGUF")
    p.add_argument("--gguf", default=None, help="GGUF file of the model (default: the installed one)")
    p.add_argument("--recipe", default="rotate-gptq-sink", choices=RECIPES, metavar="RECIPE",
                   help=f"how the model is prepared: {', '.join(RECIPES)} (docs/quantization.md)")
    p.add_argument("--options", default=",".join(OPTIONS), metavar="P1,P2,...",
                   help="the presets a layer may take, narrowest first; the last is the base (and the output "
                        "layer's widths)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--max-ratio", type=positive_number, default=None, metavar="R",
                   help="pick the fastest point predicted within R x float perplexity")
    g.add_argument("--min-throughput", type=throughput_type, default=None, metavar="TOK_S|PCT%",
                   help="pick the best-quality point predicted at this many tokens/s or more (a percentage: of "
                        "the first option's uniform throughput) (default: 85%%)")
    p.add_argument("--users", type=count, default=28, help="users of the appliance run the cost model predicts")
    p.add_argument("--context", type=count, default=2048, help="KV-cache positions per user")
    p.add_argument("--cards", type=count, default=16, help="cards of the appliance")
    p.add_argument("--windows", type=count, default=8,
                   help="held-out windows (256 tokens, after the verification's) of the loss table")
    p.add_argument("--batch-size", type=count, default=4, help="windows per forward")
    p.add_argument("--verify", type=count_or_zero, default=3,
                   help="front points (evenly spread, the chosen one added) prepared and evaluated for real")
    p.add_argument("--eval-windows", type=count, default=16, help="held-out windows (256 tokens) of each verification")
    p.add_argument("--out-dir", default="runs/search", metavar="DIR",
                   help="where search.json, front.png and the policy files go")
    p.add_argument("--json", action="store_true", help="print search.json on stdout instead of the summary")
    p.set_defaults(func=search_command)


def search_command(args) -> int:
    out_dir = Path(args.out_dir).expanduser()
    _writable("--out-dir", str(out_dir / "search.json"), ".json")
    from models import search as S
    from models.config import get_config
    from models.evaluate.perplexity import evaluate, held_out
    from models.io.load import load_model
    from models.prepared import prepare
    from models.recipe import get_recipe
    from models.train.data import DataConfig
    from np_jax.progress import Progress
    from np_jax.quant import get_policy
    from np_jax.quant.policy import load_policy

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t_start = time.perf_counter()
    options = S.check_options([o.strip() for o in args.options.split(",") if o.strip()])
    if args.max_ratio is None and args.min_throughput is None:
        args.min_throughput = (0.85, True)
    if args.gguf is None:
        get_config(args.model)  # an unknown name fails before the model is read
    model = load_model(args.model, args.gguf, log=log)
    cfg0 = model.cfg
    recipe = get_recipe(args.recipe)
    seq = min(256, cfg0.max_seq_len)
    # held-out windows: the first --eval-windows verify, the next --windows make the table (disjoint)
    held, described = held_out(model.encoder, DataConfig(), seq, args.eval_windows + args.windows)
    if len(held) < args.eval_windows + 1:
        raise ValueError(f"the held-out set has only {len(held)} windows of {seq} tokens")
    verify_windows, windows = held[: args.eval_windows], held[args.eval_windows:]
    t0 = time.perf_counter()
    float_nll = evaluate(model.params, model.cfg, "float", windows, args.batch_size)["nll"]

    # 1. each table's options prepared once, with that table's transforms; the table measured
    tables, cfg = [], None
    for qk, idx in S.tables_needed(recipe, options, cfg0.n_layers):
        opts = [options[k] for k in idx]
        rec = dataclasses.replace(recipe, qk_rotation=qk)
        prepared = []
        for o in opts:  # the recipe itself where it decides so (the prepared cache then holds the option)
            r = recipe if recipe.qk_rotation_for(o, cfg0.n_layers) == qk else rec
            prepared.append(prepare(model, r, o, log=log)[:2])
        cfg = prepared[-1][0]
        if any(c != cfg for c, _ in prepared):
            raise ValueError("the options' prepared models differ in their transforms; give --recipe with them fixed")
        lm = S.LayerwiseModel(cfg, opts, [p for _, p in prepared])
        n = cfg.n_layers * (len(opts) - 1) * -(-len(windows) // args.batch_size)
        label = f"{'with' if qk else 'without'} the q/k rotation"
        with Progress(f"table {label} ({cfg.n_layers} layers x {len(opts) - 1} options)", n, unit="entry",
                      log=log) as bar:
            base_nll, delta = lm.table(windows, args.batch_size, progress=bar.update)
        tables.append(S.Table(tuple(idx), delta, base_nll, qk))
        log(f"table {label}: base {options[-1]} {base_nll:.4f} nats/token (float {float_nll:.4f}) on "
            f"{len(windows)} held-out windows")
        del lm, prepared
    t_table = time.perf_counter() - t0

    # 2-3. candidates, their predicted cost, the front
    t0 = time.perf_counter()
    shape = get_config(args.model) if args.gguf is None else model.cfg
    with Progress("cost of every candidate", S.n_candidates(tables), unit="candidate", log=log) as bar:
        cands = S.search(tables, options, float_nll=float_nll, shape=shape, users=args.users, context=args.context,
                         cards=args.cards, progress=bar.update)
    t_cost = time.perf_counter() - t0
    front = S.pareto([c["ratio"] for c in cands], [c["throughput"] if c["fits"] else -1.0 for c in cands])
    front = [k for k in front if cands[k]["fits"]]
    uniform = {o: next(c for c in cands if c["counts"][o] == cfg0.n_layers) for o in options}
    if args.max_ratio is not None:
        constraint, chosen = f"ratio <= {args.max_ratio:g}", S.choose(cands, max_ratio=args.max_ratio)
    else:
        v, pct = args.min_throughput
        floor = v * uniform[options[0]]["throughput"] if pct else v
        constraint = (f"throughput >= {v * 100:g} % of uniform {options[0]} ({floor:.0f} tokens/s)" if pct
                      else f"throughput >= {floor:g} tokens/s")
        chosen = S.choose(cands, min_throughput=floor)

    # 4. policy files, verification
    tag = f"{cfg0.name}-u{args.users}"
    picks = [(f"{tag}-front{j}", cands[k]) for j, k in enumerate(S.spread(front, args.verify))] if args.verify else []
    if chosen is not None:
        picks = [(f"{tag}-chosen", chosen)] + [(n, c) for n, c in picks if c is not chosen]
    files = {}
    for name, c in picks:
        files[name] = S.write_policy(out_dir / "policies" / f"{name}.json", options, c["assignment"], name,
                                     f"searched ({constraint if c is chosen else 'front point'}): {c['describe']}; "
                                     f"predicted {c['ratio']:.3f}x float perplexity, {c['throughput']:.0f} tokens/s "
                                     f"({args.users} users, {args.cards} cards, context {args.context})")
        c["policy_file"] = str(files[name])
    verified = []
    if args.verify and picks:
        fl = evaluate(model.params, model.cfg, "float", verify_windows, args.batch_size)
        base_name = f"{tag}-uniform-{options[-1]}"
        base = [] if any(c["assignment"] == uniform[options[-1]]["assignment"] for _, c in picks) else \
            [(base_name, uniform[options[-1]])]  # the uniform base measured too, unless a pick is it
        for name, c in base + picks:
            pol = load_policy(files[name]) if name in files else get_policy(options[-1])
            t0 = time.perf_counter()
            cfg_v, params_v, _ = prepare(model, recipe, pol, log=log)
            with Progress(f"held-out {name}", len(verify_windows), unit="window", log=log) as bar:
                r = evaluate(params_v, cfg_v, pol, verify_windows, args.batch_size, reference_top1=fl["top1"],
                             progress=bar.update, reference_params=model.params, reference_cfg=model.cfg)
            m = {"perplexity": r["perplexity"], "vs_float": r["perplexity"] / fl["perplexity"], "kl": r["kl"],
                 "top1_agreement": r["top1_agreement"], "tokens": r["tokens"], "seconds": time.perf_counter() - t0}
            verified.append({"name": name, "policy": str(files[name]) if name in files else options[-1],
                             **{k: c[k] for k in ("describe", "ratio", "throughput", "fits")}, "measured": m})
            log(f"{name}: predicted {c['ratio']:.3f}x, measured {m['vs_float']:.3f}x held out (KL {m['kl']:.4f}, "
                f"top-1 {m['top1_agreement']:.3f}) at {c['throughput']:.0f} tokens/s: {c['describe']}")
    # the measurement decides among the verified points: the predicted ratios add single-layer changes
    pool = [{**v, "ratio": v["measured"]["vs_float"]} for v in verified]
    pick = (S.choose(pool, max_ratio=args.max_ratio) if args.max_ratio is not None
            else S.choose(pool, min_throughput=floor)) if pool else None
    verified_choice = None if pick is None else {k: pick[k] for k in ("name", "policy", "describe", "throughput")} | {
        "measured": pick["measured"]}
    result = {
        "command": "np-jax search " + " ".join(
            f"--{k.replace('_', '-')} {_flag(getattr(args, k))}" for k in
            ("model", "gguf", "recipe", "options", "max_ratio", "min_throughput", "users", "context", "cards",
             "windows", "batch_size", "verify", "eval_windows") if getattr(args, k) is not None),
        "model": cfg0.name, "recipe": recipe.name, "options": list(options), "users": args.users,
        "context": args.context, "cards": args.cards, "constraint": constraint,
        "tables": [{"options": [options[k] for k in t.options], "qk_rotation": t.qk_rotation,
                    "base_nll": t.base_nll, "delta_nll": t.delta.tolist()} for t in tables],
        "table_windows": {"windows": int(len(windows)), "seq_len": int(windows.shape[1] - 1),
                          "split": f"held out, after the {len(verify_windows)} verification windows",
                          "float_nll": float_nll},
        "uniform": {o: {k: u[k] for k in ("ratio", "throughput", "energy_tok_s_W", "fits")} for o, u in uniform.items()},
        "chosen": chosen, "front": front, "candidates": cands, "verified": verified, "verified_choice": verified_choice,
        "held_out": described,
        "seconds": {"table": t_table, "cost": t_cost, "total": time.perf_counter() - t_start},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "search.json").write_text(json.dumps(result, indent=1) + "\n")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(S.front_figure(result)).print_png(str(out_dir / "front.png"))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{cfg0.name}, options {', '.join(options)}, {args.users} users, {args.cards} cards, context {args.context}")
    for o, u in uniform.items():
        print(f"  uniform {o:8s} predicted {u['ratio']:.3f}x float, {u['throughput']:8.0f} tokens/s, "
              f"{u['energy_tok_s_W']:.1f} tokens/s/W")
    print(f"  front: {len(front)} of {len(cands)} candidates")
    if chosen is None:
        print(f"  no candidate meets {constraint}; the front is in {out_dir / 'front.png'}")
    else:
        print(f"  chosen ({constraint}): {chosen['describe']}; predicted {chosen['ratio']:.3f}x float, "
              f"{chosen['throughput']:.0f} tokens/s -> {chosen['policy_file']}")
    if verified_choice:
        print(f"  verified choice ({constraint}, measured): {verified_choice['describe']} -> "
              f"{verified_choice['policy']}; measured {verified_choice['measured']['vs_float']:.3f}x float")
    for v in verified:
        print(f"  verified {v['name']}: predicted {v['ratio']:.3f}x, measured {v['measured']['vs_float']:.3f}x "
              f"(KL {v['measured']['kl']:.4f})")
    print(f"wrote {out_dir / 'search.json'} and {out_dir / 'front.png'} in {result['seconds']['total']:.0f} s")
    return 0 if chosen is not None else 1


def _flag(v) -> str:
    if isinstance(v, tuple):  # --min-throughput
        return f"{v[0] * 100:g}%" if v[1] else f"{v[0]:g}"
    return str(v)
