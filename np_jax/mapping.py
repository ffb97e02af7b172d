"""Mapping a decoder onto appliance cards and, inside each card, onto cores.

The published mapping (HPEC24 sec. III): one transformer layer per card, the output layer
split over two cards by vocabulary columns (tensor parallel), GPipe over the cards. In
general the mapper
- gives the output layer the fewest cards whose column slice fits (`head_cards`, or forced);
- spreads the layers over the remaining cards as contiguous, near-equal blocks (several
  layers per card for small models; cards left over stay idle);
- tiles every weight matrix of a layer over the full 16 x 16 grid (`array.Tiling`), places
  biases and norm gains (FP16), the layer's KV cache (users x context, spread evenly over
  the cores by position block) and per-core activation scratch (one micro-batch's input and
  output blocks plus int32 partial sums of the largest matrix) in each core's `CoreMemory`;
- checks the frame buffer: double-buffered input and output frames of one micro-batch.
A placement that does not fit raises `CoreMemoryError` naming the card, core and bytes over
(or, with `strict=False`, is recorded so a report can show it).

The model is described by any object with the `DecoderShape` attributes (models.config's
ModelConfig is one); widths come from the precision policy's roles (np_jax.quant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from np_jax.array import Tiling
from np_jax.core import stored_bytes
from np_jax.memory import CoreMemory, CoreMemoryError
from np_jax.quant import PrecisionPolicy, get_policy
from np_jax.spec import APPLIANCE, ApplianceSpec

FP16_BYTES = 2


class DecoderShape(Protocol):
    name: str
    n_layers: int
    d_model: int
    d_ff: int
    vocab_size: int
    kv_dim: int
    attn_bias: bool
    mlp_bias: bool

    def layer_matrices(self) -> dict[str, tuple[int, int]]: ...


@dataclass
class CardPlan:
    """What one card holds and how full its cores are."""

    card: int
    role: str  # "layers", "head" or "idle"
    layers: tuple[int, ...] = ()
    vocab_slice: tuple[int, int] | None = None
    memory: CoreMemory | None = None
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
    model: str
    policy: str
    users: int
    context: int
    micro_batches: int
    cards: list[CardPlan]
    appliance: ApplianceSpec = field(default_factory=lambda: APPLIANCE)

    @property
    def micro_batch_size(self) -> int:
        return self.users // self.micro_batches

    @property
    def fits(self) -> bool:
        return all(c.fits for c in self.cards)

    @property
    def layer_cards(self) -> list[CardPlan]:
        return [c for c in self.cards if c.role == "layers"]

    @property
    def head_cards(self) -> list[CardPlan]:
        return [c for c in self.cards if c.role == "head"]

    @property
    def depth(self) -> int:
        """Pipeline depth in card steps: the layer cards, then the head group (in parallel)."""
        return len(self.layer_cards) + (1 if self.head_cards else 0)

    def first_error(self) -> str | None:
        return next((c.error for c in self.cards if c.error), None)

    def one_line(self) -> str:
        per = sorted({len(c.layers) for c in self.layer_cards})
        idle = sum(c.role == "idle" for c in self.cards)
        fullest = max((c.memory.fullest_core()[1] for c in self.cards if c.memory), default=0)
        cap = self.appliance.chip.core_sram_bytes
        return (f"{len(self.cards)} cards: {len(self.layer_cards)} x {'/'.join(map(str, per))} layer(s), "
                f"{len(self.head_cards)} output-layer card(s)" + (f", {idle} idle" if idle else "")
                + f"; {self.micro_batches} micro-batches of {self.micro_batch_size}; fullest core "
                f"{fullest / 1024:.1f} of {cap / 1024:.0f} KiB; {'fits' if self.fits else 'DOES NOT FIT'}")

    def summary(self) -> dict:
        return {"model": self.model, "precision": self.policy, "users": self.users, "context": self.context,
                "micro_batches": self.micro_batches, "micro_batch_size": self.micro_batch_size,
                "fits": self.fits, "summary": self.one_line(), "cards": [c.summary() for c in self.cards]}


def _spread_bytes(total: int, grid: tuple[int, int]) -> np.ndarray:
    """`total` bytes spread as evenly as possible over the cores (row-major remainder)."""
    n = grid[0] * grid[1]
    per = np.full(n, total // n, np.int64)
    per[: total % n] += 1
    return per.reshape(grid)


def _head_plan(shape: DecoderShape, policy: PrecisionPolicy, card: int, j: int, h: int, mb: int, chip,
               strict: bool) -> CardPlan:
    """Output-layer card `j` of `h`: vocabulary columns [j*V/h, (j+1)*V/h), the final norm, scratch."""
    grid = (chip.grid_rows, chip.grid_cols)
    cols = math.ceil(shape.vocab_size / h)
    lo, hi = j * cols, min((j + 1) * cols, shape.vocab_size)
    mem = CoreMemory(chip, card=card)
    plan = CardPlan(card, "head", (), (lo, hi), memory=mem)
    t = Tiling(shape.d_model, hi - lo, *grid)
    _place(mem, plan, "lm_head.w", t.bytes_on_chip(policy("lm_head.w").bits, chip), "weights", strict)
    _place(mem, plan, "final_norm", _spread_bytes(shape.d_model * FP16_BYTES, grid), "weights", strict)
    scratch = stored_bytes(mb * (t.kb + t.nb), policy("lm_head.x").bits) + 4 * mb * t.nb
    _place(mem, plan, "activations", np.full(grid, scratch, np.int64), "activations", strict)
    plan.frame_buffer_bytes = 2 * mb * shape.d_model * FP16_BYTES + 2 * mb * (hi - lo) * FP16_BYTES
    return plan


def head_cards_needed(shape: DecoderShape, policy: PrecisionPolicy, micro_batch_size: int = 1,
                      appliance: ApplianceSpec = APPLIANCE) -> int:
    """Fewest cards whose vocabulary-column slices of the output layer (and its norm and scratch) fit."""
    for h in range(1, appliance.cards + 1):
        if all(_head_plan(shape, policy, j, j, h, micro_batch_size, appliance.chip, False).fits for j in range(h)):
            return h
    raise ValueError(f"the output layer of {shape.name} does not fit on {appliance.cards} cards")


def _place(mem: CoreMemory, plan: CardPlan, name: str, bytes_RxC: np.ndarray, kind: str, strict: bool) -> None:
    try:
        mem.allocate(name, bytes_RxC, kind)
    except CoreMemoryError as e:
        if strict:
            raise
        plan.error = plan.error or str(e)
        mem.allocate(name, bytes_RxC, kind, force=True)


def map_model(shape: DecoderShape, policy: str | PrecisionPolicy = "w4a4", *, users: int = 28, context: int = 2048,
              cards: int | None = None, micro_batches: int | None = None, head_cards: int | None = None,
              appliance: ApplianceSpec = APPLIANCE, strict: bool = True) -> Mapping:
    """Place `shape` on the appliance for `users` users of `context` positions each."""
    policy = get_policy(policy)
    chip = appliance.chip
    cards = appliance.cards if cards is None else cards
    if cards < 1:
        raise ValueError(f"the appliance needs at least one card, got {cards}")
    if users < 1 or context < 1:
        raise ValueError(f"users and context must be positive, got {users} users and {context} positions")
    if policy.is_float:
        raise ValueError("the chip computes in integers: map a quantized precision (w4a4, a8c8w4, w8a8)")
    # Default: as many equal micro-batches as layer cards, or the largest divisor of the users
    # below that (HPEC24: M = 14 for 14 layer cards keeps pipeline bubbles negligible).
    max_layer_cards = max(1, min(cards - (head_cards or 1), shape.n_layers))
    m = micro_batches or max(d for d in range(1, min(users, max_layer_cards) + 1) if users % d == 0)
    if m < 1 or users % m:
        raise ValueError(f"{users} users cannot be split into {m} equal micro-batches")
    mb = users // m
    h = head_cards or head_cards_needed(shape, policy, mb, appliance)
    n_layer_cards = min(cards - h, shape.n_layers)
    if n_layer_cards < 1:
        raise ValueError(f"{cards} card(s) leave no card for the {shape.n_layers} layers after {h} output-layer card(s)")
    grid = (chip.grid_rows, chip.grid_cols)
    role = lambda r: policy(f"layers.0.{r}")
    w_bits = {name: role(f"{name}.w").bits for name in shape.layer_matrices()}
    act_bits = max(role("attn.x").bits, role("mlp.down.x").bits)
    kv_bits = role("attn.kv").bits

    plans: list[CardPlan] = []
    bounds = np.linspace(0, shape.n_layers, n_layer_cards + 1).round().astype(int)
    for c in range(n_layer_cards):
        layers = tuple(range(bounds[c], bounds[c + 1]))
        mem = CoreMemory(chip, card=c)
        plan = CardPlan(c, "layers", layers, memory=mem)
        for i in layers:
            for name, (k, n) in shape.layer_matrices().items():
                t = Tiling(k, n, *grid)
                _place(mem, plan, f"layers.{i}.{name}.w", t.bytes_on_chip(w_bits[name], chip), "weights", strict)
                if shape.attn_bias if name.startswith("attn") else shape.mlp_bias:
                    b = np.zeros(grid, np.int64)
                    b[0, :] = t.nb * FP16_BYTES  # biases live with the first core row of each column
                    _place(mem, plan, f"layers.{i}.{name}.b", b, "weights", strict)
            _place(mem, plan, f"layers.{i}.norms", _spread_bytes(2 * shape.d_model * FP16_BYTES, grid), "weights", strict)
            kv = stored_bytes(users * context * 2 * shape.kv_dim, kv_bits)
            _place(mem, plan, f"layers.{i}.kv_cache", _spread_bytes(kv, grid), "kv_cache", strict)
        big = max((Tiling(k, n, *grid) for k, n in shape.layer_matrices().values()), key=lambda t: t.kb * t.nb)
        scratch = stored_bytes(mb * (big.kb + big.nb), act_bits) + 4 * mb * big.nb
        _place(mem, plan, "activations", np.full(grid, scratch, np.int64), "activations", strict)
        plan.frame_buffer_bytes = 2 * 2 * mb * shape.d_model * FP16_BYTES
        plans.append(plan)

    plans += [_head_plan(shape, policy, n_layer_cards + j, j, h, mb, chip, strict) for j in range(h)]
    for c in range(n_layer_cards + h, cards):
        plans.append(CardPlan(c, "idle"))
    for p in plans:
        if p.frame_buffer_bytes > chip.frame_buffer_bytes:
            msg = f"card {p.card}: frame buffer needs {p.frame_buffer_bytes:,} B of {chip.frame_buffer_bytes:,} B"
            if strict:
                raise CoreMemoryError(msg, card=p.card, core=(-1, -1), bytes_over=p.frame_buffer_bytes - chip.frame_buffer_bytes,
                                      name="frame_buffer")
            p.error = p.error or msg
    return Mapping(shape.name, policy.name, users, context, m, plans, appliance)


def plot_card(mapping: Mapping, card: int, path: str) -> str:
    """Write a 16 x 16 heat map of one card's per-core memory use (KiB) to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = mapping.cards[card]
    if plan.memory is None:
        raise ValueError(f"card {card} is idle: nothing to plot")
    used = plan.memory.used_RxC / 1024
    cap = plan.memory.capacity_bytes / 1024
    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    im = ax.imshow(used, cmap="viridis", vmin=0, vmax=max(cap, used.max()))
    fig.colorbar(im, ax=ax, label="KiB used per core")
    over = np.argwhere(used > cap)
    if len(over):
        ax.scatter(over[:, 1], over[:, 0], marker="x", color="red", label="over capacity")
        ax.legend(loc="upper right")
    kinds = plan.memory.bytes_by_kind()
    desc = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in kinds.items())
    ax.set_title(f"{mapping.model} {mapping.policy}, card {card} ({plan.role}): {used.min():.1f}-{used.max():.1f} "
                 f"of {cap:.0f} KiB per core\n{desc}",
                 fontsize=9)
    ax.set_xlabel("core column")
    ax.set_ylabel("core row")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
