"""The 16-card appliance: the mapping of a model onto cards and cores, the GPipe pipeline of
cards over a device mesh, the host runtime, and meshes that span processes.

- `mapping`: `Mapping` (the one source of truth for where everything is), `map_model`, the
  placement rules.
- `pipeline`: `Schedule` (card roles, depth, ticks), `run_pipeline` (`jax.shard_map`), `card_mesh`.
- `runtime`: `ApplianceRuntime` (cards configured once, micro-batches streamed), `FrameLedger`.
- `distributed`: multi-process initialisation with bounded failures, `to_global` / `to_host`.
"""

from np_jax.appliance.mapping import (LAYER_PHASES, CardPlan, DecoderShape, Mapping, map_model, matrix_tilings,
                                      output_cards_needed, output_tiling)
from np_jax.appliance.pipeline import ROLES, Schedule, card_mesh, place_cards, run_pipeline
from np_jax.appliance.runtime import ApplianceRuntime, FrameLedger

__all__ = [
    "ApplianceRuntime",
    "CardPlan",
    "DecoderShape",
    "FrameLedger",
    "LAYER_PHASES",
    "Mapping",
    "ROLES",
    "Schedule",
    "card_mesh",
    "map_model",
    "matrix_tilings",
    "output_cards_needed",
    "output_tiling",
    "place_cards",
    "run_pipeline",
]
