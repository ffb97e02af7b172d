"""Parameters of the performance model: the design (chip and system), the workload, the
operand widths, the model's static shape, and the straight-through rounding of discrete counts.

Every `Design` field is a float with its source (`sources(Design())`), so a `Design` is a
differentiable pytree. Concrete values are validated when a record is built from numbers (a
number, positive and finite; widths the chip's VMM supports; no more micro-batches than users);
traced values (jit, grad, vmap of the design-space search) are not.

`ModelShape.name` is a label only: it takes no part in equality or hashing, so models with the
same dimensions share one compiled cost model (the shape is a static jit argument).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from np_jax.appliance.mapping import online_matrices
from np_jax.chip import SUPPORTED_BITS
from np_jax.quant.policy import PrecisionPolicy, get_policy
from np_jax.spec import APPLIANCE, PUBLISHED_RUN, RACK, ApplianceSpec, sourced


def _all_in(record, name, allowed) -> bool:
    """Whether every value of a field is in `allowed` (an abstract one passes: `_concrete`). A plain
    float, what the planner builds thousands of records from, is checked without numpy."""
    v = getattr(record, name)
    if type(v) is float:
        return v in allowed
    a = _concrete(record, name)
    return a is None or bool(np.all(np.isin(a, allowed)))


def _concrete(record, name):
    """A field's value as float64 numpy, or None where it is abstract: a tracer, or a placeholder
    JAX puts in a leaf when it rebuilds the pytree (None, a shape, a ShapeDtypeStruct, a mask's
    booleans)."""
    v = getattr(record, name)
    if isinstance(v, (str, bytes)):
        raise ValueError(f"{type(record).__name__}.{name} must be a number, got {v!r}")
    if isinstance(v, jax.core.Tracer) or not isinstance(v, (int, float, np.number, np.ndarray, jax.Array)) \
            or isinstance(v, bool) or getattr(v, "dtype", None) == np.bool_:
        return None
    try:
        return np.asarray(v, np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{type(record).__name__}.{name} must be a number, got {v!r}") from None


def _check_positive(record, names, allow_zero=()) -> None:
    """Raise ValueError for a concrete field that is not finite and > 0 (>= 0 for `allow_zero`)."""
    for name in names:
        a = _concrete(record, name)
        if a is None:
            continue
        bad = ~np.isfinite(a) | ((a < 0) if name in allow_zero else (a <= 0))
        if np.any(bad):
            need = ">= 0" if name in allow_zero else "> 0"
            raise ValueError(f"{type(record).__name__}.{name} must be finite and {need}, got {getattr(record, name)!r}")


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

    def __post_init__(self):
        _check_positive(self, [f.name for f in dataclasses.fields(self)],
                        allow_zero=("pcie_latency_s", "ethernet_latency_s", "host_s_per_microbatch",
                                    "phase_latency_cycles", "static_power_fraction", "power_clock_exponent"))

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

    def __post_init__(self):
        _check_positive(self, ("users", "micro_batches", "prompt_tokens", "gen_tokens", "cards"),
                        allow_zero=())
        _check_positive(self, ("context", "prefill_chunk"), allow_zero=("context", "prefill_chunk"))
        # Fractional counts are the relaxation the DSE searches (users / micro-batch size), so the
        # micro-batches need not divide the users here (the mapping model, `predict`, requires it);
        # more micro-batches than users would be micro-batches of less than one user.
        u, m = _concrete(self, "users"), _concrete(self, "micro_batches")
        if u is not None and m is not None and np.any(m > u):
            raise ValueError(f"Workload.micro_batches must be <= users (at least one user per micro-batch), "
                             f"got {self.micro_batches!r} micro-batches for {self.users!r} users")

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
    out_w: float = 8.0  # the output layer's weights
    out_a: float = 8.0  # and input
    rot_w: float = 2.0  # the online rotations' ±1 matrices
    rot_a: float = 8.0  # and their inputs
    probs_dynamic: float = 0.0  # 1: each probability row takes its own step (a max-reduce per row)
    # 1: a linear input takes a dynamic step per token (a max-reduce over each input vector): the
    # input of q/k/v, of the output projection, of gate/up, of the down projection
    attn_x_dynamic: float = 0.0
    o_x_dynamic: float = 0.0
    mlp_x_dynamic: float = 0.0
    down_x_dynamic: float = 0.0

    # each flag's linear input: the first matrix that reads it (q, k and v share one step)
    DYNAMIC_INPUTS = {"attn_x_dynamic": ("attn.x", "attn.q"), "o_x_dynamic": ("attn.o.x", "attn.o"),
                      "mlp_x_dynamic": ("mlp.x", "mlp.gate"), "down_x_dynamic": ("mlp.down.x", "mlp.down")}
    FLAGS = ("probs_dynamic",) + tuple(DYNAMIC_INPUTS)

    def __post_init__(self):
        for name in self.FLAGS:
            if not _all_in(self, name, (0.0, 1.0)):
                raise ValueError(f"Bits.{name} must be 0 or 1, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            if f.name not in self.FLAGS and not _all_in(self, f.name, SUPPORTED_BITS):
                raise ValueError(f"Bits.{f.name} must be one of {SUPPORTED_BITS} (the VMM's INT2/INT4/INT8 operand "
                                 f"widths), got {getattr(self, f.name)!r}")

    def replace(self, **kw) -> "Bits":
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_policy(cls, policy: str | PrecisionPolicy, layer: int = 0) -> "Bits":
        """Layer `layer`'s widths (every layer's, for a policy uniform over layers)."""
        p = get_policy(policy)
        if p.is_float:
            raise ValueError("the chip computes in integers: the model needs a quantized precision (w4a4, a8c8w4, w8a8)")
        p.check_vmm_operands(layer + 1, first=layer)
        p = p.at(layer)
        r = lambda role: p.layer(role).bits  # noqa: E731
        w = max(r(f"{m}.w") for m in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"))
        a = max(r(x) for x in ("attn.x", "attn.o.x", "mlp.x", "mlp.down.x"))
        kv = r("attn.kv")
        attn = max(kv, r("attn.qk.q"), r("attn.probs"))
        return cls(float(w), float(a), float(kv), float(attn), float(p.output("w").bits), float(p.output("x").bits),
                   float(p.layer("attn.rot.w").bits), float(p.layer("attn.rot.x").bits),
                   float(p.layer("attn.probs").dynamic),
                   **{f: float(p.layer(role).dynamic) for f, (role, _) in cls.DYNAMIC_INPUTS.items()})

    @classmethod
    def layer_groups(cls, policy: str | PrecisionPolicy, n_layers: int) -> tuple[tuple[tuple[int, ...], ...], list]:
        """(groups, their Bits): the layers grouped by equal widths (in order of first layer)."""
        groups: dict = {}
        for i in range(n_layers):
            groups.setdefault(cls.from_policy(policy, i), []).append(i)
        return tuple(tuple(g) for g in groups.values()), list(groups)

    @classmethod
    def widest(cls, policy: str | PrecisionPolicy, n_layers: int) -> "Bits":
        """Every width the widest over the layers (what bounds a card whatever layers it holds)."""
        _, bits = cls.layer_groups(policy, n_layers)
        return cls(*(max(getattr(b, f.name) for b in bits) for f in dataclasses.fields(cls)))

    @staticmethod
    def stack(bits: list) -> "Bits":
        """Bits with a leading axis (one entry per layer group), for `jax.vmap`."""
        return jax.tree.map(lambda *xs: jnp.asarray(xs, jnp.float32), *bits)


@dataclass(frozen=True)
class ModelShape:
    """The decoder dimensions the model needs (static; built from any `DecoderShape`). The name is
    a label outside equality and hashing, so it never keys a compiled program."""

    name: str = dataclasses.field(compare=False)
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
    online: tuple[tuple[str, int, int, int], ...] = ()  # online rotations: (name, K, N, vectors per token)

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
                   bool(getattr(shape, "attn_bias", False)), bool(getattr(shape, "mlp_bias", False)),
                   tuple((m, *map(int, v)) for m, v in online_matrices(shape).items()))

    def layer_matrices(self) -> dict[str, tuple[int, int]]:
        """[K, N] of every layer matrix (the `DecoderShape` protocol of np_jax.appliance.mapping)."""
        return {m: (k, n) for m, k, n in self.matrices}

    def online_matrices(self) -> dict[str, tuple[int, int, int]]:
        return {m: (k, n, r) for m, k, n, r in self.online}

    def matrix(self, name: str) -> tuple[int, int]:
        for m, k, n in self.matrices:
            if m == name:
                return k, n
        raise KeyError(name)


jax.tree_util.register_static(ModelShape)
