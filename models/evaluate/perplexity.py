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
def _nll_fn(cfg: ModelConfig, policy: str) -> Callable:
    def f(params, toks_BxL1):
        return token_nll(llama.forward(params, toks_BxL1[:, :-1], cfg, policy), toks_BxL1[:, 1:]).sum(-1)
    return jax.jit(f)


def evaluate(params: llama.Params, cfg: ModelConfig, policy: str, windows_NxL1: np.ndarray,
             batch_size: int = 4) -> dict:
    """Mean next-token NLL (nats/token) and perplexity exp(NLL) over every target of the windows."""
    policy = get_policy(policy).name
    windows_NxL1 = np.asarray(windows_NxL1, np.int32)
    n = len(windows_NxL1)
    b = max(1, min(batch_size, n))
    f = _nll_fn(cfg, policy)
    total = 0.0
    for i in range(0, n, b):
        chunk = windows_NxL1[i: i + b]
        pad = b - len(chunk)
        if pad:  # keep one compiled shape; padded rows are dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)])
        total += float(np.asarray(f(params, jnp.asarray(chunk)), np.float64)[: b - pad].sum())
    tokens = n * (windows_NxL1.shape[1] - 1)
    nll = total / tokens
    return {"nll": nll, "perplexity": float(math.exp(min(nll, 700.0))), "tokens": tokens}


def held_out(encoder: Encoder, data: DataConfig, seq_len: int, n_windows: int) -> tuple[np.ndarray, dict]:
    """Held-out windows and a description of the corpus they come from."""
    corpus = Corpus(data, encoder)
    w = held_out_windows(corpus, seq_len, n_windows)
    return w, corpus.describe()
