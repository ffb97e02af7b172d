"""`np-jax map`: place a model on the appliance's cards and cores and report the memory of each card."""

from __future__ import annotations

import json
import sys

from np_jax.cli import (PRECISIONS, Formatter, add_mapping_arguments, add_rotation_argument, count, get_shape, positive,
                        precision_type, shape_with_rotations)
from np_jax.spec import PUBLISHED_RUN, RACK


def register(sub) -> None:
    p = sub.add_parser(
        "map", help="place a model on the appliance's cards and cores and report memory use",
        description="Map a model onto the appliance: one or more layers per card, the output layer split over as "
                    "many cards as it needs, weights, KV cache and activations placed in each core's 768 KiB. "
                    "Among the mappings that fit, the one with the best predicted throughput is chosen (fewer "
                    "cards may be used, the rest idle). Reports each card's role and bytes and whether it fits; "
                    "exits with status 1 and names the card, the core and the bytes over if it does not.",
        formatter_class=Formatter)
    p.add_argument("--model", default=PUBLISHED_RUN.model, help="named model config")
    add_mapping_arguments(p, users=PUBLISHED_RUN.users)
    add_rotation_argument(p)
    p.add_argument("--context", type=count, default=2048, help="context length per user (KV-cache positions)")
    p.add_argument("--precision", default="w4a4", type=precision_type(("float",) + PRECISIONS),
                   help=f"precision policy: float, {', '.join(PRECISIONS)}, or a policy file (.json)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="FILE.png",
                   help="draw a card's per-core memory as a 16x16 heat map (.png is added when missing; default: "
                        "no plot)")
    p.add_argument("--card", type=int, default=0, help="the card to plot")
    p.set_defaults(func=map_command)


def mapping_from_args(shape, policy, args, *, context: int, prompt_tokens: int | None = None,
                      gen_tokens: int | None = None):
    """The mapping `map`, `perf` and `run` use for these flags (bounds checked first)."""
    from np_jax import cost

    positive("cards", args.cards, upper=RACK.cards, why="the largest published NorthPole system, the 288-card rack")
    positive("users", args.users)
    positive("context", context, upper=shape.max_seq_len if hasattr(shape, "max_seq_len") else None,
             why=f"the context of {shape.name}")
    if args.micro_batches is not None:
        positive("micro-batches", args.micro_batches, upper=args.users, why="at least one user per micro-batch")
    if args.output_cards is not None:
        positive("output-cards", args.output_cards, upper=args.cards - 1, why="one card at least holds layers")
    if args.layer_cards is not None:
        positive("layer-cards", args.layer_cards, upper=args.cards - 1, why="one card at least holds the output layer")
    prompt = prompt_tokens or max(1, context // 2)
    gen = gen_tokens or max(1, context - prompt)
    return cost.plan_mapping(shape, policy, users=args.users, context=context, cards=args.cards,
                             micro_batches=args.micro_batches, output_cards=args.output_cards,
                             layer_cards=args.layer_cards, prompt_tokens=prompt, gen_tokens=gen)


def print_mapping(m, shape) -> None:
    mib = lambda b: f"{b / 2**20:9.1f}"  # noqa: E731
    print(f"{shape.name}, {m.policy}, {m.users} users x {m.context} context: {m.one_line()}")
    print(f"{'card':>4} {'role':<7} {'holds':<11} {'weights MiB':>11} {'KV MiB':>9} {'other MiB':>9} "
          f"{'total MiB':>9} {'of MiB':>7} {'fullest core KiB':>17} {'fits':>5}")
    for c in m.cards:
        s = c.summary()
        if c.parts:
            holds = f"{c.layers[0]} (part)"
        elif c.layers:
            holds = f"{c.layers[0]}-{c.layers[-1]}"
        else:
            holds = f"{c.vocab_slice[0]}:{c.vocab_slice[1]}" if c.vocab_slice else "-"
        print(f"{c.card:>4} {c.role:<7} {holds:<11} {mib(s['weights_bytes']):>11} {mib(s['kv_cache_bytes'])} "
              f"{mib(s['other_bytes'])} {mib(s['used_bytes'])} {s['capacity_bytes'] / 2**20:7.0f} "
              f"{s['fullest_core_bytes'] / 1024:10.1f} / {s['core_capacity_bytes'] / 1024:.0f} "
              f"{'yes' if c.fits else 'NO':>5}")


def map_command(args) -> int:
    from np_jax.plots import plot_card

    shape = shape_with_rotations(get_shape(args.model), args.precision, args.rotations)
    m = mapping_from_args(shape, args.precision, args, context=args.context)
    plot = None
    if args.plot:
        if not 0 <= args.card < len(m.cards):
            raise ValueError(f"--card must be in [0, {len(m.cards)}), got {args.card}")
        plot = plot_card(m, args.card, args.plot)
    if args.json:
        print(json.dumps(m.summary() | ({"plot": plot} if plot else {}), indent=2))
    else:
        print_mapping(m, shape)
        if plot:
            print(f"wrote {plot}")
    if not m.fits:
        print(f"np-jax map: does not fit: {m.first_error()}", file=sys.stderr)
        return 1
    return 0
