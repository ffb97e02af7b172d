"""Mapping a decoder onto the appliance's cards and, inside each card, onto cores.

A `Mapping` is the one source of truth for where everything is: which card holds which layers
(or which part of a layer) or which vocabulary slice of the output layer, and for every matrix
its `Tiling` (which core holds which block) and its bytes in each core's `CoreMemory`.
Execution (the serving form of the weights, the card parameters, training's integer forward),
the memory report (`np-jax map`), the performance model (`np_jax.cost`) and the rack planner
all read it; none of them re-derives a tiling or a placement.

The placement rules are defined once, here, as plain arithmetic (Python numbers, numpy or
traced jax values), so the performance model's relaxed, differentiable form evaluates the
same formulas (with a straight-through ceil) that place the bytes:
- every layer matrix is tiled over the full core grid (`matrix_tilings`, `array.tile_blocks`);
- the output layer is split into `h` equal vocabulary-column slices (the last one zero-padded)
  on the fewest cards whose slice, final norm and scratch fit (`output_core_bytes`,
  `fewest_output_cards`);
- layers go to the layer cards as contiguous blocks, the first `n mod c` cards one layer more
  (`layer_blocks`: at most `ceil(n / c)` layers per card); with more layer cards than layers
  (the rack planner's case, a layer too big for one card) each layer's phases are packed in
  order over `c / n` cards, an equal share of the layer's bytes on each, a phase split where a
  card's share is full (`split_layer`);
- KV cache: users x context positions x (K and V) at the cache width (`kv_cache_bytes`),
  spread evenly over the cores;
- activation scratch per core: one micro-batch's input and output blocks of the largest
  matrix plus its int32 partial sums (`scratch_bytes`);
- frame buffer: double-buffered input and output frames of one micro-batch (`frame_bytes`);
- micro-batches: as many as there are layer stages, or the largest divisor of the users below
  that (`default_micro_batches`; HPEC24: M = 14 for 14 layer cards keeps bubbles negligible).

Placements that do not fit raise `CoreMemoryError` naming the card, the core and the bytes
over (or, with `strict=False`, are recorded so a report can show them). A float policy gets a
placement without a memory plan (the chip computes in integers; the float model is a host
reference that runs on the same card layout).

The model is any object with the `DecoderShape` attributes (models.config.ModelConfig is one);
widths come from the precision policy (np_jax.quant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from np_jax.appliance.pipeline import Schedule
from np_jax.chip.array import Tiling, tile_blocks
from np_jax.chip.core import PSUM_BYTES, stored_bytes
from np_jax.chip.memory import CoreMemory, CoreMemoryError
from np_jax.chip.vector_unit import FP16_BYTES
from np_jax.quant.policy import PrecisionPolicy, get_policy
from np_jax.spec import APPLIANCE, ApplianceSpec, ChipSpec

LAYER_MATRICES = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")

# What one transformer layer holds, phase by phase in execution order (the performance model's
# phases, np_jax.cost): a split layer is packed over cards in this order.
# The online rotations (models.recipe) are phases of their own (each a dependent VMM); they are
# inactive (no work, no latency) in a model without them.
LAYER_PHASES = (
    ("attn_norm", ("attn_norm",)), ("qkv", ("attn.q", "attn.k", "attn.v")), ("rope_kv", ()),
    ("qk_rot", ("attn.rot",)), ("qk", ("kv_cache.k",)), ("softmax", ()), ("pv", ("kv_cache.v",)),
    ("o_residual", ("attn.o",)), ("mlp_norm", ("mlp_norm",)), ("gate_up", ("mlp.gate", "mlp.up")), ("silu_mul", ()),
    ("down_rot.1", ("mlp.rot.1",)), ("down_rot.0", ("mlp.rot.0",)), ("down", ("mlp.down",)), ("residual", ()),
)
ROTATION_PHASES = {"qk_rot": "attn.rot", "down_rot.1": "mlp.rot.1", "down_rot.0": "mlp.rot.0"}
OUTPUT_PHASES = ("final_norm", "lm_head")


class DecoderShape(Protocol):
    """What the mapper needs of a model (models.config.ModelConfig has it)."""

    name: str
    n_layers: int
    d_model: int
    d_ff: int
    vocab_size: int
    kv_dim: int
    attn_bias: bool
    mlp_bias: bool

    def layer_matrices(self) -> dict[str, tuple[int, int]]: ...


def online_matrices(shape) -> dict[str, tuple[int, int, int]]:
    """The shape's online rotation matrices {name: (K, N, vectors per token)} (none if it has no
    `online_matrices`); at most two down-rotation factors (LAYER_PHASES)."""
    out = dict(getattr(shape, "online_matrices", dict)())
    if sum(n.startswith("mlp.rot.") for n in out) > 2:
        raise ValueError(f"{shape.name}: at most two Kronecker factors in the down rotation")
    return out


def phase_active(shape) -> tuple[bool, ...]:
    """Which LAYER_PHASES a layer of `shape` runs (the rotation phases only with the rotations)."""
    online = online_matrices(shape)
    return tuple(name not in ROTATION_PHASES or ROTATION_PHASES[name] in online for name, _ in LAYER_PHASES)


# --- the placement rules (plain arithmetic: concrete or relaxed) ---------------------------------

def kv_cache_bytes(users, context, kv_dim, bits, layers=1, ceil=math.ceil):
    """Bytes of K and V cache for `users` x `context` positions of `layers` layers, packed at
    `bits` (None: float32, as the emulator holds a float cache)."""
    n = layers * users * context * 2 * kv_dim
    return 4 * n if bits is None else ceil(n * bits / 8)


def scratch_bytes(mb, kb, nb, act_bits, ceil=math.ceil):
    """Per-core activation scratch of one micro-batch of `mb` tokens: its input and output
    blocks of a [Kb, Nb] core block (packed at the activation width) and its int32 partial sums."""
    return ceil(mb * (kb + nb) * act_bits / 8) + PSUM_BYTES * mb * nb


def frame_bytes(mb, d_model, out_features):
    """Frame-buffer bytes of a card: double-buffered FP16 input (d_model) and output frames of
    one micro-batch of `mb` tokens."""
    return 2 * mb * d_model * FP16_BYTES + 2 * mb * out_features * FP16_BYTES


def output_core_bytes(d_model, cols, grid, n_cores, w_bits, x_bits, mb, ceil=math.ceil):
    """Bytes in the fullest core of an output-layer card holding `cols` vocabulary columns:
    its weight block, its share of the final norm gain, and the scratch of one micro-batch."""
    kb, nb = tile_blocks(d_model, cols, grid[0], grid[1], ceil)
    return ceil(kb * nb * w_bits / 8) + ceil(d_model * FP16_BYTES / n_cores) + scratch_bytes(mb, kb, nb, x_bits, ceil)


def output_columns(vocab_size, h, ceil=math.ceil):
    """Vocabulary columns per output-layer card when the output layer is split over `h` cards."""
    return ceil(vocab_size / h)


def fewest_output_cards(d_model, vocab_size, w_bits, x_bits, mb, grid, n_cores, capacity, max_cards: int, xp=np,
                        ceil=np.ceil):
    """The fewest output-layer cards (1..max_cards) whose slices fit a core (`capacity` bytes);
    max_cards + 1 if none does. `xp`/`ceil`: numpy for the mapper; jax.numpy with a
    straight-through ceil for the performance model's relaxed form."""
    hs = xp.arange(1, max_cards + 1)
    need = output_core_bytes(d_model, output_columns(vocab_size, hs, ceil), grid, n_cores, w_bits, x_bits, mb, ceil)
    fits = need <= capacity
    return xp.where(xp.any(fits), hs[xp.argmax(fits)], max_cards + 1)


def layer_blocks(n_layers: int, n_cards: int) -> list[tuple[int, ...]]:
    """Contiguous layer blocks for `n_cards` layer cards: the first `n_layers mod n_cards` cards
    take one layer more, so no card holds more than ceil(n_layers / n_cards)."""
    base, extra = divmod(n_layers, n_cards)
    out, start = [], 0
    for c in range(n_cards):
        size = base + (c < extra)
        out.append(tuple(range(start, start + size)))
        start += size
    return out


def default_micro_batches(users: int, stages: int) -> int:
    """M: as many micro-batches as layer stages, or the largest divisor of the users below that."""
    return max(d for d in range(1, min(users, max(stages, 1)) + 1) if users % d == 0)


def matrix_tilings(shape: DecoderShape, chip: ChipSpec = APPLIANCE.chip) -> dict[str, Tiling]:
    """The tiling of every layer matrix (the full core grid), by name ("attn.q", ..., "mlp.down",
    and the online rotations' "attn.rot", "mlp.rot.i")."""
    mats = dict(shape.layer_matrices()) | {n: (k, m) for n, (k, m, _) in online_matrices(shape).items()}
    return {name: Tiling(k, n, chip.grid_rows, chip.grid_cols) for name, (k, n) in mats.items()}


def output_tiling(shape: DecoderShape, h: int = 1, chip: ChipSpec = APPLIANCE.chip) -> Tiling:
    """The tiling of one output-layer card's vocabulary slice (all h slices share it)."""
    return Tiling(shape.d_model, output_columns(shape.vocab_size, h), chip.grid_rows, chip.grid_cols)


def pack_phases(resident, capacity: float) -> list[list[tuple[int, float]]]:
    """Fill cards with one layer's phases in order (per-core resident bytes of each phase),
    splitting a phase where a card is full. Returns, per card, its (phase index, fraction of the
    phase) parts; a phase without resident data goes with the card that runs the phase before."""
    cards, cur, used = [], [], 0.0
    tol = 1e-6 * capacity
    for i, res in enumerate(map(float, resident)):
        left = res
        while left > capacity - used + tol:
            part = capacity - used
            if part > tol:
                cur.append((i, part / res))
                left -= part
            cards.append(cur)
            cur, used = [], 0.0
        used += left
        cur.append((i, left / res if res > 0 else 1.0))
    cards.append(cur)
    return cards


def split_layer(resident, room: float, cards: int = 0) -> list[list[tuple[int, float]]]:
    """One layer's phases (per-core `resident` bytes) over `cards` cards, or the fewest whose
    `room` holds them if more: packed in order at an equal share of the layer's bytes per card
    (`pack_phases`), so that no card is fuller than the split requires and each keeps the same
    memory free for prefill scratch (a first card packed full would leave it none)."""
    n = max(cards, len(pack_phases(resident, room)))
    return pack_phases(resident, sum(map(float, resident)) / n)


# --- the mapping ---------------------------------------------------------------------------------

@dataclass
class CardPlan:
    """What one card holds and how full its cores are."""

    card: int
    role: str  # "layers", "output" or "idle" (np_jax.appliance.pipeline.ROLES)
    layers: tuple[int, ...] = ()
    parts: tuple[tuple[int, float], ...] = ()  # a split layer: (phase index, fraction) this card holds
    vocab_slice: tuple[int, int] | None = None
    memory: CoreMemory | None = None
    tilings: dict[str, Tiling] = field(default_factory=dict)  # the matrices this card holds
    frame_buffer_bytes: int = 0
    error: str | None = None  # first placement that did not fit (strict=False)

    @property
    def fits(self) -> bool:
        return self.error is None

    def summary(self) -> dict:
        m = self.memory.summary() if self.memory is not None else {}
        kinds = m.get("bytes_by_kind", {})
        return {
            "card": self.card, "role": self.role, "layers": list(self.layers),
            "layer_parts": [[LAYER_PHASES[i][0], f] for i, f in self.parts] or None,
            "vocab_slice": list(self.vocab_slice) if self.vocab_slice else None,
            "weights_bytes": kinds.get("weights", 0), "kv_cache_bytes": kinds.get("kv_cache", 0),
            "other_bytes": kinds.get("activations", 0) + kinds.get("other", 0),
            "used_bytes": m.get("used_bytes", 0), "capacity_bytes": m.get("capacity_bytes", 0),
            "fullest_core": m.get("fullest_core"), "fullest_core_bytes": m.get("fullest_core_bytes", 0),
            "core_capacity_bytes": m.get("core_capacity_bytes", 0), "frame_buffer_bytes": self.frame_buffer_bytes,
            "fits": self.fits, "error": self.error,
        }


@dataclass
class Mapping:
    """Where a model lives on the appliance: cards, their layers or vocabulary slices, tilings, bytes."""

    model: str
    policy: str
    users: int
    context: int
    micro_batches: int
    cards: list[CardPlan]
    tilings: dict[str, Tiling]  # every layer matrix (layer cards share them)
    output_tiling: Tiling  # one output-layer card's vocabulary slice (all share it)
    cards_per_layer: int = 1  # > 1: layers split over cards (rack planner); not executable here
    appliance: ApplianceSpec = field(default_factory=lambda: APPLIANCE)
    precision: PrecisionPolicy | None = None  # the policy itself (`policy` is its name); None: `policy` names a preset

    @property
    def policy_object(self) -> PrecisionPolicy:
        return self.precision if self.precision is not None else get_policy(self.policy)

    @property
    def micro_batch_size(self) -> int:
        return self.users // self.micro_batches

    @property
    def accounted(self) -> bool:
        """Whether bytes were placed (False for a float placement: no chip memory plan)."""
        return any(c.memory is not None for c in self.cards)

    @property
    def fits(self) -> bool:
        return all(c.fits for c in self.cards)

    @property
    def layer_cards(self) -> list[CardPlan]:
        return [c for c in self.cards if c.role == "layers"]

    @property
    def output_cards(self) -> list[CardPlan]:
        return [c for c in self.cards if c.role == "output"]

    @property
    def schedule(self) -> Schedule:
        """The pipeline's view: each card's role, and the micro-batches."""
        return Schedule(tuple(c.role for c in self.cards), self.micro_batches)

    @property
    def depth(self) -> int:
        """Pipeline depth in card steps (layer stages, then the output-layer group)."""
        return self.schedule.depth

    @property
    def executable(self) -> bool:
        """Whether the emulator can run it: whole layers per card."""
        return self.cards_per_layer == 1

    def first_error(self) -> str | None:
        return next((c.error for c in self.cards if c.error), None)

    def bytes_over(self) -> int:
        """The most bytes by which a card's core memory (its fullest core) or its frame buffer
        exceeds its capacity; 0 when everything fits its memory."""
        chip = self.appliance.chip
        cores = (b - chip.core_sram_bytes for b in self.card_bytes())
        frames = (c.frame_buffer_bytes - chip.frame_buffer_bytes for c in self.cards)
        return max(0, *cores, *frames)

    def card_bytes(self) -> list[int]:
        """Bytes in the fullest core of every card (0 for idle or unaccounted cards)."""
        return [c.memory.fullest_core()[1] if c.memory is not None else 0 for c in self.cards]

    def one_line(self) -> str:
        idle = sum(c.role == "idle" for c in self.cards)
        if self.cards_per_layer > 1:
            lay = f"{len(self.layer_cards)} layer cards ({self.cards_per_layer} per layer)"
        else:
            per = sorted({len(c.layers) for c in self.layer_cards})
            lay = f"{len(self.layer_cards)} x {'/'.join(map(str, per))} layer(s)"
        text = (f"{len(self.cards)} cards: {lay}, {len(self.output_cards)} output-layer card(s)"
                + (f", {idle} idle" if idle else "") + f"; {self.micro_batches} micro-batches of {self.micro_batch_size}")
        if not self.accounted:
            return text + "; float reference (no chip memory plan)"
        cap = self.appliance.chip.core_sram_bytes
        return (text + f"; fullest core {max(self.card_bytes()) / 1024:.1f} of {cap / 1024:.0f} KiB; "
                + ("fits" if self.fits else "DOES NOT FIT"))

    def summary(self) -> dict:
        return {"model": self.model, "precision": self.policy, "users": self.users, "context": self.context,
                "micro_batches": self.micro_batches, "micro_batch_size": self.micro_batch_size,
                "cards_per_layer": self.cards_per_layer, "fits": self.fits, "summary": self.one_line(),
                "cards": [c.summary() for c in self.cards]}


def _spread_bytes(total: int, grid: tuple[int, int]) -> np.ndarray:
    """`total` bytes spread as evenly as possible over the cores (row-major remainder)."""
    n = grid[0] * grid[1]
    per = np.full(n, total // n, np.int64)
    per[: total % n] += 1
    return per.reshape(grid)


def _place(mem: CoreMemory, plan: CardPlan, name: str, bytes_RxC: np.ndarray, kind: str, strict: bool) -> None:
    try:
        mem.allocate(name, bytes_RxC, kind)
    except CoreMemoryError as e:
        if strict:
            raise
        plan.error = plan.error or str(e)
        mem.allocate(name, bytes_RxC, kind, force=True)


class _Widths:
    """The integer widths the mapper places, from the policy (None for a float placement): layer
    `layer`'s, or (None) the widest of every layer's, each role apart (what bounds a card whatever
    layers it holds: the activation scratch, the rack planner's layer)."""

    def __init__(self, policy: PrecisionPolicy, shape: DecoderShape, layer: int | None = None):
        self.float = policy.is_float
        if self.float:
            return
        policy.check_vmm_operands(shape.n_layers)
        views = [policy.at(i) for i in (range(shape.n_layers) if layer is None else [layer])]
        self.w = {name: max(p.layer(f"{name}.w").bits for p in views) for name in shape.layer_matrices()}
        self.w |= {name: max(p.layer(f"{name.split('.')[0]}.rot.w").bits for p in views)
                   for name in online_matrices(shape)}
        self.act = max(max(p.layer("attn.x").bits, p.layer("mlp.down.x").bits) for p in views)
        self.kv = max(p.layer("attn.kv").bits for p in views)
        self.out_w, self.out_x = policy.output("w").bits, policy.output("x").bits

    def key(self) -> tuple:
        return () if self.float else (tuple(sorted(self.w.items())), self.act, self.kv)


def _layer_items(shape: DecoderShape, wd: _Widths, tilings: dict[str, Tiling], users: int, context: int,
                 chip: ChipSpec) -> dict[str, tuple[np.ndarray, str, Tiling | None]]:
    """Per-core bytes of everything one layer holds, by item (the names of LAYER_PHASES)."""
    grid = (chip.grid_rows, chip.grid_cols)
    items: dict[str, tuple[np.ndarray, str, Tiling | None]] = {}
    for norm in ("attn_norm", "mlp_norm"):
        items[norm] = (_spread_bytes(shape.d_model * FP16_BYTES, grid), "weights", None)
    matrices = shape.layer_matrices()
    for name, t in tilings.items():
        b = t.bytes_on_chip(wd.w[name], chip)
        if name in matrices and (shape.attn_bias if name.startswith("attn") else shape.mlp_bias):
            b = b.copy()
            b[0, :] += t.nb * FP16_BYTES  # biases live with the first core row of each column
        items[name] = (b, "weights", t)
    half = kv_cache_bytes(users, context, shape.kv_dim, wd.kv) // 2
    items["kv_cache.k"] = items["kv_cache.v"] = (_spread_bytes(half, grid), "kv_cache", None)
    return items


def largest_block(blocks, xp=np):
    """(Kb, Nb) of the core block with the most elements (the first such): the block that sizes a
    core's activation scratch. `blocks`: (Kb, Nb) of every layer matrix (concrete or traced)."""
    sizes = xp.stack([kb * nb for kb, nb in blocks])
    i = xp.argmax(sizes)
    return xp.stack([kb for kb, _ in blocks])[i], xp.stack([nb for _, nb in blocks])[i]


def _output_plan(shape: DecoderShape, wd: _Widths, t: Tiling, card: int, j: int, mb: int, chip: ChipSpec,
                 strict: bool) -> CardPlan:
    """Output-layer card `j`: vocabulary columns [j*cols, (j+1)*cols) (the last zero-padded), the
    final norm and one micro-batch's scratch."""
    lo, hi = j * t.n, min((j + 1) * t.n, shape.vocab_size)
    plan = CardPlan(card, "output", (), (), (lo, hi), tilings={"lm_head": t})
    plan.frame_buffer_bytes = frame_bytes(mb, shape.d_model, t.n)
    if wd.float:
        return plan
    grid = (chip.grid_rows, chip.grid_cols)
    plan.memory = mem = CoreMemory(chip, card=card)
    _place(mem, plan, "lm_head.w", t.bytes_on_chip(wd.out_w, chip), "weights", strict)
    _place(mem, plan, "final_norm", _spread_bytes(shape.d_model * FP16_BYTES, grid), "weights", strict)
    _place(mem, plan, "activations", np.full(grid, scratch_bytes(mb, t.kb, t.nb, wd.out_x), np.int64), "activations",
           strict)
    return plan


def layer_phase_bytes(shape: DecoderShape, policy: str | PrecisionPolicy, users: int, context: int,
                      chip: ChipSpec = APPLIANCE.chip, layer: int | None = None) -> list[int]:
    """Bytes each phase of one layer keeps in a card's fullest core (LAYER_PHASES order): layer
    `layer`'s, or (None) a layer at every role's widest width over the layers."""
    policy = get_policy(policy)
    wd = _Widths(policy, shape, layer)
    return _phase_bytes(_layer_items(shape, wd, matrix_tilings(shape, chip), users, context, chip))


def _split_room(shape: DecoderShape, wd: _Widths, tilings: dict[str, Tiling], scratch: int, chip: ChipSpec) -> float:
    """Per-core bytes a card can give a split layer: the core less the scratch, less the rounding of
    the (at most two) phases split at its ends (a column block per core for a matrix, a byte for a
    cache), so that the packed parts always fit their ledgers."""
    slack = max(t.kb * wd.w[m] // 8 + 1 + FP16_BYTES for m, t in tilings.items()) + 1
    return float(chip.core_sram_bytes - scratch - 2 * slack)


def _phase_bytes(items) -> list[int]:
    return [sum(int(items[it][0].max()) for it in its if it in items) for _, its in LAYER_PHASES]


def scratch_core_bytes(shape: DecoderShape, policy: str | PrecisionPolicy, mb: int,
                       chip: ChipSpec = APPLIANCE.chip) -> int:
    """A layer card's per-core activation scratch for micro-batches of `mb` tokens."""
    wd = _Widths(get_policy(policy), shape)
    kb, nb = largest_block([(t.kb, t.nb) for t in matrix_tilings(shape, chip).values()])
    return scratch_bytes(mb, int(kb), int(nb), wd.act)


def check_capacity(shape: DecoderShape, policy: str | PrecisionPolicy, users: int, context: int, cards: int,
                   appliance: ApplianceSpec = APPLIANCE) -> None:
    """Raise `CoreMemoryError` at once when the model's weights and KV cache exceed the core memory
    of all `cards` together (192 MiB a card, SCI23): no mapping could fit, whatever it chooses."""
    policy = get_policy(policy)
    if policy.is_float:
        return
    chip = appliance.chip
    wd = _Widths(policy, shape)
    layers = [_Widths(policy, shape, i) for i in range(shape.n_layers)]
    weights = sum(stored_bytes(k * n, w.w[m]) for w in layers for m, (k, n) in shape.layer_matrices().items())
    weights += stored_bytes(shape.d_model * shape.vocab_size, wd.out_w)
    need = weights + sum(kv_cache_bytes(users, context, shape.kv_dim, w.kv) for w in layers)
    have = cards * chip.core_array_sram_bytes
    if need > have:
        raise CoreMemoryError(
            f"{shape.name} at {policy.name} for {users:,} users x {context:,} positions needs {need:,} B of weights and "
            f"KV cache; {cards} cards hold {have:,} B ({chip.core_array_sram_bytes // 2**20} MiB of core memory each): "
            f"over by {need - have:,} B", card=-1, core=(-1, -1), bytes_over=need - have, name="model")


def min_layer_cards(shape: DecoderShape, policy: str | PrecisionPolicy, users: int, context: int,
                    micro_batch_size: int, chip: ChipSpec = APPLIANCE.chip) -> int:
    """The fewest layer cards that hold every layer (the rack planner's layout): as many whole
    layers per card as fit, or, when one layer does not fit a card, every layer over the fewest
    cards its phases pack into (`pack_phases`). Raises when one micro-batch's scratch alone
    exceeds a core."""
    policy = get_policy(policy)
    room = chip.core_sram_bytes - scratch_core_bytes(shape, policy, micro_batch_size, chip)
    if room <= 0:
        raise CoreMemoryError(f"one micro-batch's activations ({chip.core_sram_bytes - room:,} B per core) exceed "
                              f"the core memory ({chip.core_sram_bytes:,} B)", card=0, core=(0, 0),
                              bytes_over=-room, name="activations")
    phases = layer_phase_bytes(shape, policy, users, context, chip)
    layer = sum(phases)
    if layer <= room:
        return math.ceil(shape.n_layers / (room // layer))
    wd = _Widths(policy, shape)
    split_room = _split_room(shape, wd, matrix_tilings(shape, chip), chip.core_sram_bytes - room, chip)
    return shape.n_layers * len(pack_phases(phases, split_room))


def output_cards_needed(shape: DecoderShape, policy: str | PrecisionPolicy, micro_batch_size: int = 1,
                        appliance: ApplianceSpec = APPLIANCE) -> int:
    """Fewest cards whose vocabulary slices of the output layer (with the final norm and scratch) fit."""
    wd = _Widths(get_policy(policy), shape)
    if wd.float:
        return 1
    chip = appliance.chip
    h = int(fewest_output_cards(shape.d_model, shape.vocab_size, wd.out_w, wd.out_x, micro_batch_size,
                                (chip.grid_rows, chip.grid_cols), chip.n_cores, chip.core_sram_bytes, appliance.cards))
    if h > appliance.cards:
        need = output_core_bytes(shape.d_model, output_columns(shape.vocab_size, appliance.cards),
                                 (appliance.chip.grid_rows, appliance.chip.grid_cols), appliance.chip.n_cores,
                                 wd.out_w, wd.out_x, micro_batch_size)
        raise ValueError(f"the output layer of {shape.name} does not fit on {appliance.cards} cards: even split "
                         f"{appliance.cards} ways its fullest core needs {need:,} B of {appliance.chip.core_sram_bytes:,} B "
                         f"(over by {need - appliance.chip.core_sram_bytes:,} B)")
    return h


def map_model(shape: DecoderShape, policy: str | PrecisionPolicy = "w4a4", *, users: int = 28, context: int = 2048,
              cards: int | None = None, micro_batches: int | None = None, output_cards: int | None = None,
              layer_cards: int | None = None, appliance: ApplianceSpec = APPLIANCE, strict: bool = True) -> Mapping:
    """Place `shape` on the appliance for `users` users of `context` positions each.

    `cards`: cards available (default: the appliance's). `output_cards`: default the fewest that
    fit. `layer_cards`: default as many as the layers and the other cards allow (whole layers,
    near-equal blocks); more layer cards than layers (a multiple of them) splits every layer over
    `layer_cards / n_layers` cards. `micro_batches`: default `default_micro_batches` of the layer
    stages. Cards left over stay idle.
    """
    policy = get_policy(policy)
    chip = appliance.chip
    cards = appliance.cards if cards is None else cards
    if cards < 2:
        raise ValueError(f"the appliance needs at least one card for layers and one for the output layer, got {cards}")
    if users < 1 or context < 1:
        raise ValueError(f"users and context must be positive, got {users} users and {context} positions")
    for name, v in (("micro_batches", micro_batches), ("output_cards", output_cards), ("layer_cards", layer_cards)):
        if v is not None and v < 1:
            raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {v}")
    wd = _Widths(policy, shape)
    n = shape.n_layers
    grid = (chip.grid_rows, chip.grid_cols)
    if layer_cards is not None and layer_cards > n and layer_cards % n:
        raise ValueError(f"{layer_cards} layer cards cannot split {n} layers evenly")

    def n_layer_cards(h):
        return layer_cards if layer_cards is not None else min(cards - h, n)

    # The output-card count and the micro-batch count depend on each other (the scratch of a
    # micro-batch sizes the output slices): the fewest output cards consistent with the default M.
    if micro_batches is not None and users % micro_batches:
        raise ValueError(f"{users} users cannot be split into {micro_batches} equal micro-batches")
    if output_cards is not None:
        h = output_cards
        m = micro_batches or default_micro_batches(users, n_layer_cards(h))
    else:
        for h in range(1, cards):
            m = micro_batches or default_micro_batches(users, n_layer_cards(h))
            if wd.float or fewest_output_cards(shape.d_model, shape.vocab_size, wd.out_w, wd.out_x, users // m,
                                               grid, chip.n_cores, chip.core_sram_bytes, cards - 1) <= h:
                break
        else:
            need = output_core_bytes(shape.d_model, output_columns(shape.vocab_size, cards - 1),
                                     (chip.grid_rows, chip.grid_cols), chip.n_cores, wd.out_w, wd.out_x, users // m)
            raise CoreMemoryError(
                f"the output layer of {shape.name} does not fit: split over {cards - 1} cards, each card's fullest core "
                f"needs {need:,} B of {chip.core_sram_bytes:,} B (over by {need - chip.core_sram_bytes:,} B; "
                f"{users // m:,} users per micro-batch)", card=cards - 1, core=(0, 0),
                bytes_over=need - chip.core_sram_bytes, name="lm_head.w")
    mb = users // m
    n_lc = n_layer_cards(h)
    if n_lc < 1 or n_lc + h > cards:
        raise ValueError(f"{cards} card(s) cannot hold {max(n_lc, 1)} layer card(s) and {h} output-layer card(s)")
    tilings = matrix_tilings(shape, chip)
    kb, nb = largest_block([(t.kb, t.nb) for t in tilings.values()])
    scratch = None if wd.float else np.full(grid, scratch_bytes(mb, int(kb), int(nb), wd.act), np.int64)
    # each layer's items at its own widths (computed once per distinct widths); `items`: the widest
    items = None if wd.float else _layer_items(shape, wd, tilings, users, context, chip)
    by_widths: dict[tuple, dict] = {}

    def items_of(i: int) -> dict:
        w = _Widths(policy, shape, i)
        if w.key() not in by_widths:
            by_widths[w.key()] = _layer_items(shape, w, tilings, users, context, chip)
        return by_widths[w.key()]

    plans: list[CardPlan] = []
    if n_lc <= n:  # whole layers per card
        cpl = 1
        for c, layers in enumerate(layer_blocks(n, n_lc)):
            plan = CardPlan(c, "layers", layers, tilings=dict(tilings))
            plan.frame_buffer_bytes = frame_bytes(mb, shape.d_model, shape.d_model)
            if not wd.float:
                plan.memory = mem = CoreMemory(chip, card=c)
                for i in layers:
                    for item, (b, kind, _) in items_of(i).items():
                        _place(mem, plan, f"layers.{i}.{item}", b, kind, strict)
                _place(mem, plan, "activations", scratch, "activations", strict)
            plans.append(plan)
    else:  # every layer's phases packed over cpl cards
        cpl = n_lc // n
        if wd.float:
            raise ValueError("splitting layers over cards is a memory plan: map a quantized precision")
        packed = split_layer(_phase_bytes(items), _split_room(shape, wd, tilings, int(scratch.max()), chip), cpl)
        cpl = len(packed)
        for i in range(n):
            for j, parts in enumerate(packed):
                c = i * cpl + j
                plan = CardPlan(c, "layers", (i,), tuple(parts), tilings={})
                plan.frame_buffer_bytes = frame_bytes(mb, shape.d_model, shape.d_model)
                plan.memory = mem = CoreMemory(chip, card=c)
                layer_items, layer_wd = items_of(i), _Widths(policy, shape, i)
                for ph, frac in parts:  # packed by the widest layer's bytes: every layer's parts fit
                    for it in (it for it in LAYER_PHASES[ph][1] if it in layer_items):
                        b, kind, t = layer_items[it]
                        if t is not None and frac < 1:  # a matrix split by columns: its own tiling
                            t = Tiling(t.k, max(1, math.ceil(t.n * frac)), t.rows, t.cols)
                            b = t.bytes_on_chip(layer_wd.w[it], chip)
                        elif frac < 1:
                            b = np.ceil(b * frac).astype(np.int64)
                        if t is not None:
                            plan.tilings[it] = t
                        _place(mem, plan, f"layers.{i}.{it}" + (f"[{frac:.3f}]" if frac < 1 else ""), b, kind, strict)
                _place(mem, plan, "activations", scratch, "activations", strict)
                plans.append(plan)
        n_lc = n * cpl
        if n_lc + h > cards:
            msg = (f"{shape.name} at {policy.name}: every layer needs {cpl} cards, so {n} layers and {h} output-layer "
                   f"card(s) need {n_lc + h} cards; {cards} available")
            if strict:
                raise ValueError(msg)
            plans[0].error = plans[0].error or msg
    out_t = output_tiling(shape, h, chip)
    plans += [_output_plan(shape, wd, out_t, n_lc + j, j, mb, chip, strict) for j in range(h)]
    plans += [CardPlan(c, "idle") for c in range(n_lc + h, max(cards, n_lc + h))]
    for p in plans:
        if p.frame_buffer_bytes > chip.frame_buffer_bytes:
            over = p.frame_buffer_bytes - chip.frame_buffer_bytes
            msg = (f"card {p.card}: frame buffer needs {p.frame_buffer_bytes:,} B of {chip.frame_buffer_bytes:,} B "
                   f"(over by {over:,} B)")
            if strict:
                raise CoreMemoryError(msg, card=p.card, core=(-1, -1), bytes_over=over, name="frame_buffer")
            p.error = p.error or msg
    return Mapping(shape.name, policy.name, users, context, m, plans, tilings, out_t, cpl, appliance, policy)
