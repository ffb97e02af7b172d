"""Quantization: LSQ quantizers and step sizes, the precision policy, the chip's quantized
products (one integer forward for training and serving), rotations, GPTQ and the optimizer groups.

- `lsq`: `TensorQuant`, `lsq_fake_quant` (LSQ custom VJP), step initialisation (`init_step`,
  `init_step_mse`, `init_step_max`), the dynamic per-token step `dynamic_step`, grad scales.
- `policy`: `PrecisionPolicy`, the named `POLICIES` (and the `TRANSFORM_RULES` they share), `get_policy`, `load_policy` (a policy file), `wants_qk_rotation`.
- `products`: `ProductSpec`, `act_codes`, `scaled_int_product` / `quantized_product`, `linear`,
  `prepare_linear`, `check_linear_steps`, `silu_lut`.
- `hadamard`: Sylvester, Paley and Kronecker constructions (`hadamard`, `orthogonal`,
  `random_signs`, `factors`, `is_supported`, `kron_apply_int`, `hadamard.apply`).
- `gptq`: `gptq`, round-to-nearest `rtn` and their Hessian helpers.
- `optim`: optax parameter groups (`param_group`, `param_groups`), the activation-step warm
  start (`lsq_optimizer`), and Adam with one second moment per tensor (`scale_by_tensor_rms`).

The modules themselves are offered too (`from np_jax.quant import hadamard`).
"""

from np_jax.quant import gptq, hadamard, lsq, optim, policy, products
from np_jax.quant.gptq import rtn
from np_jax.quant.hadamard import factors, is_supported, kron_apply_int, orthogonal, random_signs
from np_jax.quant.lsq import (FLOAT, TensorQuant, act_grad_scale, check_step, dynamic_step, fake_quant, grad_scale,
                              init_step, init_step_max, init_step_mse, lsq_fake_quant, weight_grad_scale)
from np_jax.quant.optim import lsq_optimizer, param_group, param_groups, scale_by_tensor_rms
from np_jax.quant.policy import POLICIES, TRANSFORM_RULES, PrecisionPolicy, get_policy, load_policy, wants_qk_rotation
from np_jax.quant.products import (ProductSpec, act_codes, check_linear_steps, linear, prepare_linear,
                                   quantized_product, scaled_int_product, silu_lut)

# `gptq` and `hadamard` name both a module and its main function: the package offers the modules
# (call `gptq.gptq`, `hadamard.hadamard`).
__all__ = [
    "FLOAT",
    "POLICIES",
    "TRANSFORM_RULES",
    "PrecisionPolicy",
    "ProductSpec",
    "TensorQuant",
    "act_codes",
    "act_grad_scale",
    "check_linear_steps",
    "check_step",
    "dynamic_step",
    "factors",
    "fake_quant",
    "get_policy",
    "load_policy",
    "gptq",
    "grad_scale",
    "hadamard",
    "init_step",
    "init_step_max",
    "init_step_mse",
    "is_supported",
    "kron_apply_int",
    "linear",
    "lsq",
    "lsq_fake_quant",
    "lsq_optimizer",
    "optim",
    "orthogonal",
    "param_group",
    "param_groups",
    "policy",
    "prepare_linear",
    "products",
    "quantized_product",
    "random_signs",
    "rtn",
    "scale_by_tensor_rms",
    "scaled_int_product",
    "silu_lut",
    "wants_qk_rotation",
    "weight_grad_scale",
]
