"""Quantization: LSQ quantizers and step sizes, the precision policy, the chip's quantized
products (one integer forward for training and serving), and the optimizer groups.

- `lsq`: `TensorQuant`, `lsq_fake_quant` (LSQ custom VJP), step initialisation, grad scales.
- `policy`: `PrecisionPolicy`, the named `POLICIES`, `get_policy`.
- `products`: `scaled_int_product` / `quantized_product`, `linear`, `prepare_linear`, `silu_lut`.
- `optim`: optax parameter groups and the activation-step warm start (`lsq_optimizer`).
"""

from np_jax.quant.lsq import (FLOAT, TensorQuant, act_grad_scale, check_step, fake_quant, grad_scale, init_step,
                              init_step_mse, lsq_fake_quant, weight_grad_scale)
from np_jax.quant.policy import POLICIES, PrecisionPolicy, get_policy, wants_qk_rotation

__all__ = [
    "FLOAT",
    "POLICIES",
    "PrecisionPolicy",
    "TensorQuant",
    "act_grad_scale",
    "check_step",
    "fake_quant",
    "get_policy",
    "grad_scale",
    "init_step",
    "init_step_mse",
    "lsq_fake_quant",
    "wants_qk_rotation",
    "weight_grad_scale",
]
