"""The performance, energy and space model of the NorthPole appliance (HPEC24 Table I).

An analytic model in pure `jax.numpy`: every quantity is a differentiable function of the
design (`Design`), the workload (`Workload`) and the widths (`Bits`), so `jax.grad` gives
sensitivities and `jax.vmap` evaluates thousands of designs at once. It evaluates a given
`np_jax.appliance.Mapping` and contains no mapper of its own; docs/performance.md has the
equations.

- `params`: `Design`, `Workload`, `Bits`, `ModelShape`, straight-through rounding.
- `phases`: the per-core work of one layer's phases and of an output-layer card.
- `schedule`: the GPipe timing and the HPEC24 metrics.
- `estimate`: `evaluate_mapping`, the relaxed form (`evaluate`), `plan_mapping` (the best
  mapping by predicted throughput), `predict`.
- `calibration`: `calibrate` (the one calibrated parameter), `published_comparison`, `gpu_table`.
- `planner`: `plan_instance`, the scale-out planner for the rack.
- `dse`: sensitivities, vmapped sweeps and gradient search.
"""

from np_jax.cost.calibration import calibrate, gpu_table, parameters, published_comparison
from np_jax.cost.params import CALIBRATED_PHASE_LATENCY_CYCLES, Bits, Design, ModelShape, Workload, ceil_ste, floor_ste
from np_jax.cost.phases import PHASE_NAMES, Phases, layer_phases, output_phases, scratch_bytes_per_token
from np_jax.cost import dse
from np_jax.cost.planner import MAX_USERS, plan_instance
from np_jax.cost.estimate import (candidate_structures, pack_layer, evaluate, evaluate_mapping, evaluate_structures, mapping_structure,
                                 output_cards_relaxed, plan_mapping, predict, relaxed_structure)
from np_jax.cost.schedule import Stages, metrics, schedule

__all__ = [
    "MAX_USERS",
    "PHASE_NAMES",
    "Bits",
    "CALIBRATED_PHASE_LATENCY_CYCLES",
    "Design",
    "ModelShape",
    "Phases",
    "Stages",
    "Workload",
    "calibrate",
    "candidate_structures",
    "ceil_ste",
    "dse",
    "evaluate",
    "evaluate_mapping",
    "evaluate_structures",
    "floor_ste",
    "gpu_table",
    "layer_phases",
    "mapping_structure",
    "metrics",
    "output_cards_relaxed",
    "output_phases",
    "pack_layer",
    "parameters",
    "plan_instance",
    "plan_mapping",
    "predict",
    "published_comparison",
    "relaxed_structure",
    "schedule",
    "scratch_bytes_per_token",
]
