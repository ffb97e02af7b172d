"""Batched generation: prefill each user's prompt, then one-token decode steps.

Greedy by default; with `temperature > 0` tokens are sampled from softmax(logits / T) with a
key that is a pure function of (`seed`, step), so a run is reproducible.

Prompt lengths are bucketed (powers of two, at least `min_bucket`) so a new prompt length
reuses a compiled prefill; the cache length is fixed per `Generator`, so decode compiles once.
Every user decodes at its own position.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import ModelConfig, get_config


def bucket_length(n: int, min_bucket: int = 16) -> int:
    """Smallest power of two >= max(n, min_bucket)."""
    m = max(n, min_bucket, 1)
    return 1 << (m - 1).bit_length()


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


class Generator:
    """Greedy (or sampled) generation for a batch of users with a model held in serving form."""

    def __init__(self, params, cfg: ModelConfig | str, policy="w4a4", cache_len: int = 512, min_bucket: int = 16,
                 serving_params=None, temperature: float = 0.0, seed: int = 0):
        self.cfg = get_config(cfg)
        self.policy = policy
        self.cache_len = cache_len
        self.min_bucket = min_bucket
        if cache_len > self.cfg.max_seq_len:
            raise llama.ModelInputError(f"cache of {cache_len} positions exceeds the context of {self.cfg.max_seq_len}")
        if not temperature >= 0:
            raise llama.ModelInputError(f"temperature must be >= 0, got {temperature}")
        self.temperature, self.seed = float(temperature), seed
        self.params = serving_params if serving_params is not None else llama.prepare_serving(params, self.cfg, policy)
        cfg_, pol, temp = self.cfg, policy, self.temperature

        def pick(logits_BxV, key):
            if temp == 0:
                return jnp.argmax(logits_BxV, -1).astype(jnp.int32)
            return jax.random.categorical(key, logits_BxV.astype(jnp.float32) / temp, axis=-1).astype(jnp.int32)

        @jax.jit
        def prefill(params, tokens, lengths, cache, key):
            B, L = tokens.shape
            pos = jnp.broadcast_to(jnp.arange(L), (B, L))
            logits, cache = llama.step(params, tokens, pos, cache, cfg_, pol)
            last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
            return pick(last, key), cache

        @jax.jit
        def decode(params, tok, pos, cache, key):
            logits, cache = llama.step(params, tok[:, None], pos[:, None], cache, cfg_, pol)
            return pick(logits[:, 0], key), cache

        self._prefill, self._decode = prefill, decode
        self._compiled: dict = {}
        self.compile_s = 0.0

    def _executable(self, fn, args):
        """`fn` compiled ahead of time for these argument shapes (compile time booked in `compile_s`)."""
        key = (fn, tuple((a.shape, a.dtype) for a in jax.tree.leaves(args[1:])))
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = fn.lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
        return self._compiled[key]

    def _call(self, fn, *args):
        return self._executable(fn, args)(*args)

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids=(), progress=None) -> GenerationResult:
        """Decode up to `max_new_tokens` for each prompt. `progress(n)` is called per step."""
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
        L = min(bucket_length(int(lengths.max()), self.min_bucket), self.cache_len)
        toks = np.zeros((len(prompts), L), np.int32)
        for i, p in enumerate(prompts):
            toks[i, : len(p)] = p
        llama.check_tokens(toks, self.cfg)
        cache = llama.init_cache(self.cfg, len(prompts), self.cache_len, self.policy)
        compile0 = self.compile_s
        base_key = jax.random.key(self.seed)
        args = (self.params, jnp.asarray(toks), jnp.asarray(lengths), cache, jax.random.fold_in(base_key, 0))
        self._executable(self._prefill, args)
        self._executable(self._decode, (self.params, jnp.zeros(len(prompts), jnp.int32), jnp.asarray(lengths), cache,
                                        base_key))

        t0 = time.perf_counter()
        tok, cache = self._call(self._prefill, *args)
        tok = np.asarray(tok)
        t1 = time.perf_counter()
        out = [[int(t)] for t in tok]
        done = np.array([int(t) in eos_ids for t in tok])
        pos = lengths.copy()
        steps = 0
        if progress:
            progress(1)
        for k in range(max_new_tokens - 1):
            if done.all():
                break
            tok_j, cache = self._call(self._decode, self.params, jnp.asarray(tok), jnp.asarray(pos), cache,
                                      jax.random.fold_in(base_key, k + 1))
            tok = np.asarray(tok_j)
            pos += 1
            steps += 1
            for i, t in enumerate(tok):
                if not done[i]:
                    out[i].append(int(t))
                    done[i] = int(t) in eos_ids
            if progress:
                progress(1)
        t2 = time.perf_counter()
        return GenerationResult(out, prefill_s=t1 - t0, decode_s=t2 - t1, decode_steps=steps,
                                compile_s=self.compile_s - compile0)

