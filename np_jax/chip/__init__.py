"""The NorthPole chip (one card): a core's integer VMM, the 16 x 16 core array, per-core SRAM,
the FP16 vector unit and the activation-function unit.

- `core`: `core_vmm` (int32 accumulation, static overflow check: `accumulator_bound`,
  `check_accumulator`), `int_dot` (the exact integer dot in the form the codes are held), the
  saturating partial-sum network, sub-byte packing, the per-core work formula `block_work`.
- `array`: `Tiling` (which core holds which block; the one formula `tile_blocks`),
  `TiledWeights`, `tile_weights`, `array_vmm`, `network_never_saturates`, the code forms
  (`dot_form`, `with_form`).
- `memory`: `CoreMemory`, the byte ledger of one card's cores, and `CoreMemoryError`.
- `vector_unit`: FP16 elementwise math, fixed-order reductions, `quantize` (the one definition;
  `quantize_between`: its range by element, rows of two widths in one pass).
- `activation_unit`: lookup-table activations (`build_lut`, `apply_lut`).

The modules themselves are offered too (`from np_jax.chip import core`).
"""

from np_jax.chip import activation_unit, array, core, memory, vector_unit
from np_jax.chip.activation_unit import apply_lut, build_lut, silu
from np_jax.chip.array import (TiledWeights, Tiling, array_vmm, array_vmm_cost, core_mesh, dot_form,
                               network_never_saturates, shard_weights, tile_blocks, tile_weights, with_form)
from np_jax.chip.core import (INT32_MAX, INT32_MIN, PSUM_BYTES, SUPPORTED_BITS, AccumulatorOverflowError, VmmCost,
                              accumulator_bound, block_work, check_accumulator, check_bits, core_vmm, core_vmm_cost,
                              int_dot, int_range, pack_bits, saturating_add, saturating_sum, stored_bytes, unpack_bits,
                              vmm_cycles)
from np_jax.chip.memory import Allocation, CoreMemory, CoreMemoryError
from np_jax.chip.vector_unit import (FP16_BYTES, VECTOR_DTYPE, code_range, dequantize, quantize, quantize_between,
                                     rmsnorm, scale_accumulator, softmax, tree_sum)

__all__ = [
    "AccumulatorOverflowError",
    "Allocation",
    "CoreMemory",
    "CoreMemoryError",
    "FP16_BYTES",
    "INT32_MAX",
    "INT32_MIN",
    "PSUM_BYTES",
    "SUPPORTED_BITS",
    "TiledWeights",
    "Tiling",
    "VECTOR_DTYPE",
    "VmmCost",
    "accumulator_bound",
    "activation_unit",
    "apply_lut",
    "array",
    "array_vmm",
    "array_vmm_cost",
    "block_work",
    "build_lut",
    "check_accumulator",
    "check_bits",
    "code_range",
    "core",
    "core_mesh",
    "core_vmm",
    "core_vmm_cost",
    "dequantize",
    "dot_form",
    "int_dot",
    "int_range",
    "memory",
    "network_never_saturates",
    "pack_bits",
    "quantize",
    "quantize_between",
    "rmsnorm",
    "saturating_add",
    "saturating_sum",
    "scale_accumulator",
    "shard_weights",
    "silu",
    "softmax",
    "stored_bytes",
    "tile_blocks",
    "tile_weights",
    "tree_sum",
    "unpack_bits",
    "vector_unit",
    "vmm_cycles",
    "with_form",
]
