"""Performance, energy and space model of the NorthPole LLM appliance (HPEC24 Table I).

A static, analytic model in pure `jax.numpy`: every quantity is a differentiable function of
the design parameters (`Design`), the workload (`Workload`) and the precision (`Bits`), so
`jax.grad` gives sensitivities and `jax.vmap` evaluates thousands of designs at once.
The equations are written out in docs/performance.md; in short:

Per card (one micro-batch of b tokens through one transformer layer). A layer is a chain of
dependent *phases* (`LAYER_PHASES`: norm, q/k/v, RoPE + KV write, QK^T, softmax, PV, o +
residual, norm, gate/up, SiLU x up, down, residual). Inside a phase the VMMs, the SRAM reads,
the vector and activation units and the NoCs work concurrently (NorthPole's compute, memory
and communication threads), so

    phase_cycles = max(VMM ops / VMM rate at the phase's precision,
                       SRAM bytes read / SRAM bandwidth,
                       vector-unit ops / vector rate, activation-unit ops / AF rate,
                       NoC bytes / NoC bandwidth)                                   (per core)
                   + phase_latency_cycles
    layer_s      = sum(phase_cycles) / clock_hz

with the per-core counts taken from the core-array tiling of every matrix over the grid
(`Kb = ceil(K / rows)`, `Nb = ceil(N / cols)`, as `np_jax.array.array_vmm_cost` counts them).
`phase_latency_cycles` is the one calibrated parameter: the fixed cost of each dependent
phase (pipeline fill of the VMMs and NoCs, synchronisation) that the papers do not give.

Per pipeline (GPipe; M micro-batches of mb = N / M users; a card stage holds one or more
layers, or part of one; the output layer is a group of h cards working in parallel):

    hop_s(bytes)  = bytes / pcie_bytes_s + pcie_latency_s        (Ethernet likewise)
    R             = sum of stage times + output-layer time + every hop + host time  (round trip)
    busy          = the busiest resource per micro-batch (slowest card, a PCIe link, the host)
    decode step   = max(M * busy, R)      (steady state of the token loop: every micro-batch
                                           needs its token back before its next step)
    prefill       = (passes * M - 1) * busy_prefill + R_prefill   (a plain GPipe stream of
                    prompt chunks; the chunk is as large as the free core memory and the frame
                    buffer allow)
    prompt_time   = prefill,  token_gen_time = (gen_tokens - 1) * decode step

Metrics exactly as HPEC24 defines them (spec sec. 7):
    tokens_gen = M * mb * gen_tokens;  T_sys = tokens_gen / (prompt_time + token_gen_time)
    T_card = T_sys / cards;  latency = N / T_sys;  energy = T_card / power_per_card;
    space = T_card / transistors_per_card.

Discrete quantities (tiles per core, cards per layer, output-layer cards, prefill passes) use
straight-through rounding (`ceil_ste`): the forward value is the true integer, the gradient
that of the continuous relaxation. Fitting in core memory is a margin in bytes (>= 0 fits)
that the design-space search turns into a softplus penalty; micro-batch counts are continuous.

Three ways to build the pipeline structure feed the same schedule:
- `evaluate_mapping`: from an `np_jax.mapping.Mapping` (the cards and layers it assigns, the
  memory left in each card's fullest core); `predict` wraps it (used by `np-jax perf`/`run`);
- `evaluate`: the relaxed structure for design-space exploration (np_jax.dse);
- `plan_instance`: the scale-out planner (layers may span several cards; Ethernet hops).

np_jax never imports `models`: model shapes arrive as any object with the `DecoderShape`
attributes (see np_jax.mapping).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from np_jax.quant import PrecisionPolicy, get_policy
from np_jax.spec import APPLIANCE, GPU_POINTS, PUBLISHED_RUN, RACK, ApplianceSpec, RackSpec, sourced, sources

FP16_BYTES = 2
PSUM_BYTES = 4  # int32 partial sums on the partial-sum NoC

LAYER_PHASES = ("attn_norm", "qkv", "rope_kv", "qk", "softmax", "pv", "o_residual", "mlp_norm", "gate_up",
                "silu_mul", "down", "residual")
HEAD_PHASES = ("final_norm", "lm_head")

# Vector-unit (FP16) operations per element, from the emulator's own implementations
# (np_jax.vector_unit): RMSNorm squares, accumulates, scales and multiplies by the gain; a VMM
# result is scaled and requantized; RoPE is two multiplies and an add per element; softmax is
# max, subtract, exp, accumulate and scale; SiLU x up is one activation-unit lookup and one multiply.
VECTOR_OPS_PER_ELEMENT = {"rmsnorm": 4, "residual": 1, "requant": 2, "rope": 3, "softmax": 5, "mul": 1}


# --- straight-through rounding ----------------------------------------------------------------

def ceil_ste(x):
    """`ceil(x)` forward, identity gradient (the continuous relaxation's)."""
    x = jnp.asarray(x, jnp.float32)
    return x + jax.lax.stop_gradient(jnp.ceil(x) - x)


def floor_ste(x):
    """`floor(x)` forward, identity gradient."""
    x = jnp.asarray(x, jnp.float32)
    return x + jax.lax.stop_gradient(jnp.floor(x) - x)


# --- parameters ---------------------------------------------------------------------------------

_REF_CLOCK = APPLIANCE.chip.clock_hz
_SRAM_BITS = 8 * (APPLIANCE.chip.core_array_sram_bytes + APPLIANCE.chip.frame_buffer_bytes)
_SRAM_TRANSISTORS_PER_BIT = 6.0
_LOGIC_PER_CORE = (APPLIANCE.chip.transistors - _SRAM_TRANSISTORS_PER_BIT * _SRAM_BITS) / APPLIANCE.chip.n_cores

# The calibrated parameter (see `calibrate`, docs/performance.md): solved so that the published
# run's predicted system throughput equals HPEC24's 28,356 tokens/s.
CALIBRATED_PHASE_LATENCY_CYCLES = 1627.66


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Design:
    """Hardware and system parameters (all floats, so a `Design` is a differentiable pytree).

    Defaults are the published chip and appliance (np_jax.spec) plus the explicit assumptions and
    the one calibrated parameter; `sources(Design())` lists each with its source.
    """

    clock_hz: float = sourced(_REF_CLOCK, "SCI23 (vision results)", note="not stated for the LLM work; not calibrated")
    n_cores: float = sourced(float(APPLIANCE.chip.n_cores), "SCI23", note="a square grid of sqrt(n) x sqrt(n)")
    sram_per_core_bytes: float = sourced(float(APPLIANCE.chip.core_sram_bytes), "SCI23", note="0.75 MiB")
    frame_buffer_bytes: float = sourced(float(APPLIANCE.chip.frame_buffer_bytes), "SCI23; HPEC24")
    vmm_ops_per_cycle_int8: float = sourced(float(APPLIANCE.chip.vmm_ops_per_cycle_int8), "SCI23",
                                            note="per core; the rate at b bits is this x 8/b (4096 at INT4, 8192 at INT2)")
    sram_bytes_per_cycle_per_core: float = sourced(
        APPLIANCE.chip.memory_bandwidth_bytes_s / APPLIANCE.chip.n_cores / _REF_CLOCK,
        "derived: SCI23 13 TB/s / 256 cores / 400 MHz", note="127 B/cycle; scales with the clock")
    noc_bytes_per_cycle: float = sourced(128.0, "assumption from SCI23",
                                         note=">4096 wires cross each core; split evenly over the 4 NoCs: 1024 bits/cycle each")
    vector_ops_per_cycle_per_core: float = sourced(128.0, "SCI23", note="FP16, 4-way x 32 slices")
    activation_ops_per_cycle_per_core: float = sourced(32.0, "SCI23", note="32 slices")
    phase_latency_cycles: float = sourced(CALIBRATED_PHASE_LATENCY_CYCLES, "calibrated against HPEC24 Table I",
                                          note="fixed cost per dependent phase of a layer (12 per layer)")
    pcie_bytes_s: float = sourced(APPLIANCE.pcie_bytes_s, "HPEC24 sec. III; PCIE3", note="Gen3 x8, per direction")
    pcie_latency_s: float = sourced(2e-6, "assumption", note="per card-to-card DMA transfer (setup + completion)")
    ethernet_bytes_s: float = sourced(RACK.ethernet_bytes_s, "spec sec. 8", note="200 Gb/s")
    ethernet_latency_s: float = sourced(5e-6, "assumption", note="per transfer between servers, incl. the PCIe legs")
    host_s_per_microbatch: float = sourced(10e-6, "assumption",
                                           note="embedding gather, greedy argmax over the logits, loop-back, per micro-batch")
    power_w_per_card_ref: float = sourced(APPLIANCE.power_w_per_card, "HPEC24", note="measured, 672 W / 16 cards")
    static_power_fraction: float = sourced(0.3, "assumption", note="share of the 42 W not proportional to the clock")
    power_clock_exponent: float = sourced(2.0, "assumption",
                                          note="dynamic power ~ clock^2 (voltage rising with frequency); matters only off 400 MHz")
    transistors_per_sram_bit: float = sourced(_SRAM_TRANSISTORS_PER_BIT, "assumption", note="6T SRAM cell")
    logic_transistors_per_core: float = sourced(_LOGIC_PER_CORE, "derived",
                                                note="(22e9 - 6 x 224 MiB x 8) / 256; scales with VMM width")
    ref_clock_hz: float = sourced(_REF_CLOCK, "reference point of the power model (the clock assumed for HPEC24)")
    ref_transistors: float = sourced(APPLIANCE.chip.transistors, "SCI23; HPEC24", note="22e9")

    def replace(self, **kw) -> "Design":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_appliance(cls, appliance: ApplianceSpec = APPLIANCE, **kw) -> "Design":
        c = appliance.chip
        base = dict(clock_hz=c.clock_hz, n_cores=float(c.n_cores), sram_per_core_bytes=float(c.core_sram_bytes),
                    frame_buffer_bytes=float(c.frame_buffer_bytes), vmm_ops_per_cycle_int8=float(c.vmm_ops_per_cycle_int8),
                    sram_bytes_per_cycle_per_core=c.memory_bandwidth_bytes_s / c.n_cores / c.clock_hz,
                    pcie_bytes_s=appliance.pcie_bytes_s, power_w_per_card_ref=appliance.power_w_per_card)
        return cls(**(base | kw))

    def transistors(self):
        """Transistors per chip: SRAM (core memory + frame buffer) plus per-core logic."""
        sram_bits = 8 * (self.n_cores * self.sram_per_core_bytes + self.frame_buffer_bytes)
        logic = self.n_cores * self.logic_transistors_per_core * self.vmm_ops_per_cycle_int8 / 2048.0
        return self.transistors_per_sram_bit * sram_bits + logic

    def power_w_per_card(self):
        """42 W at the reference design; scales with transistors, and its dynamic part with the clock."""
        f = self.clock_hz / self.ref_clock_hz
        scale = self.transistors() / self.ref_transistors
        return self.power_w_per_card_ref * scale * (self.static_power_fraction
                                                    + (1 - self.static_power_fraction) * f ** self.power_clock_exponent)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Workload:
    """What the appliance serves. Floats, so users and micro-batches can be relaxed and swept."""

    users: float = float(PUBLISHED_RUN.users)  # N, the mini-batch
    micro_batches: float = float(PUBLISHED_RUN.micro_batches)  # M
    prompt_tokens: float = float(PUBLISHED_RUN.prompt_tokens)  # P per user
    gen_tokens: float = float(PUBLISHED_RUN.generated_tokens)  # G per user (tok_seq_len)
    cards: float = float(APPLIANCE.cards)  # C, the cards the metrics are normalised by
    context: float = 0.0  # KV-cache positions per user; 0 = prompt + generated
    prefill_chunk: float = 0.0  # prompt tokens per user per pipeline pass; 0 = as many as fit

    def replace(self, **kw) -> "Workload":
        return dataclasses.replace(self, **kw)

    @property
    def micro_batch_size(self):
        return self.users / self.micro_batches

    def context_positions(self):
        return jnp.where(self.context > 0, self.context, self.prompt_tokens + self.gen_tokens)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Bits:
    """Operand widths: layer weights, linear-layer inputs, KV cache, attention matmuls, output layer."""

    w: float = 4.0
    a: float = 4.0
    kv: float = 4.0
    attn: float = 4.0
    head_w: float = 8.0
    head_a: float = 8.0

    def replace(self, **kw) -> "Bits":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_policy(cls, policy: str | PrecisionPolicy) -> "Bits":
        p = get_policy(policy)
        if p.is_float:
            raise ValueError("the chip computes in integers: the model needs a quantized precision (w4a4, a8c8w4, w8a8)")
        r = lambda role: p(f"layers.0.{role}").bits
        w = max(r(f"{m}.w") for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"))
        a = max(r(x) for x in ("attn.x", "attn.o.x", "mlp.x", "mlp.down.x"))
        kv = r("attn.kv")
        attn = max(kv, r("attn.qk.q"), r("attn.probs"))
        return cls(float(w), float(a), float(kv), float(attn), float(p("lm_head.w").bits), float(p("lm_head.x").bits))


@dataclass(frozen=True)
class ModelShape:
    """The decoder dimensions the model needs (static; built from any `DecoderShape`)."""

    name: str
    n_layers: int
    d_model: int
    d_ff: int
    vocab_size: int
    q_dim: int
    kv_dim: int
    n_heads: int
    matrices: tuple[tuple[str, int, int], ...]
    attn_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_decoder(cls, shape) -> "ModelShape":
        if isinstance(shape, ModelShape):
            return shape
        mats = shape.layer_matrices()
        need = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
        missing = [m for m in need if m not in mats]
        if missing:
            raise ValueError(f"{shape.name}: the performance model needs a Llama-family layer; missing {missing}")
        q_dim = mats["attn.q"][1]
        n_heads = getattr(shape, "n_heads", None) or q_dim // getattr(shape, "head_dim", 128)
        return cls(shape.name, int(shape.n_layers), int(shape.d_model), int(shape.d_ff), int(shape.vocab_size),
                   int(q_dim), int(shape.kv_dim), int(n_heads), tuple((m, *map(int, mats[m])) for m in need),
                   bool(getattr(shape, "attn_bias", False)), bool(getattr(shape, "mlp_bias", False)))

    def matrix(self, name: str) -> tuple[int, int]:
        for m, k, n in self.matrices:
            if m == name:
                return k, n
        raise KeyError(name)


# --- per-card work: the phases of one layer -----------------------------------------------------

@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Phases:
    """Per-core counts of a chain of phases (arrays over phases), and what they cost.

    work_cycles: max over the concurrent units (VMM, SRAM, vector, activation, NoC);
    resident_bytes: what the phase keeps in each core's SRAM (weights, KV cache, norm gains).
    """

    vmm_cycles: jax.Array
    sram_cycles: jax.Array
    vector_cycles: jax.Array
    activation_cycles: jax.Array
    noc_cycles: jax.Array
    resident_bytes: jax.Array
    useful_ops: jax.Array  # total (not per core) VMM ops, for the utilisation diagnostic

    @property
    def work_cycles(self):
        return jnp.max(jnp.stack([self.vmm_cycles, self.sram_cycles, self.vector_cycles,
                                  self.activation_cycles, self.noc_cycles]), axis=0)

    def cycles(self, d: Design):
        return self.work_cycles + d.phase_latency_cycles

    def seconds(self, d: Design):
        return jnp.sum(self.cycles(d)) / d.clock_hz


def _grid(d: Design):
    side = jnp.sqrt(d.n_cores)
    return side, side


def _vmm_counts(d: Design, b, k: int, n: int, x_bits, w_bits, *, bias: bool):
    """One [K, N] matrix tiled over the whole grid, b input rows: per-core counts (busiest core)."""
    rows, cols = _grid(d)
    kb, nb = ceil_ste(k / rows), ceil_ste(n / cols)
    bits = jnp.maximum(x_bits, w_bits)
    ops = 2 * b * kb * nb
    return dict(
        vmm=ops * bits / 8 / d.vmm_ops_per_cycle_int8,  # cycles at the wider operand's rate
        weights=kb * nb * w_bits / 8 + (nb * FP16_BYTES if bias else 0.0),  # biases: first core row
        noc=jnp.maximum(PSUM_BYTES * b * nb, b * kb * x_bits / 8),  # partial-sum vs activation NoC, per link
        vector=VECTOR_OPS_PER_ELEMENT["requant"] * b * n / d.n_cores,
        useful=2.0 * b * k * n,
    )


def layer_phases(shape: ModelShape, bits: Bits, d: Design, *, b, mb, users, context, t) -> Phases:
    """The 12 phases of one transformer layer for one micro-batch of `b` tokens from `mb` users.

    `users` x `context` positions of KV cache are resident; each token attends to `t` positions
    (a mean over the run). Decode: b = mb. Prefill: b = mb x chunk.
    """
    s = ModelShape.from_decoder(shape)
    cores = d.n_cores
    v = VECTOR_OPS_PER_ELEMENT
    norm_bytes = s.d_model * FP16_BYTES / cores
    mat = {m: _vmm_counts(d, b, k, n, bits.a, bits.w, bias=s.attn_bias if m.startswith("attn") else s.mlp_bias)
           for m, k, n in s.matrices}

    def total(names, key):
        return sum(mat[m][key] for m in names)

    kv_half_resident = users * context * s.kv_dim * bits.kv / 8 / cores  # K (or V) cache per core
    kv_half_read = mb * t * s.kv_dim * bits.kv / 8 / cores
    attn_vmm = 2 * b * s.q_dim * t * bits.attn / 8 / d.vmm_ops_per_cycle_int8 / cores
    attn_useful = 2.0 * b * s.q_dim * t
    zero = jnp.zeros(())
    # per phase: (vmm cycles, SRAM bytes read, vector ops, activation ops, NoC bytes, resident bytes, useful ops)
    rows = [
        (zero, norm_bytes, v["rmsnorm"] * b * s.d_model / cores, zero, zero, norm_bytes, zero),
        (total(("attn.q", "attn.k", "attn.v"), "vmm"), total(("attn.q", "attn.k", "attn.v"), "weights"),
         total(("attn.q", "attn.k", "attn.v"), "vector"), zero, total(("attn.q", "attn.k", "attn.v"), "noc"),
         total(("attn.q", "attn.k", "attn.v"), "weights"), total(("attn.q", "attn.k", "attn.v"), "useful")),
        (zero, b * 2 * s.kv_dim * bits.kv / 8 / cores, v["rope"] * b * (s.q_dim + s.kv_dim) / cores, zero, zero,
         zero, zero),
        (attn_vmm, kv_half_read, zero, zero, zero, kv_half_resident, attn_useful),
        (zero, zero, v["softmax"] * b * s.n_heads * t / cores, zero, zero, zero, zero),
        (attn_vmm, kv_half_read, zero, zero, zero, kv_half_resident, attn_useful),
        (mat["attn.o"]["vmm"], mat["attn.o"]["weights"], mat["attn.o"]["vector"] + v["residual"] * b * s.d_model / cores,
         zero, mat["attn.o"]["noc"], mat["attn.o"]["weights"], mat["attn.o"]["useful"]),
        (zero, norm_bytes, v["rmsnorm"] * b * s.d_model / cores, zero, zero, norm_bytes, zero),
        (total(("mlp.gate", "mlp.up"), "vmm"), total(("mlp.gate", "mlp.up"), "weights"),
         total(("mlp.gate", "mlp.up"), "vector"), zero, total(("mlp.gate", "mlp.up"), "noc"),
         total(("mlp.gate", "mlp.up"), "weights"), total(("mlp.gate", "mlp.up"), "useful")),
        (zero, zero, (v["mul"] + v["requant"]) * b * s.d_ff / cores, b * s.d_ff / cores, zero, zero, zero),
        (mat["mlp.down"]["vmm"], mat["mlp.down"]["weights"], mat["mlp.down"]["vector"], zero, mat["mlp.down"]["noc"],
         mat["mlp.down"]["weights"], mat["mlp.down"]["useful"]),
        (zero, zero, v["residual"] * b * s.d_model / cores, zero, zero, zero, zero),
    ]
    return _phases(rows, d)


def head_phases(shape: ModelShape, bits: Bits, d: Design, *, b, cols_per_card) -> Phases:
    """One output-layer card: the final norm and its vocabulary slice of the LM head, b tokens."""
    s = ModelShape.from_decoder(shape)
    cores = d.n_cores
    norm_bytes = s.d_model * FP16_BYTES / cores
    m = _vmm_counts(d, b, s.d_model, cols_per_card, bits.head_a, bits.head_w, bias=False)
    zero = jnp.zeros(())
    rows = [
        (zero, norm_bytes, VECTOR_OPS_PER_ELEMENT["rmsnorm"] * b * s.d_model / cores, zero, zero, norm_bytes, zero),
        (m["vmm"], m["weights"], m["vector"], zero, m["noc"], m["weights"], m["useful"]),
    ]
    return _phases(rows, d)


def _phases(rows, d: Design) -> Phases:
    cols = [jnp.stack([jnp.asarray(r[i], jnp.float32) for r in rows]) for i in range(7)]
    vmm, read, vec, af, noc, resident, useful = cols
    return Phases(vmm, read / d.sram_bytes_per_cycle_per_core, vec / d.vector_ops_per_cycle_per_core,
                  af / d.activation_ops_per_cycle_per_core, noc / d.noc_bytes_per_cycle, resident, useful)


def scratch_bytes_per_token(shape: ModelShape, bits: Bits, d: Design):
    """Per-core activation scratch per token in the micro-batch (np_jax.mapping's formula):
    input and output blocks of the largest matrix plus its int32 partial sums."""
    s = ModelShape.from_decoder(shape)
    rows, cols = _grid(d)
    blocks = [(ceil_ste(k / rows), ceil_ste(n / cols)) for _, k, n in s.matrices]
    sizes = jnp.stack([kb * nb for kb, nb in blocks])
    kbs, nbs = jnp.stack([kb for kb, _ in blocks]), jnp.stack([nb for _, nb in blocks])
    i = jnp.argmax(sizes)  # first largest, as the mapper picks it
    return (kbs[i] + nbs[i]) * bits.a / 8 + PSUM_BYTES * nbs[i]


def head_scratch_bytes(shape: ModelShape, bits: Bits, d: Design, cols_per_card, mb):
    s = ModelShape.from_decoder(shape)
    rows, cols = _grid(d)
    kb, nb = ceil_ste(s.d_model / rows), ceil_ste(cols_per_card / cols)
    return mb * (kb + nb) * bits.head_a / 8 + PSUM_BYTES * mb * nb


# --- the pipeline schedule ----------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class Stages:
    """Card-stage times of one regime (decode or one prefill pass), in seconds per micro-batch."""

    sum_s: jax.Array  # all layer stages, in pipeline order (the micro-batch's traversal)
    max_s: jax.Array  # the busiest layer card
    head_s: jax.Array  # the output-layer group (its cards run in parallel)


def schedule(d: Design, w: Workload, *, n_stages, head_cards, dec: Stages, pre: Stages, chunk, frame_bytes_per_token,
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

    to_head = hop(head_cards * mb * frame_bytes_per_token)
    logits = mb * logits_bytes_per_token  # per output-layer card
    back = hop(logits) + ethernet_return * eth(logits) + d.host_s_per_microbatch

    # decode: mb tokens per micro-batch; the token loop closes through the host
    r_dec = dec.sum_s + dec.head_s + chain(mb) + to_head + back
    link_dec = jnp.maximum(head_cards * mb * frame_bytes_per_token, logits) / d.pcie_bytes_s
    busy_dec = jnp.maximum(jnp.maximum(dec.max_s, dec.head_s), jnp.maximum(link_dec, d.host_s_per_microbatch))
    step = jnp.maximum(m * busy_dec, r_dec)
    gen_s = (g - 1) * step

    # prefill: a GPipe stream of passes x M chunks of mb x chunk tokens; the output layer runs
    # once, for the last prompt position (it yields the first generated token)
    passes = ceil_ste(p / chunk)
    f_pre = mb * chunk * frame_bytes_per_token
    r_pre = pre.sum_s + chain(mb * chunk) + to_head + dec.head_s + back
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


def _structure_metrics(d: Design, w: Workload, bits: Bits, s: ModelShape, *, n_stages, layers_max, head_cards,
                       head_cols, free, sum_dec=None, max_dec=None, sum_pre=None, max_pre=None,
                       n_ethernet_hops=0.0, ethernet_return=0.0) -> dict:
    """Layer and output-layer phases -> stage times -> schedule. Stage sums/maxima default to
    identical layers: sum = n_layers x layer time, max = layers_max x layer time."""
    mb = w.users / w.micro_batches
    ctx = w.context_positions()
    dec = layer_phases(s, bits, d, b=mb, mb=mb, users=w.users, context=ctx, t=w.prompt_tokens + w.gen_tokens / 2)
    chunk = _prefill_chunk(w, s, d, free=free, scratch_tok=scratch_bytes_per_token(s, bits, d), mb=mb)
    pre = layer_phases(s, bits, d, b=mb * chunk, mb=mb, users=w.users, context=ctx, t=w.prompt_tokens / 2)
    head = head_phases(s, bits, d, b=mb, cols_per_card=head_cols)
    td, tp, th = dec.seconds(d), pre.seconds(d), head.seconds(d)
    dec_st = Stages(s.n_layers * td if sum_dec is None else sum_dec, layers_max * td if max_dec is None else max_dec, th)
    pre_st = Stages(s.n_layers * tp if sum_pre is None else sum_pre, layers_max * tp if max_pre is None else max_pre, th)
    out = schedule(d, w, n_stages=n_stages, head_cards=head_cards, dec=dec_st, pre=pre_st, chunk=chunk,
                   frame_bytes_per_token=s.d_model * FP16_BYTES, logits_bytes_per_token=head_cols * FP16_BYTES,
                   n_ethernet_hops=n_ethernet_hops, ethernet_return=ethernet_return)
    peak = d.n_cores * d.vmm_ops_per_cycle_int8 * 8 / jnp.maximum(bits.a, bits.w) * d.clock_hz
    return out | {
        "layer_ms_decode": 1e3 * td, "head_ms_decode": 1e3 * th, "layer_ms_prefill": 1e3 * tp,
        "vmm_utilisation_decode": jnp.sum(dec.useful_ops) / td / peak,
        "layer_work_cycles_decode": jnp.sum(dec.work_cycles),
        "layer_latency_cycles": d.phase_latency_cycles * len(LAYER_PHASES),
    }


# --- relaxed structure (design-space exploration) -----------------------------------------------

MAX_HEAD_CARDS = 64


def head_need_bytes(shape: ModelShape, bits: Bits, d: Design, h, mb):
    """Bytes in the fullest core of an output-layer card when the vocabulary is split over h cards."""
    s = ModelShape.from_decoder(shape)
    rows, cols = _grid(d)
    c = ceil_ste(s.vocab_size / h)
    weights = ceil_ste(s.d_model / rows) * ceil_ste(c / cols) * bits.head_w / 8
    return weights + s.d_model * FP16_BYTES / d.n_cores + head_scratch_bytes(s, bits, d, c, mb)


def head_cards_relaxed(shape: ModelShape, bits: Bits, d: Design, mb):
    """(h, vocabulary columns per card, bytes in its fullest core): the fewest output-layer cards
    (up to MAX_HEAD_CARDS) whose slices fit, as np_jax.mapping.head_cards_needed chooses them.
    Forward exact; the gradient is that of h = head weight bytes per core / room per core."""
    s = ModelShape.from_decoder(shape)
    hs = jnp.arange(1, MAX_HEAD_CARDS + 1, dtype=jnp.float32)
    needs = jax.vmap(lambda hh: head_need_bytes(s, bits, d, hh, mb))(hs)
    fits = needs <= d.sram_per_core_bytes
    h_exact = jnp.where(jnp.any(fits), hs[jnp.argmax(fits)], float(MAX_HEAD_CARDS))
    norm = s.d_model * FP16_BYTES / d.n_cores
    head_w = s.d_model * s.vocab_size * bits.head_w / 8 / d.n_cores
    room = d.sram_per_core_bytes - norm - head_scratch_bytes(s, bits, d, s.vocab_size / h_exact, mb)
    h_relaxed = head_w / jnp.maximum(room, 1.0)
    h = h_relaxed + jax.lax.stop_gradient(h_exact - h_relaxed)
    return h, s.vocab_size / h, head_need_bytes(s, bits, d, h, mb)


def relaxed_structure(d: Design, w: Workload, bits: Bits, shape) -> dict:
    """The pipeline structure as a differentiable function of the design.

    The output layer takes the fewest cards whose vocabulary slices fit (`head_cards_relaxed`);
    the other C - h cards take ceil(layers / cards) layers each or, with more cards than layers, each layer
    spans floor(cards / layers) cards (its work and memory split evenly). Margin: bytes left in
    the fullest core (a layer card's or an output-layer card's); >= 0 fits.
    """
    s = ModelShape.from_decoder(shape)
    mb = w.users / w.micro_batches
    ctx = w.context_positions()
    dec = layer_phases(s, bits, d, b=mb, mb=mb, users=w.users, context=ctx, t=w.prompt_tokens + w.gen_tokens / 2)
    resident = jnp.sum(dec.resident_bytes)
    h, cols_h, head_need = head_cards_relaxed(s, bits, d, mb)
    layer_cards = jnp.maximum(w.cards - h, 1.0)
    share = jnp.where(layer_cards <= s.n_layers, ceil_ste(s.n_layers / layer_cards),
                      1.0 / jnp.maximum(floor_ste(layer_cards / s.n_layers), 1.0))
    need = share * resident + mb * scratch_bytes_per_token(s, bits, d)
    margin = jnp.minimum(d.sram_per_core_bytes - need, d.sram_per_core_bytes - head_need)
    return {"n_stages": s.n_layers / share, "layers_max": share, "head_cards": h, "head_cols": cols_h,
            "free": d.sram_per_core_bytes - share * resident, "fits_margin_bytes": margin}


def evaluate(d: Design, w: Workload, bits: Bits, shape) -> dict:
    """All metrics for a design with the relaxed structure (pure jnp; jit/grad/vmap-able).

    Adds `fits_margin_bytes` (>= 0: fits), `fits` (0/1), `head_cards`, `layers_per_card`.
    """
    s = ModelShape.from_decoder(shape)
    st = relaxed_structure(d, w, bits, s)
    out = _structure_metrics(d, w, bits, s, n_stages=st["n_stages"], layers_max=st["layers_max"],
                             head_cards=st["head_cards"], head_cols=st["head_cols"], free=st["free"])
    return out | {"fits_margin_bytes": st["fits_margin_bytes"], "fits": jnp.where(st["fits_margin_bytes"] >= 0, 1.0, 0.0),
                  "head_cards": st["head_cards"], "layers_per_card": st["layers_max"]}


def _prefill_chunk(w: Workload, s: ModelShape, d: Design, *, free, scratch_tok, mb):
    """Prompt tokens per user per pass: the explicit `w.prefill_chunk`, else as many as the free
    core memory (activation scratch) and the frame buffer (double-buffered input and output
    frames) allow, at least 1 and at most the prompt."""
    by_mem = floor_ste(jnp.maximum(free, 0.0) / scratch_tok / mb)
    by_fb = floor_ste(d.frame_buffer_bytes / (2 * 2 * s.d_model * FP16_BYTES) / mb)
    auto = jnp.clip(jnp.minimum(by_mem, by_fb), 1.0, jnp.maximum(w.prompt_tokens, 1.0))
    return jnp.where(w.prefill_chunk > 0, w.prefill_chunk, auto)


# --- from a mapping (the work np_jax.mapping actually assigns) ------------------------------------

def mapping_structure(mapping) -> dict:
    """What the performance model reads from an `np_jax.mapping.Mapping`: layer stages, the
    most layers on one card, output-layer cards and their widest vocabulary slice, and the bytes
    left in the fullest core of a layer card once weights and KV cache are placed."""
    lcards = mapping.layer_cards
    if not lcards:
        raise ValueError("the mapping has no layer cards")
    free = []
    for c in lcards:
        act = sum((a.bytes_RxC for a in c.memory.allocations if a.kind == "activations"), 0)
        free.append(int((c.memory.capacity_bytes - (c.memory.used_RxC - act)).min()))
    heads = mapping.head_cards
    return {
        "n_stages": len(lcards),
        "layers_max": max(len(c.layers) for c in lcards),
        "n_layers": sum(len(c.layers) for c in lcards),
        "head_cards": len(heads),
        "head_cols": max((c.vocab_slice[1] - c.vocab_slice[0]) for c in heads) if heads else 0,
        "free": min(free),
        "cards": len(mapping.cards),
    }


@jax.jit
def _jit_structure(d, w, bits, s, n_stages, layers_max, head_cards, head_cols, free):
    return _structure_metrics(d, w, bits, s, n_stages=n_stages, layers_max=layers_max, head_cards=head_cards,
                              head_cols=head_cols, free=free)


def evaluate_mapping(mapping, shape, w: Workload | None = None, d: Design | None = None) -> dict:
    """Metrics for a mapping: stage work from its cards' layers, memory left from its ledgers."""
    s = ModelShape.from_decoder(shape)
    st = mapping_structure(mapping)
    if st["n_layers"] != s.n_layers:
        raise ValueError(f"the mapping holds {st['n_layers']} layers, {s.name} has {s.n_layers}")
    if not st["head_cards"]:
        raise ValueError("the mapping has no output-layer card")
    bits = Bits.from_policy(mapping.policy)
    d = d or Design.from_appliance(mapping.appliance)
    w = (w or Workload()).replace(users=float(mapping.users), micro_batches=float(mapping.micro_batches),
                                  cards=float(st["cards"]), context=float(mapping.context))
    return _jit_structure(d, w, bits, s, *(float(st[k]) for k in ("n_stages", "layers_max", "head_cards", "head_cols",
                                                                   "free")))


jax.tree_util.register_static(ModelShape)


# --- the user-facing prediction -------------------------------------------------------------------

def _floats(tree: dict) -> dict:
    out = {}
    for k, v in tree.items():
        a = np.asarray(v)
        out[k] = a.tolist() if a.ndim else float(a)
    return out


def predict(shape, policy: str | PrecisionPolicy = "w4a4", *, users: int = PUBLISHED_RUN.users,
            micro_batches: int | None = None, prompt_tokens: int = PUBLISHED_RUN.prompt_tokens,
            gen_tokens: int = PUBLISHED_RUN.generated_tokens, cards: int | None = None, context: int | None = None,
            prefill_chunk: int | None = None, head_cards: int | None = None, appliance: ApplianceSpec = APPLIANCE,
            design: Design | None = None) -> dict:
    """Predicted NorthPole appliance figures for a run: maps `shape` (np_jax.mapping.map_model,
    non-strict) and evaluates the mapping. Returns plain floats: the HPEC24 metrics
    (`system_throughput_tok_s`, `throughput_tok_s_card`, `latency_ms`, `energy_tok_s_W`,
    `space_tok_s_per_transistor`), the decode inter-token time, prompt and generation times,
    and the mapping facts (`fits`, `error`, `cards`, ...). `context` defaults to prompt + generated.
    """
    from np_jax.mapping import map_model

    for name, val in (("users", users), ("prompt_tokens", prompt_tokens), ("gen_tokens", gen_tokens)):
        if val is None or int(val) < 1:
            raise ValueError(f"{name} must be >= 1, got {val}")
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    policy = get_policy(policy)
    ctx = int(context or (prompt_tokens + gen_tokens))
    if ctx < prompt_tokens + gen_tokens:
        raise ValueError(f"a context of {ctx} positions cannot hold {prompt_tokens} prompt + {gen_tokens} generated tokens")
    m = map_model(shape, policy, users=users, context=ctx, cards=cards, micro_batches=micro_batches,
                  head_cards=head_cards, appliance=appliance, strict=False)
    s = ModelShape.from_decoder(shape)
    w = Workload(float(users), float(m.micro_batches), float(prompt_tokens), float(gen_tokens), float(len(m.cards)),
                 float(ctx), float(prefill_chunk or 0))
    out = _floats(evaluate_mapping(m, s, w, design or Design.from_appliance(appliance)))
    st = mapping_structure(m)
    return out | {"model": s.name, "precision": policy.name, "users": users, "micro_batches": m.micro_batches,
                  "micro_batch_size": m.micro_batch_size, "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
                  "context": ctx, "cards": len(m.cards), "layer_cards": st["n_stages"],
                  "layers_per_card": st["layers_max"], "head_cards": st["head_cards"], "fits": m.fits,
                  "error": m.first_error(), "mapping": m.one_line()}


# --- calibration ------------------------------------------------------------------------------------

def calibrate(shape, target_tok_s: float = PUBLISHED_RUN.system_throughput_tok_s, *, design: Design | None = None,
              iters: int = 40) -> float:
    """The `phase_latency_cycles` at which the published run's predicted T_sys equals `target_tok_s`.

    Bisection on the published mapping (T_sys falls monotonically as the latency grows).
    `shape` is the granite-3b-northpole config (models.config), passed in by the caller.
    """
    from np_jax.mapping import map_model

    d0 = design or Design()
    r = PUBLISHED_RUN
    m = map_model(shape, "w4a4", users=r.users, context=r.prompt_tokens + r.generated_tokens,
                  micro_batches=r.micro_batches)
    s = ModelShape.from_decoder(shape)
    w = Workload()

    def tsys(lat):
        return float(evaluate_mapping(m, s, w, d0.replace(phase_latency_cycles=lat))["system_throughput_tok_s"])

    lo, hi = 0.0, 1e5
    if tsys(lo) < target_tok_s:
        raise ValueError(f"even with no phase latency the model predicts {tsys(lo):.0f} tok/s < {target_tok_s:.0f}")
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tsys(mid) > target_tok_s else (lo, mid)
    return (lo + hi) / 2


def published_comparison(pred: dict) -> dict:
    """Residuals of a prediction against HPEC24's NorthPole row (relative, predicted / published - 1)."""
    r = PUBLISHED_RUN
    pub = {"system_throughput_tok_s": r.system_throughput_tok_s, "latency_ms": r.latency_ms,
           "energy_tok_s_W": r.energy_tok_s_w, "space_tok_s_per_1e9_transistors": r.space_tok_s_per_1e9_transistors}
    return {k: {"published": v, "predicted": pred[k], "residual": pred[k] / v - 1} for k, v in pub.items()}


def gpu_table(pred: dict) -> list[dict]:
    """Table I: NorthPole (predicted) against the GPU points, with the ratios NorthPole / GPU
    (latency: GPU latency / NorthPole latency, so > 1 means NorthPole is faster)."""
    rows = []
    space_np = pred["space_tok_s_per_transistor"]
    for p in GPU_POINTS.values():
        row = {"point": p.name, "gpu": p.gpu, "node_nm": p.node_nm, "meaning": p.meaning,
               "throughput_tok_s_card": p.throughput_tok_s_card, "latency_ms": p.latency_ms,
               "energy_tok_s_W": p.energy_tok_s_w, "space_tok_s_per_1e9_transistors": 1e9 * p.space_tok_s_per_transistor,
               "ratio_throughput": pred["throughput_tok_s_card"] / p.throughput_tok_s_card,
               "ratio_latency": p.latency_ms / pred["latency_ms"],
               "ratio_energy": pred["energy_tok_s_W"] / p.energy_tok_s_w if p.energy_tok_s_w else None,
               "ratio_space": space_np / p.space_tok_s_per_transistor,
               "stated_ratios": dict(p.stated_ratios)}
        rows.append(row)
    return rows


def parameters(d: Design | None = None) -> dict:
    """Every model parameter with its value, source and note."""
    return sources(d or Design())


# --- scale-out planner ------------------------------------------------------------------------------

def pack_layer(resident, work, capacity: float, latency: float) -> list[float]:
    """Fill cards with one layer's phases in order, splitting a phase (a matrix by columns, the KV
    cache by heads) where a card is full. Returns each card's cycles: a split phase's work is
    shared in proportion to its bytes, and every part pays the full phase latency."""
    cards, used, cyc = [], 0.0, 0.0
    tol = 1e-6 * capacity
    for res, wk in zip(map(float, resident), map(float, work)):
        left = res
        while left > capacity - used + tol:
            part = capacity - used
            if part > tol:
                cyc += wk * part / res + latency
                left -= part
            cards.append(cyc)
            used, cyc = 0.0, 0.0
        used += left
        cyc += (wk * left / res if res > 0 else wk) + latency
    cards.append(cyc)
    return cards


def plan_instance(shape, policy: str | PrecisionPolicy = "a8c8w4", *, users: int = 28, context: int = 2048,
                  micro_batches: int | None = None, prompt_tokens: int | None = None, gen_tokens: int | None = None,
                  total_cards: int | None = None, cards_per_server: int | None = None, rack: RackSpec = RACK,
                  design: Design | None = None) -> dict:
    """Smallest pipeline of cards that holds one instance of `shape`, how many fit, what each delivers.

    Layer-aligned mapping: a card holds as many whole layers as fit, or part of exactly one
    layer; a layer too big for one card is split evenly over the fewest cards that hold it
    (`pack_layer`: phases in order, split where a card is full). The output layer takes the
    fewest cards whose vocabulary slices fit. Instances are laid out one after another over
    servers of `cards_per_server`: a card-to-card hop between servers goes over Ethernet, and an
    instance spanning servers returns its logits to its first server's host over Ethernet.
    `micro_batches` defaults to the divisor of `users` with the highest throughput; prompt and
    generated tokens default to half the context each.
    """
    s = ModelShape.from_decoder(shape)
    policy = get_policy(policy)
    bits = Bits.from_policy(policy)
    d = design or Design()
    total = int(total_cards or rack.cards)
    per_server = int(cards_per_server or rack.cards_per_server)
    if users < 1 or context < 2:
        raise ValueError(f"users must be >= 1 and context >= 2, got {users} and {context}")
    if total < 2 or per_server < 1:
        raise ValueError(f"need at least 2 cards and 1 card per server, got {total} and {per_server}")
    prompt = int(prompt_tokens or context // 2)
    gen = int(gen_tokens or context - prompt)
    if prompt < 1 or gen < 1 or prompt + gen > context:
        raise ValueError(f"{prompt} prompt + {gen} generated tokens do not fit a context of {context}")
    if micro_batches is not None and (micro_batches < 1 or users % micro_batches):
        raise ValueError(f"{users} users cannot be split into {micro_batches} equal micro-batches")
    choices = [micro_batches] if micro_batches else [m for m in range(1, users + 1) if users % m == 0]
    plans = [_plan(s, bits, d, users, context, m, prompt, gen, total, per_server) for m in choices]
    fitting = [p for p in plans if isinstance(p, dict)]
    if not fitting:
        # the most micro-batches (smallest micro-batch, least activation scratch) needs the fewest cards
        raise ValueError(f"{s.name} at {policy.name} for {users} users x {context} positions: {plans[-1]}")
    best = max(fitting, key=lambda p: p["system_throughput_tok_s"])
    return best | {"model": s.name, "precision": policy.name, "micro_batches_tried": choices}


def _plan(s: ModelShape, bits: Bits, d: Design, users, context, m, prompt, gen, total, per_server):
    """One micro-batch count: the plan as a dict, or the reason it does not fit (a string)."""
    mb = users / m
    w = Workload(float(users), float(m), float(prompt), float(gen), 1.0, float(context))
    cap = float(d.sram_per_core_bytes)
    lat = float(d.phase_latency_cycles)
    scratch_tok = float(scratch_bytes_per_token(s, bits, d))
    room = cap - mb * scratch_tok
    dec = layer_phases(s, bits, d, b=mb, mb=mb, users=users, context=context, t=prompt + gen / 2)
    res = np.asarray(dec.resident_bytes, np.float64)
    layer_bytes = float(res.sum())
    if room <= 0:
        return f"one micro-batch's activations ({mb * scratch_tok:,.0f} B per core) exceed the core memory"
    h = cols = None
    for hh in range(1, total + 1):
        c = math.ceil(s.vocab_size / hh)
        need = float(jnp.sum(head_phases(s, bits, d, b=mb, cols_per_card=c).resident_bytes)
                     + head_scratch_bytes(s, bits, d, c, mb))
        if need <= cap:
            h, cols = hh, c
            break
    if h is None:
        return f"the output layer does not fit on {total} cards"
    if layer_bytes <= room:
        per_card = int(room // layer_bytes)
        n_stages = math.ceil(s.n_layers / per_card)
        layers_max = math.ceil(s.n_layers / n_stages)
        cards_per_layer = 1
        free = cap - layers_max * layer_bytes
    else:
        per_card, layers_max = 0, 0
        cards_per_layer = math.ceil(layer_bytes / room)
        n_stages = s.n_layers * cards_per_layer
        free = cap - layer_bytes / cards_per_layer
    n_cards = n_stages + h
    if n_cards > total:
        return f"one instance needs {n_cards} cards, more than the {total} available"
    instances = total // n_cards
    crossings = []
    for i in range(instances):  # instance i occupies cards [i n, (i + 1) n)
        a, b = i * n_cards, (i + 1) * n_cards - 1
        crossings.append(b // per_server - a // per_server)
    n_eth = max(crossings)  # the worst instance

    chunk = float(_prefill_chunk(w, s, d, free=free, scratch_tok=scratch_tok, mb=mb))
    extra = {}
    if cards_per_layer > 1:  # stage times from the packing of one layer's phases
        for tag, b, t in (("dec", mb, prompt + gen / 2), ("pre", mb * chunk, prompt / 2)):
            work = np.asarray(layer_phases(s, bits, d, b=b, mb=mb, users=users, context=context, t=t).work_cycles)
            cyc = pack_layer(res, work, layer_bytes / cards_per_layer, lat)
            extra[f"sum_{tag}"] = s.n_layers * sum(cyc) / float(d.clock_hz)
            extra[f"max_{tag}"] = max(cyc) / float(d.clock_hz)
    out = _floats(_structure_metrics(
        d, w.replace(cards=float(n_cards)), bits, s, n_stages=float(n_stages), layers_max=float(layers_max),
        head_cards=float(h), head_cols=float(cols), free=free, n_ethernet_hops=float(n_eth),
        ethernet_return=float(n_eth > 0), **{k: jnp.float32(v) for k, v in extra.items()}))
    return out | {
        "cards_per_instance": n_cards, "instances": instances, "cards_used": instances * n_cards,
        "total_cards": total, "cards_per_server": per_server, "layer_cards": n_stages, "head_cards": h,
        "layers_per_card": per_card, "cards_per_layer": cards_per_layer, "ethernet_hops": n_eth,
        "users": users, "context": context, "micro_batches": m, "micro_batch_size": mb,
        "prompt_tokens": prompt, "gen_tokens": gen, "layer_bytes_per_core": layer_bytes,
        "core_bytes": cap, "throughput_tok_s_instance": out["system_throughput_tok_s"],
        "throughput_tok_s_rack": instances * out["system_throughput_tok_s"],
    }


# --- figures (HPEC24 Figs. 1 and 2 style) -----------------------------------------------------------

def plot_figures(pred: dict, out_dir: str, curve: list[dict] | None = None) -> list[str]:
    """Write `fig1_energy_vs_latency.png` and `fig2_throughput_vs_latency.png` to `out_dir`:
    NorthPole (predicted, and HPEC24's measured row) beside the GPU points, log axes. `curve`:
    optional further NorthPole predictions (e.g. a sweep over users) drawn as a line."""
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    r = PUBLISHED_RUN
    pub = {"latency_ms": r.latency_ms, "energy_tok_s_W": r.energy_tok_s_w,
           "throughput_tok_s_card": r.system_throughput_tok_s / APPLIANCE.cards}
    paths = []
    for fname, key, ylabel, title in (
            ("fig1_energy_vs_latency.png", "energy_tok_s_W", "energy metric (tokens/s/W)", "Energy metric vs latency"),
            ("fig2_throughput_vs_latency.png", "throughput_tok_s_card", "throughput per card (tokens/s/card)",
             "Throughput per card vs latency")):
        fig, ax = plt.subplots(figsize=(5.2, 3.9))
        colors = {"H100": "tab:green", "A100": "tab:orange", "L4": "tab:purple"}
        for p in GPU_POINTS.values():
            y = p.energy_tok_s_w if key == "energy_tok_s_W" else p.throughput_tok_s_card
            if y is None:
                continue
            ax.scatter(p.latency_ms, y, s=36, color=colors.get(p.gpu, "gray"), zorder=3)
            ax.annotate(f"{p.name} {p.gpu}", (p.latency_ms, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        if curve:
            pts = sorted(curve, key=lambda c: c["latency_ms"])
            ax.plot([c["latency_ms"] for c in pts], [c[key] for c in pts], "-", color="tab:blue", lw=1, alpha=0.6,
                    label="NorthPole predicted, other users")
            ax.scatter([c["latency_ms"] for c in pts], [c[key] for c in pts], s=10, color="tab:blue", alpha=0.6)
        ax.scatter(pub["latency_ms"], pub[key], marker="s", s=60, facecolors="none", edgecolors="k", zorder=4,
                   label="NorthPole HPEC24 (measured)")
        ax.scatter(pred["latency_ms"], pred[key], marker="*", s=120, color="tab:red", zorder=5,
                   label="NorthPole predicted (this model)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("latency (ms/token, per user)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}: {pred.get('model', '')} {pred.get('precision', '')}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
