"""optax support for LSQ training: parameter groups and the activation-step warm start.

Parameter groups, from the leaf's key in the parameter tree (not its rank: stacked layers give
norm gains and biases a leading layer axis):
- `s_w` (weight step sizes) and other `s_*` keys (activation step sizes, KV-cache and SiLU
  steps): no weight decay, each in its own group;
- weight matrices (keys in `DECAYED`: `w`, `embed`): AdamW with weight decay;
- everything else (norm gains, biases): Adam, no decay.
The warm start (HPEC24 sec. V): the activation step sizes' learning rate is multiplied by
`act_step_lr_mult` (200) for the first `act_step_warmup_steps` (250) steps.

Step sizes' rate, absolute or relative: Adam moves every parameter by about its learning rate per
update, whatever the parameter's size. An 8-bit step is about 18 times (127/7) smaller than a
4-bit step of the same tensor, so one absolute rate cannot suit both, nor a policy that mixes the
two widths. `relative_steps=True` multiplies each step-size update by the step's own magnitude
(Adam on log(step), to first order): every step then moves by about the rate times itself.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

GROUPS = ("weights", "other", "weight_steps", "act_steps")
DECAYED = ("w", "embed")


def _key_name(path) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def param_group(path, leaf) -> str:
    name = _key_name(path)
    if name == "s_w":
        return "weight_steps"
    if name.startswith("s_"):
        return "act_steps"
    return "weights" if name in DECAYED else "other"


def param_groups(params):
    """The group label of every leaf (a pytree of strings with the structure of `params`)."""
    return jax.tree_util.tree_map_with_path(param_group, params)


def scale_by_magnitude() -> optax.GradientTransformation:
    """Multiply every update by |its parameter| (stateless; needs `params` in `update`)."""

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("scale_by_magnitude needs the parameters: call update(updates, state, params)")
        return jax.tree.map(lambda u, p: u * jax.numpy.abs(p).astype(u.dtype), updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class TensorRmsState(NamedTuple):
    count: jax.Array
    mu: optax.Updates  # first moment, per element
    nu: optax.Updates  # second moment, one number per tensor


def scale_by_tensor_rms(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-20) -> optax.GradientTransformation:
    """Adam with one second moment per tensor (the mean of its squared gradients) instead of one per
    element: every element moves in proportion to its own gradient, the tensor's RMS update being
    about the rate. Element-wise Adam moves every element by about the rate whatever its gradient:
    fitting integer codes with it flips every code whose gradient keeps its sign (block-wise
    reconstruction of the codes, models.recipe)."""

    def init(params):
        return TensorRmsState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params),
                              jax.tree.map(lambda p: jnp.zeros([], jnp.float32), params))

    def update(updates, state, params=None):
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.mean(jnp.square(g.astype(jnp.float32))), state.nu,
                          updates)
        c1, c2 = 1 - b1 ** count.astype(jnp.float32), 1 - b2 ** count.astype(jnp.float32)
        out = jax.tree.map(lambda m, v: (m / c1 / jnp.sqrt(v / c2 + eps)).astype(m.dtype), mu, nu)
        return out, TensorRmsState(count, mu, nu)

    return optax.GradientTransformation(init, update)


def _step_adam(rate, b1: float, b2: float, relative: bool) -> optax.GradientTransformation:
    if not relative:
        return optax.adam(rate, b1=b1, b2=b2)
    return optax.chain(optax.scale_by_adam(b1=b1, b2=b2), scale_by_magnitude(), optax.scale_by_learning_rate(rate))


def lsq_optimizer(learning_rate: float | optax.Schedule, *, weight_decay: float = 0.0,
                  act_step_lr_mult: float = 200.0, act_step_warmup_steps: int = 250,
                  step_learning_rate: float | None = None, relative_steps: bool = False, b1: float = 0.9,
                  b2: float = 0.95, grad_clip: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW for weights, Adam for step sizes (no decay), with the activation-step warm start.

    `step_learning_rate` defaults to `learning_rate` (a float) for the step-size groups;
    `relative_steps`: it is a fraction of each step's size per update (module docstring).
    """
    base = learning_rate if step_learning_rate is None else step_learning_rate
    base_fn = base if callable(base) else (lambda _: base)
    warm = lambda count: base_fn(count) * jax.numpy.where(count < act_step_warmup_steps, act_step_lr_mult, 1.0)
    tx = optax.multi_transform(
        {
            "weights": optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay),
            "other": optax.adam(learning_rate, b1=b1, b2=b2),
            "weight_steps": _step_adam(base_fn, b1, b2, relative_steps),
            "act_steps": _step_adam(warm, b1, b2, relative_steps),
        },
        param_groups,
    )
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip else tx
