"""Generation: one host loop for the sequential model and for the emulated appliance.

`Generator.generate` does what the paper's host application does: it pads each user's prompt
into a bucket (powers of two, at least `min_bucket`, so a new prompt length reuses a compiled
prefill), prefills, then runs one-token decode steps with every user at its own position,
greedy or sampled, and stops a user at an end-of-sequence token. How a prefill and a decode
step run is its backend's business:

- `Sequential`: the whole model on one device (`llama.step`), jitted prefill and decode;
- `models.appliance.Appliance`: the card pipeline of a `Mapping` on the appliance runtime.

Sampling (`temperature > 0`) is the Gumbel-max form of sampling from softmax(logits / T):
the token is argmax(logits / T + g) with Gumbel noise g drawn on the host from a key that is a
pure function of (`seed`, step). A run is reproducible, and the appliance, whose output-layer
cards each add their slice of the same noise, samples exactly the tokens the sequential model
does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import ModelConfig, get_config


def bucket_length(n: int, min_bucket: int = 16) -> int:
    """Smallest power of two >= max(n, min_bucket)."""
    m = max(n, min_bucket, 1)
    return 1 << (m - 1).bit_length()


def pick(logits_BxV: jax.Array, noise_BxV: jax.Array | None, temperature) -> jax.Array:
    """The next token: argmax of the logits (greedy, `noise` None) or of logits / T + Gumbel noise."""
    if noise_BxV is None:
        return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
    return jnp.argmax(logits_BxV.astype(jnp.float32) / temperature + noise_BxV, -1).astype(jnp.int32)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per user (prompt excluded, stops after an EOS)
    prefill_s: float
    decode_s: float
    decode_steps: int
    timings: dict = field(default_factory=dict)
    compile_s: float = 0.0  # ahead-of-time compilation, excluded from prefill_s and decode_s

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)


class Backend(Protocol):
    """How a prefill and a decode step run (the sequential model, or the appliance)."""

    cfg: ModelConfig
    cache_len: int
    compile_s: float

    def start(self, batch: int) -> None:
        """Fresh per-user state (an empty KV cache) for `batch` users."""

    def compile(self, batch: int, length: int, sampling: bool) -> None:
        """Compile prefill (prompts padded to `length`) and decode ahead of time (booked in compile_s)."""

    def prefill(self, toks_BxL: np.ndarray, lengths_B: np.ndarray, noise_BxV, temperature: float) -> np.ndarray:
        """Prefill the prompts; the first generated token of every user [B]."""

    def decode(self, tok_B: np.ndarray, pos_B: np.ndarray, noise_BxV, temperature: float) -> np.ndarray:
        """One decode step, each user at its own position; the next token of every user [B]."""

    def info(self) -> dict:
        """What the backend reports in `GenerationResult.timings`."""


class Sequential:
    """The model held in serving form on one device; jitted prefill and decode steps."""

    def __init__(self, serving: llama.Params, cfg: ModelConfig, policy, cache_len: int):
        self.cfg, self.policy, self.cache_len, self.params = cfg, policy, cache_len, serving
        self.compile_s = 0.0
        self._compiled: dict = {}
        self._cache = None
        cfg_, pol = cfg, policy

        def prefill(params, tokens, lengths, cache, noise, temp):
            B, L = tokens.shape
            pos = jnp.broadcast_to(jnp.arange(L), (B, L))
            logits, cache = llama.step(params, tokens, pos, cache, cfg_, pol)
            last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
            return pick(last, noise, temp), cache

        def decode(params, tok, pos, cache, noise, temp):
            logits, cache = llama.step(params, tok[:, None], pos[:, None], cache, cfg_, pol)
            return pick(logits[:, 0], noise, temp), cache

        self._fns = {"prefill": jax.jit(prefill, donate_argnums=(3,)), "decode": jax.jit(decode, donate_argnums=(3,))}

    def start(self, batch: int) -> None:
        self._cache = llama.init_cache(self.cfg, batch, self.cache_len, self.policy)

    def _exe(self, name: str, args):
        key = (name, tuple((a.shape, a.dtype) for a in jax.tree.leaves(args[1:])))
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = self._fns[name].lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
        return self._compiled[key]

    def _args(self, batch: int, length: int, sampling: bool):
        noise = jnp.zeros((batch, self.cfg.vocab_size), jnp.float32) if sampling else None
        cache = jax.eval_shape(lambda: llama.init_cache(self.cfg, batch, self.cache_len, self.policy))
        toks = jnp.zeros((batch, length), jnp.int32)
        vec = jnp.zeros((batch,), jnp.int32)
        return ((self.params, toks, vec, cache, noise, jnp.float32(1)),
                (self.params, vec, vec, cache, noise, jnp.float32(1)))

    def compile(self, batch: int, length: int, sampling: bool) -> None:
        pre, dec = self._args(batch, length, sampling)
        self._exe("prefill", pre)
        self._exe("decode", dec)

    def _run(self, name, a, b, noise, temperature):
        args = (self.params, jnp.asarray(a), jnp.asarray(b), self._cache, noise, jnp.float32(temperature))
        tok, self._cache = self._exe(name, args)(*args)
        return np.asarray(tok)

    def prefill(self, toks_BxL, lengths_B, noise_BxV, temperature):
        return self._run("prefill", toks_BxL, lengths_B, noise_BxV, temperature)

    def decode(self, tok_B, pos_B, noise_BxV, temperature):
        return self._run("decode", tok_B, pos_B, noise_BxV, temperature)

    def info(self) -> dict:
        return {"backend": "sequential", "devices": 1}


class Generator:
    """Batched generation (greedy or sampled) for a model on a backend.

    `Generator(params, cfg, policy, cache_len=...)` runs the sequential model (serving form made
    from `params`, or given as `serving_params`); `Generator(backend=...)` runs any backend
    (e.g. `models.appliance.Appliance`).
    """

    def __init__(self, params=None, cfg: ModelConfig | str | None = None, policy="w4a4", cache_len: int = 512,
                 min_bucket: int = 16, serving_params=None, temperature: float = 0.0, seed: int = 0,
                 backend: Backend | None = None):
        if not (math.isfinite(temperature) and temperature >= 0):
            raise llama.ModelInputError(f"temperature must be a finite number >= 0, got {temperature}")
        if backend is None:
            cfg = get_config(cfg)
            if cache_len > cfg.max_seq_len:
                raise llama.ModelInputError(f"cache of {cache_len} positions exceeds the context of {cfg.max_seq_len}")
            serving = serving_params if serving_params is not None else llama.prepare_serving(params, cfg, policy)
            backend = Sequential(serving, cfg, policy, cache_len)
        self.backend = backend
        self.cfg, self.cache_len = backend.cfg, backend.cache_len
        self.min_bucket = min_bucket
        self.temperature, self.seed = float(temperature), seed
        self._noise = jax.jit(lambda key, step, b: jax.random.gumbel(jax.random.fold_in(key, step),
                                                                     (b, self.cfg.vocab_size), jnp.float32),
                              static_argnums=2)

    @property
    def compile_s(self) -> float:
        return self.backend.compile_s

    def _noise_at(self, key, step: int, batch: int):
        return None if self.temperature == 0 else self._noise(key, step, batch)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids=(),
                 progress: Callable[[int], None] | None = None,
                 on_tokens: Callable[[list[int | None]], None] | None = None) -> GenerationResult:
        """Decode up to `max_new_tokens` for each prompt.

        `progress(n)` is called after every step with the step's count (1); `on_tokens(tokens)`
        with each user's new token (None for a user that has stopped), for streaming.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise llama.ModelInputError("every user needs a non-empty prompt")
        if max_new_tokens < 1:
            raise llama.ModelInputError("max_new_tokens must be >= 1")
        lengths = np.array([len(p) for p in prompts], np.int32)
        need = int(lengths.max()) + max_new_tokens - 1
        if need > self.cache_len:
            raise llama.ModelInputError(
                f"longest prompt ({lengths.max()} tokens) + {max_new_tokens} new tokens needs {need} cache positions; "
                f"the cache holds {self.cache_len} (context limit {self.cfg.max_seq_len})")
        B = len(prompts)
        L = min(bucket_length(int(lengths.max()), self.min_bucket), self.cache_len)
        toks = np.zeros((B, L), np.int32)
        for i, p in enumerate(prompts):
            toks[i, : len(p)] = p
        llama.check_tokens(toks, self.cfg)
        be = self.backend
        compile0 = be.compile_s
        be.compile(B, L, self.temperature > 0)
        be.start(B)
        key = jax.random.key(self.seed)
        temp = self.temperature or 1.0

        t0 = time.perf_counter()
        tok = be.prefill(toks, lengths, self._noise_at(key, 0, B), temp)
        t1 = time.perf_counter()
        out = [[int(t)] for t in tok]
        done = np.array([int(t) in eos_ids for t in tok])
        pos = lengths.copy()
        steps = 0
        if on_tokens:
            on_tokens([int(t) for t in tok])
        if progress:
            progress(1)
        for k in range(max_new_tokens - 1):
            if done.all():
                break
            tok = be.decode(tok, pos, self._noise_at(key, k + 1, B), temp)
            pos += 1
            steps += 1
            new: list[int | None] = []
            for i, t in enumerate(tok):
                if done[i]:
                    new.append(None)
                    continue
                out[i].append(int(t))
                new.append(int(t))
                done[i] = int(t) in eos_ids
            if on_tokens:
                on_tokens(new)
            if progress:
                progress(1)
        t2 = time.perf_counter()
        return GenerationResult(out, prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=steps,
                                compile_s=be.compile_s - compile0, timings=be.info())
