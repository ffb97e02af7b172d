"""The core array: a weight matrix tiled over the 16 x 16 grid, and the array VMM.

Tiling (explicit and inspectable): a [K, N] matrix is cut into `rows` blocks along K and
`cols` blocks along N; core (r, c) of the tiling holds `W[r*Kb:(r+1)*Kb, c*Nb:(c+1)*Nb]`
(Kb = ceil(K / rows), Nb = ceil(N / cols); the last blocks are zero-padded). The tiling may
occupy a sub-grid of the chip starting at (row0, col0). `Tiling.table()` lists which core
holds which block.

The array VMM (`array_vmm`) is a vmap over cores of `core.core_vmm`: core (r, c) multiplies
the r-th K-block of the input by its weight block, giving an int32 partial sum; the
partial-sum network then adds the partial sums of each grid column in row order with
saturating int32 arithmetic (`core.saturating_sum`). It is jit-compiled and pure, and the
core-row axis can be sharded over devices (`shard_weights`).

Storage: the tiled weights are kept as the padded matrix viewed as [R, Kb, C, Nb] (core
(r, c)'s block is `w[r, :, c, :]`). That is a zero-copy view of the row-major matrix and lets
XLA batch the per-core products into one efficient dot; it is the same per-core data as a
[R, C, Kb, Nb] array, laid out differently in host memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from np_jax.chip import core
from np_jax.chip.core import PSUM_BYTES, VmmCost, check_bits, int_range, stored_bytes, vmm_cycles
from np_jax.chip.memory import CoreMemory
from np_jax.spec import NORTHPOLE, ChipSpec


def tile_blocks(k, n, rows, cols, ceil=math.ceil):
    """(Kb, Nb): the block of a [K, N] matrix one core holds on a `rows` x `cols` tiling.

    The one tiling formula: `Tiling` uses it with `math.ceil`, the performance model with a
    straight-through ceil on relaxed (traced) grid sizes.
    """
    return ceil(k / rows), ceil(n / cols)


@dataclass(frozen=True)
class Tiling:
    """How a [K, N] matrix is cut over a `rows` x `cols` block of cores at (row0, col0)."""

    k: int
    n: int
    rows: int = 16
    cols: int = 16
    row0: int = 0
    col0: int = 0

    def __post_init__(self):
        for name in ("k", "n", "rows", "cols"):
            if getattr(self, name) < 1:
                raise ValueError(f"Tiling.{name} must be >= 1, got {getattr(self, name)}")
        if self.row0 < 0 or self.col0 < 0:
            raise ValueError("Tiling origin must be non-negative")

    @property
    def kb(self) -> int:
        return tile_blocks(self.k, self.n, self.rows, self.cols)[0]

    @property
    def nb(self) -> int:
        return tile_blocks(self.k, self.n, self.rows, self.cols)[1]

    def check_fits_grid(self, chip: ChipSpec = NORTHPOLE) -> None:
        if self.row0 + self.rows > chip.grid_rows or self.col0 + self.cols > chip.grid_cols:
            raise ValueError(
                f"tiling of {self.rows}x{self.cols} cores at ({self.row0}, {self.col0}) "
                f"exceeds the {chip.grid_rows}x{chip.grid_cols} core grid"
            )

    def block(self, r: int, c: int) -> tuple[slice, slice]:
        """(K slice, N slice) of the matrix held by tiling core (r, c), without padding."""
        if not (0 <= r < self.rows and 0 <= c < self.cols):
            raise IndexError(f"core ({r}, {c}) is outside the {self.rows}x{self.cols} tiling")
        return (slice(min(r * self.kb, self.k), min((r + 1) * self.kb, self.k)),
                slice(min(c * self.nb, self.n), min((c + 1) * self.nb, self.n)))

    def core_of(self, k_index: int, n_index: int) -> tuple[int, int]:
        """Chip-grid coordinates of the core holding element W[k_index, n_index]."""
        return self.row0 + k_index // self.kb, self.col0 + n_index // self.nb

    def table(self) -> list[dict]:
        """One row per tiling core: chip coordinates and the block it holds."""
        out = []
        for r in range(self.rows):
            for c in range(self.cols):
                ks, ns = self.block(r, c)
                out.append({"core": (self.row0 + r, self.col0 + c), "k": (ks.start, ks.stop), "n": (ns.start, ns.stop)})
        return out

    def values_RxC(self) -> np.ndarray:
        """Number of (unpadded) matrix elements each tiling core holds, shape [rows, cols]."""
        k_r = np.clip(self.k - np.arange(self.rows) * self.kb, 0, self.kb)
        n_c = np.clip(self.n - np.arange(self.cols) * self.nb, 0, self.nb)
        return np.outer(k_r, n_c).astype(np.int64)

    def bytes_on_chip(self, bits: int, chip: ChipSpec = NORTHPOLE) -> np.ndarray:
        """Packed bytes per chip core ([grid_rows, grid_cols]) for this matrix at `bits`."""
        self.check_fits_grid(chip)
        per_core = (self.values_RxC() * check_bits(bits) + 7) // 8  # stored_bytes, per core
        out = np.zeros((chip.grid_rows, chip.grid_cols), np.int64)
        out[self.row0:self.row0 + self.rows, self.col0:self.col0 + self.cols] = per_core
        return out


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TiledWeights:
    """A weight matrix resident in the core array. `w_RxKbxCxNb[r, :, c, :]` is core (r, c)'s block.

    The codes are held in the form the emulator's dot consumes (`tile_weights(form=...)`):
    float32 where a float32 dot of them is exact for any input up to INT8 (then no conversion
    runs per call), else int8. The chip holds them packed at `bits`; memory is accounted so.
    """

    w_RxKbxCxNb: jax.Array
    tiling: Tiling = field(metadata=dict(static=True))
    bits: int = field(metadata=dict(static=True))
    signed: bool = field(default=True, metadata=dict(static=True))

    @property
    def w_RxKbxCxNb_i8(self) -> jax.Array:
        return self.w_RxKbxCxNb.astype(jnp.int8)

    def core_block(self, r: int, c: int) -> jax.Array:
        """The [Kb, Nb] block held by tiling core (r, c), padding included (int8 codes)."""
        return self.w_RxKbxCxNb[r, :, c, :].astype(jnp.int8)

    def to_matrix(self) -> jax.Array:
        t = self.tiling
        return self.w_RxKbxCxNb.reshape(t.rows * t.kb, t.cols * t.nb)[: t.k, : t.n].astype(jnp.int8)

    def packed_core_image(self, r: int, c: int) -> jax.Array:
        """The bytes core (r, c) stores: its unpadded block packed at `bits` (row-major)."""
        ks, ns = self.tiling.block(r, c)
        blk = self.core_block(r, c)[: ks.stop - ks.start, : ns.stop - ns.start]
        return core.pack_bits(blk.reshape(-1), self.bits)


def tile_weights(w_KxN_i8: jax.Array, *, bits: int, tiling: Tiling | None = None, signed: bool = True,
                 memory: CoreMemory | None = None, name: str = "weights", chip: ChipSpec = NORTHPOLE,
                 form: str = "auto") -> TiledWeights:
    """Place an integer matrix (values of width `bits`, held in int8) on the core array.

    If `memory` is given, its per-core bytes (packed at `bits`) are allocated there, raising
    `CoreMemoryError` (card, core, bytes over) if they do not fit. Values outside the range
    of `bits` raise ValueError (checked when `w_KxN_i8` is concrete). `form`: how the emulator
    holds the codes: "float32" (the fastest exact dot), "int8" (a quarter of the host memory,
    for shapes too large to hold otherwise), or "auto" (float32 where that dot is exact for INT8
    inputs, else int8).
    """
    bits = check_bits(bits)
    if w_KxN_i8.ndim != 2:
        raise ValueError(f"expected a [K, N] matrix, got shape {w_KxN_i8.shape}")
    k, n = w_KxN_i8.shape
    tiling = tiling or Tiling(k, n, chip.grid_rows, chip.grid_cols)
    if (tiling.k, tiling.n) != (k, n):
        raise ValueError(f"tiling is for a [{tiling.k}, {tiling.n}] matrix, got [{k}, {n}]")
    tiling.check_fits_grid(chip)
    if not isinstance(w_KxN_i8, jax.core.Tracer):
        lo, hi = int_range(bits, signed)
        w_np = np.asarray(w_KxN_i8)
        if w_np.size and (w_np.min() < lo or w_np.max() > hi):
            raise ValueError(f"weights of {name!r} lie in [{w_np.min()}, {w_np.max()}], outside INT{bits} [{lo}, {hi}]")
    if memory is not None:
        memory.allocate(name, tiling.bytes_on_chip(bits, chip), kind="weights")
    if form not in ("auto", "float32", "int8"):
        raise ValueError(f"form must be auto, float32 or int8, got {form!r}")
    f32 = form == "float32" or (form == "auto" and core.exact_in_float32(tiling.kb, 8, bits, True, signed))
    w = jnp.asarray(w_KxN_i8, jnp.int8).astype(jnp.float32 if f32 else jnp.int8)
    w = jnp.pad(w, ((0, tiling.rows * tiling.kb - k), (0, tiling.cols * tiling.nb - n)))
    return TiledWeights(w.reshape(tiling.rows, tiling.kb, tiling.cols, tiling.nb), tiling, bits, signed)


def network_never_saturates(tw: TiledWeights, x_bits: int, x_signed: bool = True) -> bool:
    """Whether one dot over the whole K, in the form the codes are held, gives the partial-sum
    network's result exactly.

    The worst case over the whole reduction (all core rows; the padding rows are zeros) bounds
    every core's partial sum and every running sum of the network in its row order. Below 2^31
    the saturating network never saturates, so it adds exactly, and an int8 x int8 -> int32 dot
    of the whole K (no intermediate sum can overflow) is the same integer: INT8 x INT8 up to
    K = 131,071. Float32-held codes need the bound below 2^24, where a float32 dot is exact in any
    summation order (`core.exact_in_float32`): INT4 x INT4 up to K = 262,143, INT8 x INT8 up to
    K = 1023. Beyond these the cores and the network run as the chip's.
    """
    t = tw.tiling
    if tw.w_RxKbxCxNb.dtype == jnp.float32:
        return core.exact_in_float32(t.k, x_bits, tw.bits, x_signed, tw.signed)
    return core.accumulator_bound(t.k, x_bits, tw.bits, x_signed, tw.signed) <= core.INT32_MAX


def dot_form(rows: int) -> str:
    """The code form whose exact dot is the faster for `rows` input rows, as measured on XLA CPU
    (`python -m benchmarks.bench_core_array --dot-forms`, docs/benchmarks.md): float32 for one
    row (the int8 matrix-vector product is 1.5-16x slower there), int8 for more (0.45-1.1x of
    the float32 dot's time, and a quarter of its memory)."""
    return "float32" if rows <= 1 else "int8"


def with_form(tw: TiledWeights, form: str) -> TiledWeights:
    """The same codes held in `form` ("float32" or "int8"; see `tile_weights`)."""
    if form not in ("float32", "int8"):
        raise ValueError(f"form must be float32 or int8, got {form!r}")
    dt = jnp.float32 if form == "float32" else jnp.int8
    return tw if tw.w_RxKbxCxNb.dtype == dt else TiledWeights(tw.w_RxKbxCxNb.astype(dt), tw.tiling, tw.bits, tw.signed)


def array_vmm(x_BxK_i8: jax.Array, tw: TiledWeights, *, x_bits: int = 8, x_signed: bool = True,
              network: bool | None = None) -> jax.Array:
    """`x @ W` on the core array: per-core int32 VMMs, then the saturating partial-sum network.

    `x_BxK_i8` may have any number of leading axes (`[..., K]`); returns `[..., N]` int32.
    `network`: None (default) computes the product as one dot over the whole K (float32 or
    int8, the form the codes are held in) where `network_never_saturates` proves it the same
    integers, else per core and through the network; True always runs the cores and the network
    (the definition, for tests).
    """
    t = tw.tiling
    if x_BxK_i8.shape[-1] != t.k:
        raise ValueError(f"input has {x_BxK_i8.shape[-1]} features, the mapped matrix expects K={t.k}")
    lead = x_BxK_i8.shape[:-1]
    x = x_BxK_i8.reshape(-1, t.k)
    x = jnp.pad(x, ((0, 0), (0, t.rows * t.kb - t.k)))
    core.check_bits(x_bits)
    core.check_accumulator(t.kb, x_bits, tw.bits, x_signed, tw.signed)
    if not network and network_never_saturates(tw, x_bits, x_signed):
        w = tw.w_RxKbxCxNb.reshape(t.rows * t.kb, t.cols * t.nb)  # a view: the padded row-major matrix
        acc = core.int_dot(x.astype(jnp.int8), w, (((1,), (0,)), ((), ())), k=t.k, x_bits=x_bits, w_bits=tw.bits,
                           x_signed=x_signed, w_signed=tw.signed)  # in the form the codes are held
        return acc[:, : t.n].reshape(*lead, t.n)
    x = x.reshape(-1, t.rows, t.kb)
    # Core (r, c) multiplies grid row r's input block [B, Kb] by its block [Kb, Nb]: one batched
    # dot over the grid rows (batch r; the cores of a row share its input block).
    per_core_RxBxCxNb = core.int_dot(
        x, tw.w_RxKbxCxNb, (((2,), (1,)), ((1,), (0,))), k=t.kb, x_bits=x_bits, w_bits=tw.bits, x_signed=x_signed,
        w_signed=tw.signed)  # [R, B, C, Nb]
    acc_BxCxNb = core.saturating_sum(per_core_RxBxCxNb, axis=0)
    return acc_BxCxNb.reshape(-1, t.cols * t.nb)[:, : t.n].reshape(*lead, t.n)


def array_vmm_cost(b: int, tiling: Tiling, *, x_bits: int, w_bits: int, chip: ChipSpec = NORTHPOLE) -> VmmCost:
    """Cost of `array_vmm` for `b` input rows.

    input_bytes counts each core's delivery of its input block (a grid row's cores each
    receive the same block); partial_sum_bytes counts the int32 partial sums passed down each
    grid column (rows - 1 hops of B x Nb per column).
    """
    bits = max(check_bits(x_bits), check_bits(w_bits))
    used_rows = min(tiling.rows, math.ceil(tiling.k / tiling.kb))
    used_cols = min(tiling.cols, math.ceil(tiling.n / tiling.nb))
    return VmmCost(
        macs=b * tiling.k * tiling.n,
        bits=bits,
        cores=used_rows * used_cols,
        cycles=vmm_cycles(b, tiling.kb, tiling.nb, bits, chip),
        weight_bytes=stored_bytes(tiling.k * tiling.n, w_bits),
        input_bytes=stored_bytes(b * tiling.k, x_bits) * used_cols,
        partial_sum_bytes=PSUM_BYTES * b * tiling.n * (used_rows - 1),
        output_bytes=PSUM_BYTES * b * tiling.n,
    )


def core_mesh(devices=None, axis: str = "cores") -> Mesh:
    """A 1-D mesh over which the core-row axis of tiled weights is sharded."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.array(devices), (axis,))


def shard_weights(tw: TiledWeights, mesh: Mesh, axis: str = "cores") -> TiledWeights:
    """Shard the core-row axis of `tw` over mesh axis `axis` (rows must divide evenly)."""
    n_dev = mesh.shape[axis]
    if tw.tiling.rows % n_dev:
        raise ValueError(f"{tw.tiling.rows} core rows cannot be split evenly over {n_dev} devices")
    sharding = NamedSharding(mesh, P(axis, None, None, None))
    return TiledWeights(jax.device_put(tw.w_RxKbxCxNb, sharding), tw.tiling, tw.bits, tw.signed)
