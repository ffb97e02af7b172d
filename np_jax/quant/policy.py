"""The precision policy: which tensor gets which integer width.

The policy is data: an ordered list of (pattern, TensorQuant) rules; the first pattern
(fnmatch) that matches a tensor's role decides its width. Roles are strings such as
`layers.3.attn.q.w` (a weight), `layers.3.attn.x` (the input shared by the q, k and v
projections; `attn.o.x`, `mlp.x` (gate and up), `mlp.down.x` likewise),
`layers.3.attn.kv` (the KV cache), `layers.3.attn.qk.q` (the query entering Q K^T),
`layers.3.attn.probs` (attention probabilities entering P V), `layers.3.mlp.silu` (SiLU input
and output), `lm_head.w`, `lm_head.x`. `PrecisionPolicy.layer(role)` resolves a role of
"every layer" (the decoder's layers share one precision, checked by `check_uniform`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from np_jax.quant.lsq import FLOAT, TensorQuant


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which tensors get which width: ordered (fnmatch pattern, TensorQuant) rules, first match wins."""

    name: str
    rules: tuple[tuple[str, TensorQuant], ...]
    description: str = ""

    def __call__(self, role: str) -> TensorQuant:
        for pattern, tq in self.rules:
            if fnmatch.fnmatchcase(role, pattern):
                return tq
        raise KeyError(f"precision policy {self.name!r} has no rule for tensor {role!r}")

    @property
    def is_float(self) -> bool:
        return all(tq.is_float for _, tq in self.rules)

    def layer(self, role: str) -> TensorQuant:
        """The width of `role` in every transformer layer (e.g. "attn.q.w", "mlp.down.x")."""
        return self(f"layers.0.{role}")

    def output(self, role: str) -> TensorQuant:
        """The width of the output layer's "w" (weights) or "x" (input)."""
        return self(f"lm_head.{role}")

    def check_uniform(self, n_layers: int, roles) -> None:
        """Raise unless layers 1..n-1 have layer 0's width for every role (the layer scan needs it)."""
        for i in range(1, n_layers):
            for r in roles:
                if self(f"layers.{i}.{r}") != self.layer(r):
                    raise ValueError(f"policy {self.name!r} gives layer {i} a different {r} precision; "
                                     "per-layer precision must be uniform")


def _w(bits):  # weights: per-output-channel steps
    return TensorQuant(bits, per_channel=True)


# Roles every integer policy shares: the online rotations' ±1 matrices are exact INT2 weights and
# their inputs are INT8 (models.recipe).
TRANSFORM_RULES = (("*.rot.w", _w(2)), ("*.rot.x", TensorQuant(8, dynamic=True)))


POLICIES: dict[str, PrecisionPolicy] = {
    p.name: p
    for p in [
        PrecisionPolicy(
            "w4a4",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("lm_head.x", TensorQuant(8)), ("*.mlp.silu", TensorQuant(8)),
                               ("*.attn.probs", TensorQuant(4, signed=False)), ("*.w", _w(4)), ("*", TensorQuant(4))),
            "HPEC24: INT4 weights, linear/matmul inputs and KV cache; INT8 output layer and SiLU",
        ),
        PrecisionPolicy(
            "a8c8w4",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("*.attn.probs", TensorQuant(8)), ("*.w", _w(4)),
                               ("*", TensorQuant(8))),
            "rack successor: 8-bit activations and KV cache, 4-bit weights (INT8 output layer)",
        ),
        PrecisionPolicy(
            "w8a8",
            TRANSFORM_RULES + (("*.attn.probs", TensorQuant(8)), ("*.w", _w(8)), ("*", TensorQuant(8))),
            "INT8 weights, activations and KV cache",
        ),
        # Variants the measurements justify (docs/quantization.md): each differs from its base in a
        # few roles, and every results table names the policy it used.
        PrecisionPolicy(
            "w4a4-p8",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("lm_head.x", TensorQuant(8)), ("*.mlp.silu", TensorQuant(8)),
                               ("*.attn.probs", TensorQuant(8)), ("*.w", _w(4)), ("*", TensorQuant(4))),
            "w4a4 with 8-bit attention probabilities (codes 0..127)",
        ),
        PrecisionPolicy(
            "w4a4-p8d8",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("lm_head.x", TensorQuant(8)), ("*.mlp.silu", TensorQuant(8)),
                               ("*.attn.probs", TensorQuant(8)), ("*.mlp.down.x", TensorQuant(8)), ("*.w", _w(4)),
                               ("*", TensorQuant(4))),
            "w4a4 with 8-bit attention probabilities and an 8-bit down-projection input",
        ),
        PrecisionPolicy(
            "a8c8w4-dyn",
            TRANSFORM_RULES + (("lm_head.w", _w(8)), ("*.attn.probs", TensorQuant(8)), ("*.attn.kv", TensorQuant(8)),
                               ("*.mlp.silu", TensorQuant(8)), ("*.attn.qk.q", TensorQuant(8)), ("*.w", _w(4)),
                               ("*", TensorQuant(8, dynamic=True))),
            "a8c8w4 with dynamic per-token steps (vector-unit max-reduce) for the linear layers' inputs",
        ),
        PrecisionPolicy(
            "w8a8-dyn",
            TRANSFORM_RULES + (("*.attn.probs", TensorQuant(8)), ("*.attn.kv", TensorQuant(8)),
                               ("*.mlp.silu", TensorQuant(8)), ("*.attn.qk.q", TensorQuant(8)), ("*.w", _w(8)),
                               ("*", TensorQuant(8, dynamic=True))),
            "w8a8 with dynamic per-token steps (vector-unit max-reduce) for the linear layers' inputs",
        ),
        PrecisionPolicy("float", (("*", FLOAT),), "no quantization (float32 reference)"),
    ]
}


def wants_qk_rotation(policy) -> bool:
    """Whether the online Hadamard on q and k pays for its INT8 x INT2 VMMs at `policy`: when the KV
    cache is narrower than 8 bits (measured: w8a8 loses ~5 % perplexity to the rotation's INT8
    input, w4a4 gains; docs/quantization.md). The one rule the recipes and `np-jax map` share."""
    kv = get_policy(policy).layer("attn.kv")
    return not kv.is_float and kv.bits < 8


def get_policy(name: str | PrecisionPolicy) -> PrecisionPolicy:
    if isinstance(name, PrecisionPolicy):
        return name
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(POLICIES)}") from None
