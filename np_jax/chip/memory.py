"""Per-core memory accounting: every byte placed in a core's SRAM, by name.

A `CoreMemory` is the ledger of one card's core array: a [R, C] int64 array of used bytes per
core and the list of named allocations that produced it. Placing something that does not fit
raises `CoreMemoryError`, naming the card, the fullest offending core and the bytes over.
Host-side bookkeeping (numpy), separate from the jitted compute it describes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from np_jax.spec import NORTHPOLE, ChipSpec


class CoreMemoryError(MemoryError):
    """A placement that does not fit in core SRAM."""

    def __init__(self, message: str, *, card: int, core: tuple[int, int], bytes_over: int, name: str):
        super().__init__(message)
        self.card, self.core, self.bytes_over, self.name = card, core, bytes_over, name


@dataclass(frozen=True)
class Allocation:
    name: str
    kind: str  # "weights", "kv_cache", "activations", "other"
    bytes_RxC: np.ndarray  # bytes this allocation uses on each core

    @property
    def total_bytes(self) -> int:
        return int(self.bytes_RxC.sum())


class CoreMemory:
    """Ledger of one card's per-core SRAM use."""

    def __init__(self, chip: ChipSpec = NORTHPOLE, card: int = 0):
        self.chip, self.card = chip, card
        self.used_RxC = np.zeros((chip.grid_rows, chip.grid_cols), np.int64)
        self.allocations: list[Allocation] = []
        self._names: set[str] = set()  # the allocations' names (a mapping places thousands)

    @property
    def capacity_bytes(self) -> int:
        return self.chip.core_sram_bytes

    def free_RxC(self) -> np.ndarray:
        return self.capacity_bytes - self.used_RxC

    def check(self, bytes_RxC: np.ndarray, name: str) -> None:
        """Raise `CoreMemoryError` if adding `bytes_RxC` would overflow any core."""
        bytes_RxC = np.asarray(bytes_RxC, np.int64)
        if bytes_RxC.shape != self.used_RxC.shape:
            raise ValueError(f"allocation {name!r} has shape {bytes_RxC.shape}, core grid is {self.used_RxC.shape}")
        if (bytes_RxC < 0).any():
            raise ValueError(f"allocation {name!r} has negative byte counts")
        over_RxC = self.used_RxC + bytes_RxC - self.capacity_bytes
        if (over_RxC > 0).any():
            r, c = np.unravel_index(int(np.argmax(over_RxC)), over_RxC.shape)
            over = int(over_RxC[r, c])
            raise CoreMemoryError(
                f"card {self.card}, core ({r}, {c}): placing {name!r} needs "
                f"{int(self.used_RxC[r, c] + bytes_RxC[r, c]):,} B of {self.capacity_bytes:,} B "
                f"(over by {over:,} B; {int((over_RxC > 0).sum())} cores overflow)",
                card=self.card, core=(int(r), int(c)), bytes_over=over, name=name,
            )

    def allocate(self, name: str, bytes_RxC: np.ndarray, kind: str = "other", force: bool = False) -> Allocation:
        """Place `bytes_RxC` bytes on each core under `name`; raises if it does not fit.

        `force=True` records an over-capacity placement instead (for reports of mappings
        that do not fit).
        """
        if name in self._names:
            raise ValueError(f"card {self.card}: {name!r} is already placed")
        if not force:
            self.check(bytes_RxC, name)
        alloc = Allocation(name, kind, np.asarray(bytes_RxC, np.int64).copy())
        self.used_RxC += alloc.bytes_RxC
        self.allocations.append(alloc)
        self._names.add(name)
        return alloc

    def release(self, name: str) -> None:
        for i, a in enumerate(self.allocations):
            if a.name == name:
                self.used_RxC -= a.bytes_RxC
                del self.allocations[i]
                self._names.discard(name)
                return
        raise KeyError(f"card {self.card}: nothing named {name!r} is placed")

    def bytes_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for a in self.allocations:
            out[a.kind] = out.get(a.kind, 0) + a.total_bytes
        return out

    def fullest_core(self) -> tuple[tuple[int, int], int]:
        r, c = np.unravel_index(int(np.argmax(self.used_RxC)), self.used_RxC.shape)
        return (int(r), int(c)), int(self.used_RxC[r, c])

    def summary(self) -> dict:
        core, used = self.fullest_core()
        return {
            "card": self.card,
            "bytes_by_kind": self.bytes_by_kind(),
            "used_bytes": int(self.used_RxC.sum()),
            "capacity_bytes": self.capacity_bytes * self.used_RxC.size,
            "fullest_core": list(core),
            "fullest_core_bytes": used,
            "core_capacity_bytes": self.capacity_bytes,
        }
