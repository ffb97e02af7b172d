"""Held-out perplexity: next-token NLL of a model (any precision) over held-out windows, and how
far its next-token distributions are from float's.

KL is exact: the evaluation step runs the float reference's forward on the same batch next to
the model's and reduces KL(float || model) per window inside the jitted step. Keeping float's
log-probabilities for every window instead would take N x L x vocabulary floats (1.6 GB for
SmolLM2's 32 x 256 x 49152); a top-k summary would only bound KL from below. The price is one
float forward per batch, and two [batch, L, vocabulary] float32 arrays held transiently
(2 x 200 MB for SmolLM2 at batch 4).
"""

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


def token_kl(reference_BxLxV: jax.Array, logits_BxLxV: jax.Array) -> jax.Array:
    """Per-token KL(P_reference || P_model) (nats), [B, L], each P the softmax of its logits."""
    lp = jax.nn.log_softmax(reference_BxLxV.astype(jnp.float32), axis=-1)
    lq = jax.nn.log_softmax(logits_BxLxV.astype(jnp.float32), axis=-1)
    # KL >= 0; float32 rounding can leave a hair below it where the two distributions agree
    return jnp.maximum((jnp.exp(lp) * (lp - lq)).sum(-1), 0.0)


@functools.lru_cache(maxsize=16)
def nll_fn(cfg: ModelConfig, policy, reference_cfg: ModelConfig | None = None) -> Callable:
    """The jitted evaluation step `evaluate` runs: `f(params, toks)` gives (summed NLL per window,
    top-1 predictions); given the float reference's config, `f(params, reference_params, toks)`
    also gives the summed KL(float reference || model) per window."""
    def model(params, toks_BxL1):
        logits = llama.forward(params, toks_BxL1[:, :-1], cfg, policy)
        return logits, token_nll(logits, toks_BxL1[:, 1:]).sum(-1), jnp.argmax(logits, -1).astype(jnp.int32)

    if reference_cfg is None:
        return jax.jit(lambda params, toks_BxL1: model(params, toks_BxL1)[1:])

    def f(params, reference_params, toks_BxL1):
        logits, nll, top1 = model(params, toks_BxL1)
        ref = llama.forward(reference_params, toks_BxL1[:, :-1], reference_cfg, "float")
        return nll, top1, token_kl(ref, logits).sum(-1)
    return jax.jit(f)


def evaluate(params: llama.Params, cfg: ModelConfig, policy, windows_NxL1: np.ndarray, batch_size: int = 4,
             reference_top1: np.ndarray | None = None, progress: Callable[[int], None] | None = None,
             reference_params: llama.Params | None = None, reference_cfg: ModelConfig | None = None) -> dict:
    """Mean next-token NLL (nats/token), perplexity exp(NLL) over every target of the windows, the
    model's top-1 predictions (`top1`, [N, L]) and, given another model's (`reference_top1`), the
    fraction of positions where they agree (`top1_agreement`). Given a float reference model
    (`reference_params`, of config `reference_cfg`, default `cfg`), also `kl`: the mean over every
    position of KL(reference || model) in nats/token. `progress(n)` is called after each batch
    with its count of windows."""
    policy = get_policy(policy)
    windows_NxL1 = np.asarray(windows_NxL1, np.int32)
    n = len(windows_NxL1)
    b = max(1, min(batch_size, n))
    with_kl = reference_params is not None
    f = nll_fn(cfg, policy, (reference_cfg or cfg) if with_kl else None)
    total, total_kl, top1 = 0.0, 0.0, []
    for i in range(0, n, b):
        chunk = windows_NxL1[i: i + b]
        pad = b - len(chunk)
        if pad:  # keep one compiled shape; padded rows are dropped
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, 0)])
        out_b = f(params, reference_params, jnp.asarray(chunk)) if with_kl else f(params, jnp.asarray(chunk))
        nll_b, arg_b = out_b[:2]
        total += float(np.asarray(nll_b, np.float64)[: b - pad].sum())
        if with_kl:
            total_kl += float(np.asarray(out_b[2], np.float64)[: b - pad].sum())
        top1.append(np.asarray(arg_b)[: b - pad])
        if progress:
            progress(b - pad)
    tokens = n * (windows_NxL1.shape[1] - 1)
    nll = total / tokens
    out = {"nll": nll, "perplexity": float(math.exp(min(nll, 700.0))), "tokens": tokens, "top1": np.concatenate(top1)}
    if reference_top1 is not None:
        out["top1_agreement"] = float((out["top1"] == reference_top1).mean())
    if with_kl:
        out["kl"] = total_kl / tokens
    return out


def held_out(encoder: Encoder, data: DataConfig, seq_len: int, n_windows: int) -> tuple[np.ndarray, dict]:
    """Held-out windows and a description of the corpus they come from."""
    corpus = Corpus(data, encoder)
    w = held_out_windows(corpus, seq_len, n_windows)
    return w, corpus.describe()


ROUNDED_FORMATS = {"bf16": jnp.bfloat16, "fp16": jnp.float16}


def rounded_weights(params: llama.Params, fmt: str) -> llama.Params:
    """The float model with every floating-point parameter rounded to `fmt` (bf16: 8 significant
    bits; fp16: 11, and its range) and back to its own type, to nearest: a perturbation of the
    weights far below any quantizer's (2**-8 and 2**-11 of each weight at most, where INT8's error
    reaches 2**-8 of the largest weight of its row).
    Its rows in `np-jax eval --rounded-float` are the floor of each measure: how far from float a
    model so close to it already lands."""
    if fmt not in ROUNDED_FORMATS:
        raise ValueError(f"rounded format must be one of {sorted(ROUNDED_FORMATS)}, got {fmt!r}")
    to = ROUNDED_FORMATS[fmt]
    return jax.tree.map(lambda x: jnp.asarray(x).astype(to).astype(x.dtype)
                        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, params)
