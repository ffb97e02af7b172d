"""The 16-card appliance: the mapping of a model onto cards and cores, the GPipe pipeline of
cards over a device mesh, the host runtime, and meshes that span processes.

- `mapping`: `Mapping` (the one source of truth for where everything is), `map_model`,
  `check_capacity`, and the placement rules as plain arithmetic that the performance model
  evaluates too (`kv_cache_bytes`, `scratch_bytes`, `frame_bytes`, `output_core_bytes`,
  `fewest_output_cards`, `layer_blocks`, `default_micro_batches`, `matrix_tilings`,
  `output_tiling`, the layer phases `LAYER_PHASES` and their bytes, ...).
- `pipeline`: `Schedule` (card roles, depth, ticks), `run_pipeline` (`jax.shard_map`),
  `run_cards_in_order` (the resident cards on one device), `card_mesh`, `place_cards`.
- `runtime`: `ApplianceRuntime` (cards configured once, micro-batches streamed), `FrameLedger`,
  the device choice (`default_devices`, `choose_devices`, `check_devices`).
- `distributed`: multi-process initialisation with bounded failures (`initialize`,
  `DistributedError`, `request_cpu_devices`, `settings_from_env`), `to_global` / `to_host`.

The modules themselves are offered too (`from np_jax.appliance import mapping`).
"""

from np_jax.appliance import distributed, mapping, pipeline, runtime
from np_jax.appliance.distributed import (DistributedError, initialize, request_cpu_devices, settings_from_env,
                                          to_global, to_host)
from np_jax.appliance.mapping import (LAYER_MATRICES, LAYER_PHASES, OUTPUT_PHASES, ROTATION_PHASES, CardPlan,
                                      DecoderShape, Mapping, check_capacity, default_micro_batches, fewest_output_cards,
                                      frame_bytes, kv_cache_bytes, largest_block, layer_blocks, layer_phase_bytes,
                                      map_model, matrix_tilings, min_layer_cards, online_matrices, output_cards_needed,
                                      output_columns, output_core_bytes, output_tiling, pack_phases, phase_active,
                                      scratch_bytes, scratch_core_bytes, split_layer)
from np_jax.appliance.pipeline import ROLES, Schedule, card_mesh, place_cards, run_cards_in_order, run_pipeline
from np_jax.appliance.runtime import ApplianceRuntime, FrameLedger, check_devices, choose_devices, default_devices

__all__ = [
    "ApplianceRuntime",
    "CardPlan",
    "DecoderShape",
    "DistributedError",
    "FrameLedger",
    "LAYER_MATRICES",
    "LAYER_PHASES",
    "Mapping",
    "OUTPUT_PHASES",
    "ROLES",
    "ROTATION_PHASES",
    "Schedule",
    "card_mesh",
    "check_capacity",
    "check_devices",
    "choose_devices",
    "default_devices",
    "default_micro_batches",
    "distributed",
    "fewest_output_cards",
    "frame_bytes",
    "initialize",
    "kv_cache_bytes",
    "largest_block",
    "layer_blocks",
    "layer_phase_bytes",
    "map_model",
    "mapping",
    "matrix_tilings",
    "min_layer_cards",
    "online_matrices",
    "output_cards_needed",
    "output_columns",
    "output_core_bytes",
    "output_tiling",
    "pack_phases",
    "phase_active",
    "pipeline",
    "place_cards",
    "request_cpu_devices",
    "run_cards_in_order",
    "run_pipeline",
    "runtime",
    "scratch_bytes",
    "scratch_core_bytes",
    "settings_from_env",
    "split_layer",
    "to_global",
    "to_host",
]
