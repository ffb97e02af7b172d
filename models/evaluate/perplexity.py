"""Held-out perplexity: next-token NLL of a model (any precision) over held-out windows."""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import ModelConfig
from models.io.encoders import Encoder
from models.train.data import Corpus, DataConfig, held_out_windows
from np_jax.quant import get_policy


def token_nll(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood (nats), [B, L]."""
    lp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(lp, targets_BxL[..., None], axis=-1)[..., 0]


@functools.lru_cache(maxsize=16)
def nll_fn(cfg: ModelConfig, policy) -> Callable:
    """The jitted evaluation step `evaluate` runs: (summed NLL per window, top-1 predictions)."""
    def f(params, toks_BxL1):
        logits = llama.forward(params, toks_BxL1[:, :-1], cfg, policy)
        return token_nll(logits, toks_BxL1[:, 1:]).sum(-1), jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.jit(f)


def evaluate(params: llama.Params, cfg: ModelConfig, policy, windows_NxL1: np.ndarray, batch_size: int = 4,
             reference_top1: np.ndarray | None = None, progress: Callable[[int], None] | None = None) -> dict:
    """Mean next-token NLL (nats/token), perplexity exp(NLL) over every target of the windows, the
    model's top-1 predictions (`top1`, [N, L]) and, given another model's (`reference_top1`), the
    fraction of positions where they agree (`top1_agreement`). `progress(n)` is called after each
    batch with its count of windows."""
    policy = get_policy(policy)
    windows_NxL1 = np.asarray(windows_NxL1, np.int32)
    n = len(windows_NxL1)
    b = max(1, min(batch_size, n))
    f = nll_fn(cfg, policy)
    total, top1 = 0.0, []
    for i in range(0, n, b):
        chunk = windows_NxL1[i: i + b]
        pad = b - len(chunk)
        if pad:  # keep one compiled shape; padded rows are dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)])
        nll_b, arg_b = f(params, jnp.asarray(chunk))
        total += float(np.asarray(nll_b, np.float64)[: b - pad].sum())
        top1.append(np.asarray(arg_b)[: b - pad])
        if progress:
            progress(b - pad)
    tokens = n * (windows_NxL1.shape[1] - 1)
    nll = total / tokens
    out = {"nll": nll, "perplexity": float(math.exp(min(nll, 700.0))), "tokens": tokens, "top1": np.concatenate(top1)}
    if reference_top1 is not None:
        out["top1_agreement"] = float((out["top1"] == reference_top1).mean())
    return out


def held_out(encoder: Encoder, data: DataConfig, seq_len: int, n_windows: int) -> tuple[np.ndarray, dict]:
    """Held-out windows and a description of the corpus they come from."""
    corpus = Corpus(data, encoder)
    w = held_out_windows(corpus, seq_len, n_windows)
    return w, corpus.describe()
