"""The performance model evaluated on a mapping, the relaxed form for the DSE, and the mapper's
choice of the best mapping.

- `evaluate_mapping(mapping, ...)`: the metrics of a given `np_jax.appliance.Mapping` (SCALE-Sim
  / Timeloop style: the cost model contains no mapper of its own). Stage times come from the
  layers (or layer parts) each card holds, memory left from the cards' ledgers.
- `relaxed_structure` / `evaluate`: the same placement rules (np_jax.appliance.mapping) as
  differentiable functions of the design, for `jax.grad` / `jax.vmap` (np_jax.cost.dse).
- `plan_mapping`: among the mappings of a model on at most `cards` cards (output-layer card
  count, layer cards, micro-batches), the fitting one with the best predicted throughput (more
  cards are then never predicted slower: cards may stay idle), or, when none fits, the one that
  overflows least.
- `predict`: `plan_mapping` (or a forced mapping) evaluated, as plain floats.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from np_jax.appliance.mapping import (LAYER_PHASES, Mapping, default_micro_batches, fewest_output_cards,
                                      frame_bytes, layer_blocks, layer_phase_bytes, map_model, output_columns,
                                      output_core_bytes, pack_phases, scratch_core_bytes)
from np_jax.cost.params import Bits, Design, ModelShape, Workload, ceil_ste
from np_jax.cost.phases import _grid, layer_phases, scratch_bytes_per_token
from np_jax.cost.schedule import metrics
from np_jax.quant.policy import PrecisionPolicy, get_policy
from np_jax.spec import APPLIANCE, PUBLISHED_RUN, ApplianceSpec

MAX_OUTPUT_CARDS = 64
N_PHASES = len(LAYER_PHASES)


def _bucket(n: int, least: int = 16) -> int:
    """Padded size: a power of two, at least `least` (so calls of other sizes reuse one compilation)."""
    return max(least, 1 << max(0, (n - 1).bit_length()))


# --- from a mapping --------------------------------------------------------------------------------

def mapping_structure(mapping: Mapping) -> dict:
    """What the performance model reads from a mapping: the layer stages and, per layer card, its
    multiple of every phase's work and its count of phase latencies ([cards, phases], a whole-layer
    card: its layer count for every phase; a card holding part of a layer: the fraction of each
    phase it holds, one latency per part); the output-layer cards and their slice width; and the
    bytes left in the fullest core of a layer card once weights and KV cache are placed."""
    lcards = mapping.layer_cards
    if not lcards:
        raise ValueError("the mapping has no layer cards")
    n = len(mapping.cards)
    n_layers = len({i for c in lcards for i in c.layers})
    groups = _groups(mapping.policy_object, n_layers)
    group_of = {i: g for g, layers in enumerate(groups) for i in layers}
    work_g, lat_g = np.zeros((len(groups), n, N_PHASES), np.float32), np.zeros((len(groups), n, N_PHASES), np.float32)
    free = []
    for row, c in enumerate(lcards):
        if c.parts:
            for ph, f in c.parts:
                work_g[group_of[c.layers[0]], row, ph] += f
                lat_g[group_of[c.layers[0]], row, ph] += 1
        else:
            for i in c.layers:
                work_g[group_of[i], row] += 1
                lat_g[group_of[i], row] += 1
        if c.memory is not None:
            act = sum((a.bytes_RxC for a in c.memory.allocations if a.kind == "activations"), 0)
            free.append(int((c.memory.capacity_bytes - (c.memory.used_RxC - act)).min()))
    outs = mapping.output_cards
    return {
        "n_stages": len(lcards),
        "layers_max": max(len(c.layers) for c in lcards),
        "n_layers": len({i for c in lcards for i in c.layers}),
        "output_cards": len(outs),
        "out_cols": mapping.output_tiling.n,
        "free": min(free) if free else 0,
        "cards": n,
        "card_work": work_g.sum(0),
        "card_latency": lat_g.sum(0),
        "card_work_groups": work_g,  # [layer groups, cards, phases]: a card's multiples per width group
        "card_latency_groups": lat_g,
    }


def _groups(policy, n_layers: int) -> tuple[tuple[int, ...], ...]:
    """The layers grouped by their cost-model widths (`Bits.layer_groups`); a float policy: one group."""
    return (tuple(range(n_layers)),) if get_policy(policy).is_float else Bits.layer_groups(policy, n_layers)[0]


def pack_layer(resident, work, capacity: float, latency: float) -> list[float]:
    """Cycles of each card when one layer's phases (per-core `resident` bytes, `work` cycles) are
    packed over cards of `capacity` bytes (`mapping.pack_phases`): a split phase's work is shared
    in proportion to its bytes, and every part pays the full phase latency."""
    return [sum(f * float(work[i]) + latency for i, f in parts) for parts in pack_phases(resident, capacity)]


@jax.jit
def _jit_metrics(d, w, bits, s, n_stages, output_cards, out_cols, free, card_work, card_latency, n_eth, eth_return,
                 group_bits=None):
    return metrics(d, w, bits, s, n_stages=n_stages, output_cards=output_cards, out_cols=out_cols, free=free,
                   card_work=card_work, card_latency=card_latency, n_ethernet_hops=n_eth, ethernet_return=eth_return,
                   group_bits=group_bits)


def _inputs(mapping: Mapping, shape, w: Workload | None, d: Design | None):
    s = ModelShape.from_decoder(shape)
    st = mapping_structure(mapping)
    if st["n_layers"] != s.n_layers:
        raise ValueError(f"the mapping holds {st['n_layers']} layers, {s.name} has {s.n_layers}")
    if not st["output_cards"]:
        raise ValueError("the mapping has no output-layer card")
    if not mapping.accounted:
        raise ValueError("the chip computes in integers: a float placement has no chip memory plan; the performance "
                         "model needs a quantized precision (w4a4, a8c8w4, w8a8)")
    bits = Bits.widest(mapping.policy_object, s.n_layers)
    d = d or Design.from_appliance(mapping.appliance)
    w = (w or Workload()).replace(users=float(mapping.users), micro_batches=float(mapping.micro_batches),
                                  cards=float(st["cards"]), context=float(mapping.context))
    return s, st, bits, d, w


def evaluate_mapping(mapping: Mapping, shape, w: Workload | None = None, d: Design | None = None, *,
                     n_ethernet_hops: float = 0.0, ethernet_return: float = 0.0) -> dict:
    """Metrics for a mapping: stage work from its cards' layers, memory left from its ledgers.

    `n_ethernet_hops`: card-to-card hops that cross servers (the rack planner); `ethernet_return`
    1 when the logits return to the first server over Ethernet.
    """
    s, st, bits, d, w = _inputs(mapping, shape, w, d)
    pad = lambda a: jnp.asarray(np.pad(a, ((0, _bucket(a.shape[0]) - a.shape[0]), (0, 0))))  # noqa: E731 - one compile per size bucket
    scalars = [jnp.float32(st[k]) for k in ("n_stages", "output_cards", "out_cols", "free")]
    if len(st["card_work_groups"]) == 1:  # one width for every layer
        return _jit_metrics(d, w, bits, s, *scalars, pad(st["card_work"]), pad(st["card_latency"]),
                            jnp.float32(n_ethernet_hops), jnp.float32(ethernet_return))
    gpad = lambda a: jnp.asarray(np.pad(a, ((0, 0), (0, _bucket(a.shape[1]) - a.shape[1]), (0, 0))))  # noqa: E731
    group_bits = Bits.stack(Bits.layer_groups(mapping.policy_object, s.n_layers)[1])
    return _jit_metrics(d, w, bits, s, *scalars, gpad(st["card_work_groups"]), gpad(st["card_latency_groups"]),
                        jnp.float32(n_ethernet_hops), jnp.float32(ethernet_return), group_bits)


# --- relaxed structure (design-space exploration) -----------------------------------------------

def output_cards_relaxed(shape: ModelShape, bits: Bits, d: Design, mb):
    """(h, vocabulary columns per card, bytes in its fullest core): the fewest output-layer cards
    (up to MAX_OUTPUT_CARDS) whose slices fit, by the mapper's own rule
    (`mapping.fewest_output_cards`). Forward exact; the gradient is that of
    h = output weight bytes per core / room per core."""
    s = ModelShape.from_decoder(shape)
    rows, cols = _grid(d)

    def need(h):
        return output_core_bytes(s.d_model, output_columns(s.vocab_size, h, ceil_ste), (rows, cols), d.n_cores,
                                 bits.out_w, bits.out_a, mb, ceil_ste)

    h_exact = fewest_output_cards(s.d_model, s.vocab_size, bits.out_w, bits.out_a, mb, (rows, cols), d.n_cores,
                                  d.sram_per_core_bytes, MAX_OUTPUT_CARDS, xp=jnp, ceil=ceil_ste)
    h_exact = jnp.minimum(h_exact, float(MAX_OUTPUT_CARDS)).astype(jnp.float32)
    weights_per_core = s.d_model * s.vocab_size * bits.out_w / 8 / d.n_cores
    room = d.sram_per_core_bytes - (need(h_exact) - weights_per_core / h_exact)
    h_relaxed = weights_per_core / jnp.maximum(room, 1.0)
    h = h_relaxed + jax.lax.stop_gradient(h_exact - h_relaxed)
    return h, s.vocab_size / h, need(h)


def relaxed_structure(d: Design, w: Workload, bits: Bits, shape) -> dict:
    """The pipeline structure as a differentiable function of the design, by the mapper's rules:
    the output layer on the fewest cards whose slices fit (`output_cards_relaxed`); the other
    C - h cards (at most one per layer) take ceil(layers / cards) layers each. Margin: bytes left
    in the fullest core (a layer card's or an output-layer card's); >= 0 fits."""
    s = ModelShape.from_decoder(shape)
    mb = w.users / w.micro_batches
    ctx = w.context_positions()
    dec = layer_phases(s, bits, d, b=mb, mb=mb, users=w.users, context=ctx, t=w.prompt_tokens + w.gen_tokens / 2)
    resident = jnp.sum(dec.resident_bytes)
    h, cols_h, out_need = output_cards_relaxed(s, bits, d, mb)
    layer_cards = jnp.clip(w.cards - h, 1.0, float(s.n_layers))
    share = ceil_ste(s.n_layers / layer_cards)
    need = share * resident + mb * scratch_bytes_per_token(s, bits, d)
    margin = jnp.minimum(d.sram_per_core_bytes - need, d.sram_per_core_bytes - out_need)
    return {"n_stages": s.n_layers / share, "layers_max": share, "output_cards": h, "out_cols": cols_h,
            "free": d.sram_per_core_bytes - share * resident, "fits_margin_bytes": margin}


def evaluate(d: Design, w: Workload, bits: Bits, shape) -> dict:
    """All metrics for a design with the relaxed structure (pure jnp; jit/grad/vmap-able).

    Adds `fits_margin_bytes` (>= 0: fits), `fits` (0/1), `output_cards`, `layers_per_card`.
    """
    s = ModelShape.from_decoder(shape)
    st = relaxed_structure(d, w, bits, s)
    out = metrics(d, w, bits, s, n_stages=st["n_stages"], layers_max=st["layers_max"],
                  output_cards=st["output_cards"], out_cols=st["out_cols"], free=st["free"])
    return out | {"fits_margin_bytes": st["fits_margin_bytes"], "fits": jnp.where(st["fits_margin_bytes"] >= 0, 1.0, 0.0),
                  "output_cards": st["output_cards"], "layers_per_card": st["layers_max"]}


# --- the mapper's choice ---------------------------------------------------------------------------

def floats(tree: dict) -> dict:
    """A metrics dict as plain Python floats (lists for arrays)."""
    out = {}
    for k, v in tree.items():
        a = np.asarray(v)
        out[k] = a.tolist() if a.ndim else float(a)
    return out


def _check_run(users, prompt_tokens, gen_tokens, context, prefill_chunk):
    for name, val in (("users", users), ("prompt_tokens", prompt_tokens), ("gen_tokens", gen_tokens)):
        if val is None or int(val) < 1:
            raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {val}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill-chunk must be >= 1, got {prefill_chunk}")
    ctx = int(context or (prompt_tokens + gen_tokens))
    if ctx < prompt_tokens + gen_tokens:
        raise ValueError(f"a context of {ctx} positions cannot hold {prompt_tokens} prompt + {gen_tokens} generated tokens")
    return ctx


MAX_CANDIDATE_MICRO_BATCHES = 64  # more micro-batches than this only add pipeline ticks


def divisors(n: int, upto: int | None = None) -> list[int]:
    """The divisors of n (at most `upto`), ascending (O(sqrt n))."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    out = sorted(set(small) | {n // d for d in small})
    return [d for d in out if upto is None or d <= upto]


def candidate_structures(shape, policy, *, users: int, context: int, cards: int, micro_batches: int | None = None,
                         output_cards: int | None = None, appliance: ApplianceSpec = APPLIANCE) -> list[dict]:
    """Every whole-layer mapping on at most `cards` cards, as the performance model reads it
    (`mapping_structure`), computed from the mapper's own placement rules without building the
    memory ledgers: each micro-batch count dividing the users (or the given one), each output-card
    count (or the given one; fewer than fit only matter when nothing fits), each number of layer
    cards (the rest stay idle). `fits`, `bytes_over` (`Mapping.bytes_over`) and `free` are what
    `map_model`'s ledgers give for the same choice (tested)."""
    policy = get_policy(policy)
    chip = appliance.chip
    grid, cap = (chip.grid_rows, chip.grid_cols), chip.core_sram_bytes
    groups = _groups(policy, shape.n_layers)
    if len(groups) == 1:
        layer_bytes = [sum(layer_phase_bytes(shape, policy, users, context, chip))] * shape.n_layers
    else:  # each layer at its own widths
        layer_bytes = [sum(layer_phase_bytes(shape, policy, users, context, chip, layer=i))
                       for i in range(shape.n_layers)]
    group_of = np.zeros(shape.n_layers, np.int64)
    for g, layers in enumerate(groups):
        group_of[list(layers)] = g
    ms = [micro_batches] if micro_batches else divisors(users, MAX_CANDIDATE_MICRO_BATCHES)
    out = []
    w_bits, x_bits, fb = policy.output("w").bits, policy.output("x").bits, chip.frame_buffer_bytes
    for m in ms:
        mb = users // m
        scratch = scratch_core_bytes(shape, policy, mb, chip)
        layer_frames_over = frame_bytes(mb, shape.d_model, shape.d_model) - fb
        for h in ([output_cards] if output_cards else range(1, cards)):
            cols = output_columns(shape.vocab_size, h)
            out_over = max(output_core_bytes(shape.d_model, cols, grid, chip.n_cores, w_bits, x_bits, mb) - cap,
                           frame_bytes(mb, shape.d_model, cols) - fb)
            for n_lc in range(1, min(cards - h, shape.n_layers) + 1):
                blocks = layer_blocks(shape.n_layers, n_lc)
                lmax = max(len(b) for b in blocks)
                fullest = max(sum(layer_bytes[i] for i in b) for b in blocks)
                over = int(max(0, out_over, layer_frames_over, fullest + scratch - cap))
                work_g = np.zeros((len(groups), cards, N_PHASES), np.float32)
                for c, b in enumerate(blocks):
                    for i in b:
                        work_g[group_of[i], c] += 1
                work = work_g.sum(0)
                out.append({"micro_batches": m, "output_cards": h, "layer_cards": n_lc, "fits": over == 0,
                            "bytes_over": over, "n_stages": n_lc, "layers_max": lmax, "out_cols": cols,
                            "free": cap - fullest, "cards": cards, "card_work": work, "card_latency": work,
                            "card_work_groups": work_g, "card_latency_groups": work_g})
    return out


@jax.jit
def _jit_many(d, w, bits, s, n_stages, output_cards, out_cols, free, card_work, card_latency, group_bits=None):
    def one(w_, n_st, h, c, f, cw, cl):
        return metrics(d, w_, bits, s, n_stages=n_st, output_cards=h, out_cols=c, free=f, card_work=cw,
                       card_latency=cl, group_bits=group_bits)

    return jax.vmap(one)(w, n_stages, output_cards, out_cols, free, card_work, card_latency)


def evaluate_structures(structs: list[dict], shape, policy, w: Workload, d: Design) -> dict:
    """The metrics of many structures (`mapping_structure` dicts) at once, in one vmapped call.

    The batch and the card axis are padded to powers of two (repeating the first structure, zero
    cards), so that searches of other sizes reuse the compiled call.
    """
    s = ModelShape.from_decoder(shape)
    bits = Bits.widest(policy, s.n_layers)
    n = len(structs)
    rows = structs + [structs[0]] * (_bucket(n, 512) - n)
    cards = _bucket(max(st["card_work"].shape[0] for st in rows))
    stack = lambda k: jnp.asarray(np.array([st[k] for st in rows], np.float32))  # noqa: E731

    def stack_cards(k):  # each structure's [..., cards, x] zero-padded to `cards`; the padding rows repeat the first
        first = np.asarray(structs[0][k])
        out = np.zeros((len(rows), *first.shape[:-2], cards, first.shape[-1]), first.dtype)
        for i, st in enumerate(structs):
            a = np.asarray(st[k])
            out[i, ..., : a.shape[-2], :] = a
        out[n:] = out[0]
        return jnp.asarray(out)

    ws = jax.tree.map(lambda x: jnp.full((len(rows),), x, jnp.float32), w)
    ws = ws.replace(micro_batches=stack("micro_batches"), cards=stack("cards"))
    mixed = len(rows[0].get("card_work_groups", [()])) > 1
    key, group_bits = ("card_work_groups", "card_latency_groups"), None
    if mixed:
        group_bits = Bits.stack(Bits.layer_groups(policy, s.n_layers)[1])
    else:
        key = ("card_work", "card_latency")
    out = _jit_many(d, ws, bits, s, stack("n_stages"), stack("output_cards"), stack("out_cols"), stack("free"),
                    stack_cards(key[0]), stack_cards(key[1]), group_bits)
    return floats({k: np.asarray(v)[:n] for k, v in out.items()})


def plan_mapping(shape, policy: str | PrecisionPolicy = "w4a4", *, users: int = PUBLISHED_RUN.users,
                 context: int | None = None, cards: int | None = None, micro_batches: int | None = None,
                 output_cards: int | None = None, layer_cards: int | None = None,
                 prompt_tokens: int = PUBLISHED_RUN.prompt_tokens, gen_tokens: int = PUBLISHED_RUN.generated_tokens,
                 appliance: ApplianceSpec = APPLIANCE, design: Design | None = None) -> Mapping:
    """The mapping with the best predicted system throughput (for the fixed users, also the lowest
    latency, N / T_sys) among the fitting `candidate_structures` (restricted to the given counts).
    Ties go to fewer cards in use, then to the documented default micro-batch count. When none
    fits, the least-overflowing one (fewest `bytes_over`; ties as above), flagged as not fitting:
    the fastest of the overflowing ones would be the one overflowing most, and would predict more
    users faster than fewer. Built, and its bytes placed, by `map_model`."""
    policy = get_policy(policy)
    cards = appliance.cards if cards is None else cards
    ctx = int(context or (prompt_tokens + gen_tokens))
    kw = dict(users=users, context=ctx, cards=cards, appliance=appliance, strict=False)
    if policy.is_float:
        return map_model(shape, policy, micro_batches=micro_batches, output_cards=output_cards, layer_cards=layer_cards,
                         **kw)
    structs = [st for st in candidate_structures(shape, policy, users=users, context=ctx, cards=cards,
                                                 micro_batches=micro_batches, output_cards=output_cards,
                                                 appliance=appliance)
               if layer_cards is None or st["layer_cards"] == layer_cards]
    if not structs:
        return map_model(shape, policy, micro_batches=micro_batches, output_cards=output_cards, layer_cards=layer_cards,
                         **kw)
    w = Workload(float(users), 1.0, float(prompt_tokens), float(gen_tokens), float(cards), float(ctx))
    t = np.asarray(evaluate_structures(structs, shape, policy, w, design or Design.from_appliance(appliance))
                   ["system_throughput_tok_s"])
    fits = np.array([st["fits"] for st in structs])

    def rank(i):
        st = structs[i]
        rule = st["micro_batches"] != default_micro_batches(users, st["layer_cards"])
        return -round(float(t[i]), 3), st["layer_cards"] + st["output_cards"], rule

    if fits.any():
        best = structs[min(np.flatnonzero(fits), key=rank)]
    else:
        best = structs[min(range(len(structs)), key=lambda i: (structs[i]["bytes_over"], rank(i)))]
    return map_model(shape, policy, micro_batches=best["micro_batches"], output_cards=best["output_cards"],
                     layer_cards=best["layer_cards"], **kw)


def predict(shape, policy: str | PrecisionPolicy = "w4a4", *, users: int = PUBLISHED_RUN.users,
            micro_batches: int | None = None, prompt_tokens: int = PUBLISHED_RUN.prompt_tokens,
            gen_tokens: int = PUBLISHED_RUN.generated_tokens, cards: int | None = None, context: int | None = None,
            prefill_chunk: int | None = None, output_cards: int | None = None, layer_cards: int | None = None,
            mapping: Mapping | None = None, appliance: ApplianceSpec = APPLIANCE, design: Design | None = None) -> dict:
    """Predicted NorthPole appliance figures for a run, as plain floats: the HPEC24 metrics
    (`system_throughput_tok_s`, `throughput_tok_s_card`, `latency_ms`, `energy_tok_s_W`,
    `space_tok_s_per_transistor`), the decode inter-token time, prompt and generation times, and
    the mapping facts (`fits`, `error`, `cards`, ...). The mapping is `mapping` when given, else
    the best one (`plan_mapping`). `context` defaults to prompt + generated.
    """
    ctx = _check_run(users, prompt_tokens, gen_tokens, context, prefill_chunk)
    policy = get_policy(policy)
    Bits.from_policy(policy)  # a float policy: the chip computes in integers
    m = mapping or plan_mapping(shape, policy, users=users, context=ctx, cards=cards, micro_batches=micro_batches,
                                output_cards=output_cards, layer_cards=layer_cards, prompt_tokens=prompt_tokens,
                                gen_tokens=gen_tokens, appliance=appliance, design=design)
    s = ModelShape.from_decoder(shape)
    w = Workload(float(users), float(m.micro_batches), float(prompt_tokens), float(gen_tokens), float(len(m.cards)),
                 float(ctx), float(prefill_chunk or 0))
    out = floats(evaluate_mapping(m, s, w, design or Design.from_appliance(appliance)))
    st = mapping_structure(m)
    return out | {"model": s.name, "precision": policy.name, "users": users, "micro_batches": m.micro_batches,
                  "micro_batch_size": m.micro_batch_size, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
                  "context": ctx, "cards": len(m.cards), "layer_cards": st["n_stages"],
                  "layers_per_card": st["layers_max"], "output_cards": st["output_cards"], "fits": m.fits,
                  "error": m.first_error(), "bytes_over": m.bytes_over(), "mapping": m.one_line(),
                  "card_core_bytes": m.card_bytes()}
