"""The GPipe schedule of the appliance and the HPEC24 metrics.

Per pipeline (M micro-batches of mb = N / M users; card stages hold one or more layers, or part
of one; the output layer is a group of h cards working in parallel):

    hop_s(bytes)  = bytes / pcie_bytes_s + pcie_latency_s        (Ethernet likewise)
    R             = sum of stage times + output-layer time + every hop + host time  (round trip)
    busy          = the busiest resource per micro-batch (slowest card, a PCIe link, the host)
    decode step   = max(M * busy, R)
    prefill       = (passes * M - 1) * busy_prefill + R_prefill
    prompt_time   = prefill,  token_gen_time = (gen_tokens - 1) * decode step

Metrics exactly as HPEC24 defines them (spec sec. 7):
    tokens_gen = M * mb * gen_tokens;  T_sys = tokens_gen / (prompt_time + token_gen_time)
    T_card = T_sys / cards;  latency = N / T_sys;  energy = T_card / power_per_card;
    space = T_card / transistors_per_card.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from np_jax.appliance.mapping import frame_bytes
from np_jax.chip.vector_unit import FP16_BYTES
from np_jax.cost.params import Bits, Design, ModelShape, Workload, ceil_ste, floor_ste
from np_jax.cost.phases import layer_phases, output_phases, scratch_bytes_per_token
from np_jax.spec import vmm_ops_per_cycle


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Stages:
    """Card-stage times of one regime (decode or one prefill pass), in seconds per micro-batch."""

    sum_s: jax.Array  # all layer stages, in pipeline order (the micro-batch's traversal)
    max_s: jax.Array  # the busiest layer card
    out_s: jax.Array  # the output-layer group (its cards run in parallel)


def schedule(d: Design, w: Workload, *, n_stages, output_cards, dec: Stages, pre: Stages, chunk, frame_bytes_per_token,
             logits_bytes_per_token, n_ethernet_hops=0.0, ethernet_return=0.0) -> dict:
    """GPipe timing of prefill and decode and the HPEC24 metrics (all jnp scalars).

    Hops of one micro-batch: host -> first layer card, layer card -> next (n_stages hops of the
    fp16 activation frame in all), last layer card -> each output-layer card (h frames on the
    sender's link), output-layer cards -> host (their fp16 logits slices, in parallel links).
    `n_ethernet_hops` of the card-to-card hops cross servers (Ethernet instead of PCIe);
    `ethernet_return` = 1 when the logits go back to the first server's host over Ethernet.
    """
    n, m, g, p = w.users, w.micro_batches, w.gen_tokens, w.prompt_tokens
    mb = n / m

    def hop(nbytes):
        return nbytes / d.pcie_bytes_s + d.pcie_latency_s

    def eth(nbytes):
        return nbytes / d.ethernet_bytes_s + d.ethernet_latency_s

    def chain(tokens):
        f = tokens * frame_bytes_per_token
        return (n_stages - n_ethernet_hops) * hop(f) + n_ethernet_hops * eth(f)

    to_output = hop(output_cards * mb * frame_bytes_per_token)
    logits = mb * logits_bytes_per_token  # per output-layer card
    back = hop(logits) + ethernet_return * eth(logits) + d.host_s_per_microbatch

    # decode: mb tokens per micro-batch; the token loop closes through the host
    r_dec = dec.sum_s + dec.out_s + chain(mb) + to_output + back
    link_dec = jnp.maximum(output_cards * mb * frame_bytes_per_token, logits) / d.pcie_bytes_s
    busy_dec = jnp.maximum(jnp.maximum(dec.max_s, dec.out_s), jnp.maximum(link_dec, d.host_s_per_microbatch))
    step = jnp.maximum(m * busy_dec, r_dec)
    gen_s = (g - 1) * step

    # prefill: a GPipe stream of passes x M chunks of mb x chunk tokens; the output layer runs
    # once, for the last prompt position (it yields the first generated token)
    passes = ceil_ste(p / chunk)
    f_pre = mb * chunk * frame_bytes_per_token
    r_pre = pre.sum_s + chain(mb * chunk) + to_output + dec.out_s + back
    busy_pre = jnp.maximum(pre.max_s, f_pre / d.pcie_bytes_s)
    prefill_s = (passes * m - 1) * busy_pre + r_pre

    total_s = prefill_s + gen_s
    tokens_gen = m * mb * g
    t_sys = tokens_gen / total_s
    t_card = t_sys / w.cards
    power = d.power_w_per_card()
    transistors = d.transistors()
    return {
        "system_throughput_tok_s": t_sys,
        "throughput_tok_s_card": t_card,
        "latency_ms": 1e3 * n / t_sys,
        "energy_tok_s_W": t_card / power,
        "space_tok_s_per_transistor": t_card / transistors,
        "space_tok_s_per_1e9_transistors": 1e9 * t_card / transistors,
        "inter_token_ms": 1e3 * step,
        "prompt_time_s": prefill_s,
        "token_gen_time_s": gen_s,
        "tokens_gen": tokens_gen,
        "decode_round_trip_ms": 1e3 * r_dec,
        "decode_busy_ms": 1e3 * busy_dec,
        "decode_throughput_bound": jnp.where(m * busy_dec >= r_dec, 1.0, 0.0),  # 0: round-trip (latency) bound
        "prefill_chunk": chunk,
        "prefill_passes": passes,
        "power_w_per_card": power,
        "transistors": transistors,
    }


def _stage_times(ph, d: Design, card_work, card_latency):
    """(sum, max) over layer cards of each card's seconds: per card, its multiple of every phase's
    work plus its count of phase latencies (`card_work`, `card_latency`: [cards, phases])."""
    cyc = card_work @ ph.work_cycles + card_latency @ (ph.active * d.phase_latency_cycles)
    return jnp.sum(cyc) / d.clock_hz, jnp.max(cyc) / d.clock_hz


def _group_stage_times(ph, d: Design, card_work, card_latency):
    """`_stage_times` for layers of several widths: `ph` per layer group (leading axis G), the
    cards' multiples per group ([G, cards, phases])."""
    cyc = (jnp.einsum("gcp,gp->c", card_work, ph.work_cycles)
           + jnp.einsum("gcp,gp->c", card_latency, ph.active * d.phase_latency_cycles))
    return jnp.sum(cyc) / d.clock_hz, jnp.max(cyc) / d.clock_hz


def metrics(d: Design, w: Workload, bits: Bits, s: ModelShape, *, n_stages, output_cards, out_cols, free,
            layers_max=None, card_work=None, card_latency=None, n_ethernet_hops=0.0, ethernet_return=0.0,
            group_bits: Bits | None = None) -> dict:
    """Layer and output-layer phases -> stage times -> schedule and metrics.

    Stage times come either from the layer cards' phase multiples (`card_work`, `card_latency`,
    [cards, phases], as a mapping assigns them; zero rows are ignored) or, in the relaxed form,
    from identical stages of `layers_max` layers (sum = n_layers x layer time). Layers of several
    widths (a per-layer policy): `group_bits` holds each layer group's widths (a leading axis G)
    and `card_work`, `card_latency` each card's multiples per group ([G, cards, phases]), so that
    a card's time follows its own layers' widths; `bits` is then every width's widest (the
    activation scratch, the reported per-layer times).
    """
    mb = w.users / w.micro_batches
    ctx = w.context_positions()
    dec = layer_phases(s, bits, d, b=mb, mb=mb, users=w.users, context=ctx, t=w.prompt_tokens + w.gen_tokens / 2)
    chunk = _prefill_chunk(w, s, d, free=free, scratch_tok=scratch_bytes_per_token(s, bits, d), mb=mb)
    pre = layer_phases(s, bits, d, b=mb * chunk, mb=mb, users=w.users, context=ctx, t=w.prompt_tokens / 2)
    out = output_phases(s, bits, d, b=mb, cols_per_card=out_cols)
    td, tp, th = dec.seconds(d), pre.seconds(d), out.seconds(d)
    if card_work is None:
        dec_st, pre_st = Stages(s.n_layers * td, layers_max * td, th), Stages(s.n_layers * tp, layers_max * tp, th)
    elif group_bits is not None:
        def phases_of(b, n_tokens, t):
            return layer_phases(s, b, d, b=n_tokens, mb=mb, users=w.users, context=ctx, t=t)
        dec_g = jax.vmap(lambda b: phases_of(b, mb, w.prompt_tokens + w.gen_tokens / 2))(group_bits)
        pre_g = jax.vmap(lambda b: phases_of(b, mb * chunk, w.prompt_tokens / 2))(group_bits)
        dec_st = Stages(*_group_stage_times(dec_g, d, card_work, card_latency), th)
        pre_st = Stages(*_group_stage_times(pre_g, d, card_work, card_latency), th)
    else:
        dec_st = Stages(*_stage_times(dec, d, card_work, card_latency), th)
        pre_st = Stages(*_stage_times(pre, d, card_work, card_latency), th)
    res = schedule(d, w, n_stages=n_stages, output_cards=output_cards, dec=dec_st, pre=pre_st, chunk=chunk,
                   frame_bytes_per_token=s.d_model * FP16_BYTES, logits_bytes_per_token=out_cols * FP16_BYTES,
                   n_ethernet_hops=n_ethernet_hops, ethernet_return=ethernet_return)
    peak = d.n_cores * vmm_ops_per_cycle(d.vmm_ops_per_cycle_int8, jnp.maximum(bits.a, bits.w)) * d.clock_hz
    return res | {
        "layer_ms_decode": 1e3 * td, "output_ms_decode": 1e3 * th, "layer_ms_prefill": 1e3 * tp,
        "stage_max_ms_decode": 1e3 * dec_st.max_s,
        "vmm_utilisation_decode": jnp.sum(dec.useful_ops) / td / peak,
        "layer_work_cycles_decode": jnp.sum(dec.work_cycles),
        "layer_latency_cycles": d.phase_latency_cycles * jnp.sum(dec.active),
    }


def _prefill_chunk(w: Workload, s: ModelShape, d: Design, *, free, scratch_tok, mb):
    """Prompt tokens per user per pass: the explicit `w.prefill_chunk`, else as many as the free
    core memory (activation scratch) and the frame buffer (double-buffered input and output
    frames) allow, at least 1 and at most the prompt."""
    by_mem = floor_ste(jnp.maximum(free, 0.0) / scratch_tok / mb)
    by_fb = floor_ste(d.frame_buffer_bytes / frame_bytes(mb, s.d_model, s.d_model))
    auto = jnp.clip(jnp.minimum(by_mem, by_fb), 1.0, jnp.maximum(w.prompt_tokens, 1.0))
    return jnp.where(w.prefill_chunk > 0, w.prefill_chunk, auto)
