"""Hardware specifications of the NorthPole chip and of the 16-card LLM appliance.

Every published number lives here once, as a field of a frozen dataclass whose metadata names
its source. Everything else in np_jax reads these objects. Derived figures (peak TOPS, total
core memory, PCIe bandwidth) are properties computed from the published ones.

Sources (abbreviations used in the field metadata):
  SCI23   D. Modha et al., "Neural inference at the frontier of energy, space, and time",
          Science 382 (2023).
  ISSCC24 J. Arthur et al., NorthPole chip paper, ISSCC 2024.
  HPEC24  R. Appuswamy et al., "Breakthrough low-latency, high-energy-efficiency LLM inference
          performance using NorthPole", IEEE HPEC 2024.
  PCIE3   PCI Express Base Specification 3.0 (8 GT/s per lane, 128b/130b encoding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

KIB = 1024
MIB = 1024 * 1024


def vmm_ops_per_cycle(ops_per_cycle_int8, bits):
    """Per-core VMM rate at an operand width of `bits`: the INT8 rate x 8 / bits (SCI23: 2048,
    4096 and 8192 ops/cycle at INT8, INT4, INT2). The one definition of the rate per width;
    plain arithmetic, so the performance model uses it on traced (relaxed) widths too."""
    return ops_per_cycle_int8 * 8 / bits


def sourced(value: Any, source: str, *, note: str = "") -> Any:
    """A dataclass field whose default is a published (or explicitly chosen) value."""
    return field(default=value, metadata={"source": source, "note": note})


def sources(spec: Any) -> dict[str, dict[str, Any]]:
    """`{field: {"value", "source", "note"}}` for every field of a spec dataclass."""
    return {
        f.name: {
            "value": getattr(spec, f.name),
            "source": f.metadata.get("source", "derived"),
            "note": f.metadata.get("note", ""),
        }
        for f in dataclasses.fields(spec)
    }


@dataclass(frozen=True)
class ChipSpec:
    """One NorthPole processor (one PCIe card)."""

    grid_rows: int = sourced(16, "SCI23; HPEC24 sec. II", note="16 x 16 core grid")
    grid_cols: int = sourced(16, "SCI23; HPEC24 sec. II")
    vmm_ops_per_cycle_int8: int = sourced(2048, "SCI23", note="per core; 1 MAC = 2 ops")
    vmm_ops_per_cycle_int4: int = sourced(4096, "SCI23", note="per core")
    vmm_ops_per_cycle_int2: int = sourced(8192, "SCI23", note="per core")
    vector_unit_ways: int = sourced(4, "SCI23", note="FP16 vector unit, 4-way SIMD per slice")
    vector_unit_slices: int = sourced(32, "SCI23")
    activation_unit_slices: int = sourced(32, "SCI23")
    core_sram_bytes: int = sourced(768 * KIB, "SCI23", note="0.75 MiB per core")
    frame_buffer_bytes: int = sourced(32 * MIB, "SCI23; HPEC24")
    memory_bandwidth_bytes_s: float = sourced(13e12, "SCI23", note="on-chip memory<->compute, all cores")
    transistors: float = sourced(22e9, "SCI23; HPEC24 Table I")
    process_nm: int = sourced(12, "SCI23")
    threads_per_core: int = sourced(8, "SCI23")
    clock_hz: float = sourced(
        400e6,
        "SCI23 (vision results)",
        note="not stated for the LLM work; an explicit parameter, 400 MHz is the vision-results figure",
    )

    def __post_init__(self):
        for bits in (4, 2):  # the published figures follow the one rate rule (vmm_ops_per_cycle)
            if getattr(self, f"vmm_ops_per_cycle_int{bits}") != vmm_ops_per_cycle(self.vmm_ops_per_cycle_int8, bits):
                raise ValueError(f"vmm_ops_per_cycle_int{bits} must be the INT8 rate x 8/{bits}")

    @property
    def n_cores(self) -> int:
        return self.grid_rows * self.grid_cols

    @property
    def core_array_sram_bytes(self) -> int:
        """Total core memory (192 MiB for the published chip)."""
        return self.n_cores * self.core_sram_bytes

    def vmm_ops_per_cycle(self, bits: int) -> int:
        """Per-core VMM throughput at an operand width of 8, 4 or 2 bits."""
        if bits not in (8, 4, 2):
            raise ValueError(f"the NorthPole VMM supports INT8, INT4 and INT2, not INT{bits}")
        return int(vmm_ops_per_cycle(self.vmm_ops_per_cycle_int8, bits))

    def peak_ops_s(self, bits: int) -> float:
        """Peak core-array throughput in ops/s (209.7 / 419.4 / 838.9 TOPS at 400 MHz)."""
        return self.n_cores * self.vmm_ops_per_cycle(bits) * self.clock_hz

    def with_clock(self, clock_hz: float) -> "ChipSpec":
        return dataclasses.replace(self, clock_hz=clock_hz)


@dataclass(frozen=True)
class ApplianceSpec:
    """The 16-card NorthPole LLM inference appliance (one 2U server)."""

    chip: ChipSpec = field(default_factory=ChipSpec, metadata={"source": "see ChipSpec"})
    cards: int = sourced(16, "HPEC24 sec. III")
    power_w_per_card: float = sourced(42.0, "HPEC24", note="672 W measured for 16 cards")
    pcie_gen: int = sourced(3, "HPEC24 sec. III")
    pcie_lanes: int = sourced(8, "HPEC24 sec. III")
    pcie_gt_s_per_lane: float = sourced(8.0, "PCIE3")
    pcie_encoding: float = sourced(128 / 130, "PCIE3", note="128b/130b line code")
    host_cpus: str = sourced("2 x Intel Xeon Gold 6438M, 32 cores, 2.2 GHz", "HPEC24 sec. III")
    host_memory_bytes: int = sourced(512 * 1024**3, "HPEC24 sec. III", note="DDR5-4800")

    @property
    def pcie_bytes_s(self) -> float:
        """Per-direction PCIe payload bandwidth of one card (~7.88 GB/s for Gen3 x8)."""
        return self.pcie_lanes * self.pcie_gt_s_per_lane * 1e9 * self.pcie_encoding / 8

    @property
    def power_w(self) -> float:
        return self.cards * self.power_w_per_card


@dataclass(frozen=True)
class PublishedRun:
    """The published appliance run configuration and its measured result (HPEC24, Table I)."""

    model: str = sourced("granite-3b-northpole", "HPEC24 sec. IV")
    users: int = sourced(28, "HPEC24 sec. IV", note="mini-batch N")
    micro_batches: int = sourced(14, "HPEC24 sec. IV", note="M, micro-batch size 2")
    prompt_tokens: int = sourced(1024, "HPEC24 sec. IV")
    generated_tokens: int = sourced(1024, "HPEC24 sec. IV")
    system_throughput_tok_s: float = sourced(28356.0, "HPEC24 Table I")
    latency_ms: float = sourced(0.9874, "HPEC24 (28 / 28,356 s)")
    energy_tok_s_w: float = sourced(42.196, "HPEC24 Table I")
    space_tok_s_per_1e9_transistors: float = sourced(80.56, "HPEC24 Table I")


NORTHPOLE = ChipSpec()
APPLIANCE = ApplianceSpec()
PUBLISHED_RUN = PublishedRun()


# --- comparison points and the scaled-out rack (used by np_jax.cost) ----------------------------
# Sources added for these:
#   HPEC24-R  HPEC24's stated NorthPole/GPU ratios (P1-P4) and the GPU points they imply
#             (GPU throughput per card, latency, energy metric and implied power derived from the
#             published NorthPole row and the ratios; 2-3 significant digits).
#   VENDOR    GPU transistor counts from the vendors' data sheets (H100 80e9, A100 54.2e9, L4 35.8e9).


@dataclass(frozen=True)
class GpuPoint:
    """One GPU operating point of HPEC24's comparison (Table I, Figs. 1-2).

    vLLM 0.5.4, GPTQ w4a16 (Marlin kernels), the same model and settings; GPU power is the board
    rating, the same for every batch size. `energy_tok_s_w`/`power_w` are None where the paper
    states no energy ratio for the point (P4).
    """

    name: str
    gpu: str
    node_nm: int
    meaning: str
    throughput_tok_s_card: float
    latency_ms: float
    energy_tok_s_w: float | None
    power_w: float | None
    transistors: float
    stated_ratios: tuple[tuple[str, float], ...]  # NorthPole / GPU as the paper states them
    source: str = "HPEC24-R (derived from HPEC24's stated ratios); transistors VENDOR"

    @property
    def space_tok_s_per_transistor(self) -> float:
        return self.throughput_tok_s_card / self.transistors

    def ratio(self, metric: str) -> float | None:
        return dict(self.stated_ratios).get(metric)


GPU_TRANSISTORS = {"H100": 80e9, "A100": 54.2e9, "L4": 35.8e9, "L40S": 76.3e9}  # VENDOR

GPU_POINTS: dict[str, GpuPoint] = {
    p.name: p
    for p in [
        GpuPoint("P1", "L4", 5, "best GPU energy metric; highest L4 throughput under 50 ms/token",
                 1373.3, 46.31, 19.18, 71.6, GPU_TRANSISTORS["L4"],
                 (("latency", 46.9), ("space", 2.1), ("energy", 2.2), ("throughput", 1.3))),
        GpuPoint("P2", "H100", 4, "lowest GPU latency (single GPU)",
                 405.3, 2.469, 0.5804, 698.3, GPU_TRANSISTORS["H100"],
                 (("energy", 72.7), ("space", 15.9), ("latency", 2.5))),
        GpuPoint("P3", "A100", 7, "best GPU space metric",
                 3118.7, 20.05, 7.962, 391.7, GPU_TRANSISTORS["A100"],
                 (("latency", 20.3), ("energy", 5.3), ("space", 1.4))),
        GpuPoint("P4", "L4", 5, "lowest L4 latency",
                 49.2, 5.036, None, None, GPU_TRANSISTORS["L4"],
                 (("throughput", 36.0), ("latency", 5.1))),
    ]
}


@dataclass(frozen=True)
class RackSpec:
    """The scaled-out NorthPole rack (spec sec. 8): 18 2U servers of 16 cards, Ethernet between servers."""

    cards: int = sourced(288, "spec sec. 8")
    cards_per_server: int = sourced(16, "spec sec. 8")
    servers: int = sourced(18, "spec sec. 8")
    ethernet_bits_s: float = sourced(200e9, "spec sec. 8", note="200 Gb Ethernet between servers")
    precision: str = sourced("a8c8w4", "spec sec. 8", note="8-bit activations and KV cache, 4-bit weights")
    model: str = sourced("granite-3.3-8b", "spec sec. 8")
    users: int = sourced(28, "spec sec. 8", note="users per instance")
    context: int = sourced(2048, "spec sec. 8")

    @property
    def ethernet_bytes_s(self) -> float:
        return self.ethernet_bits_s / 8


RACK = RackSpec()
