"""optax support for LSQ training: parameter groups and the activation-step warm start.

Parameter groups, from the leaf's key in the parameter tree (not its rank: stacked layers give
norm gains and biases a leading layer axis):
- `s_w` (weight step sizes) and other `s_*` keys (activation step sizes, KV-cache and SiLU
  steps): no weight decay, each in its own group;
- weight matrices (keys in `DECAYED`: `w`, `embed`): AdamW with weight decay;
- everything else (norm gains, biases): Adam, no decay.
The warm start (HPEC24 sec. V): the activation step sizes' learning rate is multiplied by
`act_step_lr_mult` (200) for the first `act_step_warmup_steps` (250) steps.
"""

from __future__ import annotations

import jax
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


def lsq_optimizer(learning_rate: float | optax.Schedule, *, weight_decay: float = 0.0,
                  act_step_lr_mult: float = 200.0, act_step_warmup_steps: int = 250,
                  step_learning_rate: float | None = None, b1: float = 0.9, b2: float = 0.95,
                  grad_clip: float | None = 1.0) -> optax.GradientTransformation:
    """AdamW for weights, Adam for step sizes (no decay), with the activation-step warm start.

    `step_learning_rate` defaults to `learning_rate` (a float) for the step-size groups.
    """
    base = learning_rate if step_learning_rate is None else step_learning_rate
    base_fn = base if callable(base) else (lambda _: base)
    warm = lambda count: base_fn(count) * jax.numpy.where(count < act_step_warmup_steps, act_step_lr_mult, 1.0)
    tx = optax.multi_transform(
        {
            "weights": optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay),
            "other": optax.adam(learning_rate, b1=b1, b2=b2),
            "weight_steps": optax.adam(base_fn, b1=b1, b2=b2),
            "act_steps": optax.adam(warm, b1=b1, b2=b2),
        },
        param_groups,
    )
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx) if grad_clip else tx
