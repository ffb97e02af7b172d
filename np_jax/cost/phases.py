"""Per-card work: the phases of one transformer layer and of an output-layer card.

A layer is a chain of dependent phases (`LAYER_PHASES`, from the mapping: norm, q/k/v, RoPE +
KV write, QK^T, softmax, PV, o + residual, norm, gate/up, SiLU x up, down, residual). Inside a
phase the VMMs, the SRAM reads, the vector and activation units and the NoCs work concurrently
(NorthPole's compute, memory and communication threads), so a phase costs the busiest unit's
cycles plus the calibrated `phase_latency_cycles`. Per-core counts come from the chip's own
formulas (`array.tile_blocks`, `core.block_work`) and the mapping's placement rules, written
as plain arithmetic so they run on the relaxed (traced) design of the DSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from np_jax.appliance.mapping import LAYER_PHASES, kv_cache_bytes, largest_block, phase_active, scratch_bytes
from np_jax.chip.array import tile_blocks
from np_jax.chip.core import block_work
from np_jax.chip.vector_unit import FP16_BYTES
from np_jax.cost.params import Bits, Design, ModelShape, ceil_ste
from np_jax.spec import vmm_ops_per_cycle

PHASE_NAMES = tuple(name for name, _ in LAYER_PHASES)

# Vector-unit (FP16) operations per element, from the emulator's own implementations
# (np_jax.chip.vector_unit): RMSNorm squares, accumulates, scales and multiplies by the gain; a VMM
# result is scaled and requantized; RoPE is two multiplies and an add per element; softmax is
# max, subtract, exp, accumulate and scale; SiLU x up is one activation-unit lookup and one multiply;
# an online rotation's input, and a linear input with a dynamic step, take a max-reduce per vector.
VECTOR_OPS_PER_ELEMENT = {"rmsnorm": 4, "residual": 1, "requant": 2, "rope": 3, "softmax": 5, "mul": 1, "max": 1}


def _exact(x):  # the relaxed model counts fractional bytes (no packing ceil)
    return x


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
    active: jax.Array  # 1 for a phase the layer runs, 0 for one it lacks (no work, no latency)

    @property
    def work_cycles(self):
        return jnp.max(jnp.stack([self.vmm_cycles, self.sram_cycles, self.vector_cycles,
                                  self.activation_cycles, self.noc_cycles]), axis=0)

    def cycles(self, d: Design):
        return self.work_cycles + d.phase_latency_cycles * self.active

    def seconds(self, d: Design):
        return jnp.sum(self.cycles(d)) / d.clock_hz


def _grid(d: Design):
    side = jnp.sqrt(d.n_cores)
    return side, side


def _vmm_counts(d: Design, b, k: int, n: int, x_bits, w_bits, *, bias: bool):
    """One [K, N] matrix tiled over the whole grid, b input rows: per-core counts (busiest core),
    from the chip's own formulas (`array.tile_blocks`, `core.block_work`)."""
    rows, cols = _grid(d)
    kb, nb = tile_blocks(k, n, rows, cols, ceil_ste)
    w = block_work(b, kb, nb, x_bits, w_bits, d.vmm_ops_per_cycle_int8)
    return dict(
        vmm=w["vmm_cycles"],  # cycles at the wider operand's rate
        weights=w["weight_bytes"] + (nb * FP16_BYTES if bias else 0.0),  # biases: first core row
        noc=jnp.maximum(w["psum_bytes"], w["input_bytes"]),  # partial-sum vs activation NoC, per link
        vector=VECTOR_OPS_PER_ELEMENT["requant"] * b * n / d.n_cores,
        useful=2.0 * b * k * n,
    )


def layer_phases(shape: ModelShape, bits: Bits, d: Design, *, b, mb, users, context, t) -> Phases:
    """The phases of one transformer layer (LAYER_PHASES) for one micro-batch of `b` tokens from
    `mb` users.

    `users` x `context` positions of KV cache are resident; each token attends to `t` positions
    (a mean over the run). Decode: b = mb. Prefill: b = mb x chunk.
    """
    s = ModelShape.from_decoder(shape)
    cores = d.n_cores
    v = VECTOR_OPS_PER_ELEMENT
    norm_bytes = s.d_model * FP16_BYTES / cores
    mat = {m: _vmm_counts(d, b, k, n, bits.a, bits.w, bias=s.attn_bias if m.startswith("attn") else s.mlp_bias)
           for m, k, n in s.matrices}
    # the online rotations: `rows` vectors per token through a ±1 matrix, INT8 inputs x INT2 weights
    mat |= {m: _vmm_counts(d, b * rows, k, n, bits.rot_a, bits.rot_w, bias=False) for m, k, n, rows in s.online}
    for m, k, n, rows in s.online:  # the dynamic step: a max over each input vector
        mat[m]["vector"] = mat[m]["vector"] + v["max"] * b * rows * k / cores
    k_in = {m: k for m, k, n in s.matrices}
    for flag, (_, m) in Bits.DYNAMIC_INPUTS.items():  # a linear input's dynamic step per token, likewise
        mat[m]["vector"] = mat[m]["vector"] + getattr(bits, flag) * v["max"] * b * k_in[m] / cores

    def total(names, key):
        return sum(mat[m][key] for m in names)

    kv_half_resident = kv_cache_bytes(users, context, s.kv_dim, bits.kv, ceil=_exact) / 2 / cores  # K (or V) per core
    kv_half_read = kv_cache_bytes(mb, t, s.kv_dim, bits.kv, ceil=_exact) / 2 / cores
    attn_vmm = 2 * b * s.q_dim * t / vmm_ops_per_cycle(d.vmm_ops_per_cycle_int8, bits.attn) / cores
    attn_useful = 2.0 * b * s.q_dim * t
    zero = jnp.zeros(())

    def rot(m):  # an online rotation's phase (all zero when the layer has none)
        if m not in mat:
            return (zero,) * 7
        r = mat[m]
        return r["vmm"], r["weights"], r["vector"], zero, r["noc"], r["weights"], r["useful"]

    # per phase: (vmm cycles, SRAM bytes read, vector ops, activation ops, NoC bytes, resident bytes, useful ops)
    rows = [
        (zero, norm_bytes, v["rmsnorm"] * b * s.d_model / cores, zero, zero, norm_bytes, zero),
        (total(("attn.q", "attn.k", "attn.v"), "vmm"), total(("attn.q", "attn.k", "attn.v"), "weights"),
         total(("attn.q", "attn.k", "attn.v"), "vector"), zero, total(("attn.q", "attn.k", "attn.v"), "noc"),
         total(("attn.q", "attn.k", "attn.v"), "weights"), total(("attn.q", "attn.k", "attn.v"), "useful")),
        (zero, b * 2 * s.kv_dim * bits.kv / 8 / cores, v["rope"] * b * (s.q_dim + s.kv_dim) / cores, zero, zero,
         zero, zero),
        rot("attn.rot"),
        (attn_vmm, kv_half_read, zero, zero, zero, kv_half_resident, attn_useful),
        (zero, zero, (v["softmax"] + bits.probs_dynamic * v["max"]) * b * s.n_heads * t / cores, zero, zero, zero,
         zero),
        (attn_vmm, kv_half_read, zero, zero, zero, kv_half_resident, attn_useful),
        (mat["attn.o"]["vmm"], mat["attn.o"]["weights"], mat["attn.o"]["vector"] + v["residual"] * b * s.d_model / cores,
         zero, mat["attn.o"]["noc"], mat["attn.o"]["weights"], mat["attn.o"]["useful"]),
        (zero, norm_bytes, v["rmsnorm"] * b * s.d_model / cores, zero, zero, norm_bytes, zero),
        (total(("mlp.gate", "mlp.up"), "vmm"), total(("mlp.gate", "mlp.up"), "weights"),
         total(("mlp.gate", "mlp.up"), "vector"), zero, total(("mlp.gate", "mlp.up"), "noc"),
         total(("mlp.gate", "mlp.up"), "weights"), total(("mlp.gate", "mlp.up"), "useful")),
        (zero, zero, (v["mul"] + v["requant"]) * b * s.d_ff / cores, b * s.d_ff / cores, zero, zero, zero),
        rot("mlp.rot.1"), rot("mlp.rot.0"),
        (mat["mlp.down"]["vmm"], mat["mlp.down"]["weights"], mat["mlp.down"]["vector"], zero, mat["mlp.down"]["noc"],
         mat["mlp.down"]["weights"], mat["mlp.down"]["useful"]),
        (zero, zero, v["residual"] * b * s.d_model / cores, zero, zero, zero, zero),
    ]
    return _phases(rows, d, phase_active(s))


def output_phases(shape: ModelShape, bits: Bits, d: Design, *, b, cols_per_card) -> Phases:
    """One output-layer card: the final norm and its vocabulary slice of the LM head, b tokens."""
    s = ModelShape.from_decoder(shape)
    cores = d.n_cores
    norm_bytes = s.d_model * FP16_BYTES / cores
    m = _vmm_counts(d, b, s.d_model, cols_per_card, bits.out_a, bits.out_w, bias=False)
    zero = jnp.zeros(())
    rows = [
        (zero, norm_bytes, VECTOR_OPS_PER_ELEMENT["rmsnorm"] * b * s.d_model / cores, zero, zero, norm_bytes, zero),
        (m["vmm"], m["weights"], m["vector"], zero, m["noc"], m["weights"], m["useful"]),
    ]
    return _phases(rows, d)


def _phases(rows, d: Design, active=None) -> Phases:
    cols = [jnp.stack([jnp.asarray(r[i], jnp.float32) for r in rows]) for i in range(7)]
    vmm, read, vec, af, noc, resident, useful = cols
    act = jnp.ones(len(rows), jnp.float32) if active is None else jnp.asarray(active, jnp.float32)
    return Phases(vmm, read / d.sram_bytes_per_cycle_per_core, vec / d.vector_ops_per_cycle_per_core,
                  af / d.activation_ops_per_cycle_per_core, noc / d.noc_bytes_per_cycle, resident, useful, act)


def scratch_bytes_per_token(shape: ModelShape, bits: Bits, d: Design):
    """Per-core activation scratch per token of a micro-batch (np_jax.appliance.mapping's rule:
    input and output blocks of the largest matrix plus its int32 partial sums)."""
    s = ModelShape.from_decoder(shape)
    rows, cols = _grid(d)
    kb, nb = largest_block([tile_blocks(k, n, rows, cols, ceil_ste) for _, k, n in s.matrices], jnp)
    return scratch_bytes(1.0, kb, nb, bits.a, ceil=_exact)
