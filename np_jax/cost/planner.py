"""The scale-out planner: the smallest pipeline of cards that holds one instance of a model on the
NorthPole rack (spec sec. 8), how many instances fit, and what each delivers.

It builds each instance's `Mapping` with the mapper's own rules (`map_model` with the fewest
layer cards, `mapping.min_layer_cards`: whole layers per card where they fit, otherwise every
layer's phases packed over the fewest cards) and evaluates it with the performance model,
adding the Ethernet hops the instance's position in the rack implies.
"""

from __future__ import annotations

import dataclasses

from np_jax.appliance.mapping import layer_phase_bytes, map_model, min_layer_cards, output_cards_needed
from np_jax.chip.memory import CoreMemoryError
from np_jax.cost.params import Design, ModelShape, Workload
from np_jax.cost.estimate import evaluate_mapping, floats, mapping_structure
from np_jax.quant.policy import PrecisionPolicy, get_policy
from np_jax.spec import APPLIANCE, RACK, RackSpec

MAX_USERS = 1 << 16  # a bound on the users of one instance (every micro-batch count is tried)


def _ethernet_hops(n_cards: int, instances: int, per_server: int) -> int:
    """Server boundaries crossed by the worst instance (instance i holds cards [i n, (i + 1) n))."""
    return max(((i + 1) * n_cards - 1) // per_server - (i * n_cards) // per_server for i in range(instances))


def plan_instance(shape, policy: str | PrecisionPolicy = "a8c8w4", *, users: int = 28, context: int = 2048,
                  micro_batches: int | None = None, prompt_tokens: int | None = None, gen_tokens: int | None = None,
                  total_cards: int | None = None, cards_per_server: int | None = None, rack: RackSpec = RACK,
                  design: Design | None = None) -> dict:
    """Smallest pipeline of cards that holds one instance of `shape`, how many fit, what each delivers.

    Instances are laid out one after another over servers of `cards_per_server`: a card-to-card
    hop between servers goes over Ethernet, and an instance spanning servers returns its logits
    to its first server's host over Ethernet. `micro_batches` defaults to the divisor of `users`
    with the highest throughput; prompt and generated tokens default to half the context each.
    """
    s = ModelShape.from_decoder(shape)
    policy = get_policy(policy)
    if policy.is_float:
        raise ValueError("the chip computes in integers: plan a quantized precision (w4a4, a8c8w4, w8a8)")
    d = design or Design()
    total = int(rack.cards if total_cards is None else total_cards)
    per_server = int(rack.cards_per_server if cards_per_server is None else cards_per_server)
    if not 1 <= users <= MAX_USERS or context < 2:
        raise ValueError(f"users must be in [1, {MAX_USERS}] and context >= 2, got {users} and {context}")
    if total < 2 or per_server < 1:
        raise ValueError(f"need at least 2 cards and 1 card per server, got {total} and {per_server}")
    prompt = int(context // 2 if prompt_tokens is None else prompt_tokens)
    gen = int(context - prompt if gen_tokens is None else gen_tokens)
    if prompt < 1 or gen < 1 or prompt + gen > context:
        raise ValueError(f"{prompt} prompt + {gen} generated tokens do not fit a context of {context}")
    if micro_batches is not None and (micro_batches < 1 or users % micro_batches):
        raise ValueError(f"{users} users cannot be split into {micro_batches} equal micro-batches")
    choices = [micro_batches] if micro_batches is not None else [m for m in range(1, users + 1) if users % m == 0]
    plans, reasons = [], []
    app = dataclasses.replace(APPLIANCE, cards=total)
    for m in choices:
        mb = users // m
        try:
            h = output_cards_needed(s, policy, mb, app)
            n_lc = min_layer_cards(s, policy, users, context, mb, app.chip)
        except (ValueError, CoreMemoryError) as e:
            reasons.append(str(e))
            continue
        n_cards = n_lc + h
        if n_cards > total:
            reasons.append(f"one instance needs {n_cards} cards ({n_lc} layer cards + {h} output-layer card(s)), "
                           f"more than the {total} available")
            continue
        mapping = map_model(s, policy, users=users, context=context, cards=n_cards, micro_batches=m, output_cards=h,
                            layer_cards=n_lc, appliance=app, strict=False)
        if not mapping.fits:
            reasons.append(mapping.first_error())
            continue
        instances = total // n_cards
        n_eth = _ethernet_hops(n_cards, instances, per_server)
        w = Workload(float(users), float(m), float(prompt), float(gen), float(n_cards), float(context))
        out = floats(evaluate_mapping(mapping, s, w, d, n_ethernet_hops=float(n_eth), ethernet_return=float(n_eth > 0)))
        st = mapping_structure(mapping)
        layer_bytes = sum(layer_phase_bytes(s, policy, users, context, app.chip))
        plans.append(out | {
            "cards_per_instance": n_cards, "instances": instances, "cards_used": instances * n_cards,
            "total_cards": total, "cards_per_server": per_server, "layer_cards": n_lc, "output_cards": h,
            "layers_per_card": st["layers_max"] if mapping.cards_per_layer == 1 else 0,
            "cards_per_layer": mapping.cards_per_layer, "ethernet_hops": n_eth,
            "users": users, "context": context, "micro_batches": m, "micro_batch_size": mb,
            "prompt_tokens": prompt, "gen_tokens": gen, "layer_bytes_per_core": layer_bytes,
            "core_bytes": float(d.sram_per_core_bytes), "mapping": mapping.one_line(),
            "throughput_tok_s_instance": out["system_throughput_tok_s"],
            "throughput_tok_s_rack": instances * out["system_throughput_tok_s"],
        })
    if not plans:
        # the most micro-batches (smallest micro-batch, least activation scratch) needs the fewest cards
        raise ValueError(f"{s.name} at {policy.name} for {users} users x {context} positions: {reasons[-1]}")
    best = max(plans, key=lambda p: p["system_throughput_tok_s"])
    return best | {"model": s.name, "precision": policy.name, "micro_batches_tried": choices}

