"""The decoder on the emulated appliance: card parameters, card programs and the host loop.

`build_cards` turns serving parameters and a card layout (np_jax.mapping) into card-stacked
parameters: every card carries a layer slot (its layers, padded to the most layers any card
holds, with a count) and an output-layer slot (its vocabulary columns of the output layer and
the final norm); a card uses the slot of its role. The host side (`ApplianceGenerator`) does
what the paper's host application does: tokenizer-side ids in, embedding on the host, greedy
decoding of the output cards' results, the new token looped back as the next input.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import ModelConfig
from models.generate import GenerationResult, bucket_length
from np_jax import layers as qlayers
from np_jax import vector_unit as vu
from np_jax.array import tile_weights
from np_jax.mapping import Mapping
from np_jax.pipeline import Schedule
from np_jax.runtime import ApplianceRuntime


@dataclass(frozen=True)
class CardLayout:
    """Which layers / vocabulary columns each card holds (from a Mapping or built directly)."""

    roles: tuple[str, ...]
    layers: tuple[tuple[int, ...], ...]
    vocab_slices: tuple[tuple[int, int] | None, ...]
    micro_batches: int

    @classmethod
    def from_mapping(cls, m: Mapping) -> "CardLayout":
        return cls(tuple(c.role for c in m.cards), tuple(c.layers for c in m.cards),
                   tuple(c.vocab_slice for c in m.cards), m.micro_batches)

    @classmethod
    def simple(cls, cfg: ModelConfig, cards: int, micro_batches: int, head_cards: int = 1) -> "CardLayout":
        """Near-equal contiguous layer blocks on cards - head_cards cards, vocabulary split over the rest."""
        n_layer_cards = min(cards - head_cards, cfg.n_layers)
        if n_layer_cards < 1:
            raise ValueError(f"{cards} cards leave no layer card after {head_cards} output-layer card(s)")
        b = np.linspace(0, cfg.n_layers, n_layer_cards + 1).round().astype(int)
        cols = -(-cfg.vocab_size // head_cards)
        roles = ["layers"] * n_layer_cards + ["head"] * head_cards + ["idle"] * (cards - n_layer_cards - head_cards)
        layers = [tuple(range(b[i], b[i + 1])) for i in range(n_layer_cards)] + [()] * (cards - n_layer_cards)
        vs = [None] * n_layer_cards + [(j * cols, min((j + 1) * cols, cfg.vocab_size)) for j in range(head_cards)]
        vs += [None] * (cards - n_layer_cards - head_cards)
        return cls(tuple(roles), tuple(layers), tuple(vs), micro_batches)

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.roles, self.micro_batches)


def build_cards(serving: llama.Params, cfg: ModelConfig, policy, layout: CardLayout) -> dict:
    """Card-stacked parameters [cards, ...] for the layer slot and the output-layer slot.

    `serving` may be in serving form (integer codes, from `llama.prepare_serving`) or in
    training form (float weights): the latter keeps the cards differentiable.
    """
    prec = llama.resolve(policy, cfg)
    C = len(layout.roles)
    lmax = max(1, max(len(l) for l in layout.layers))
    idx = np.array([list(l) + [l[-1] if l else 0] * (lmax - len(l)) for l in layout.layers], np.int32)  # [C, lmax]
    counts = np.array([len(l) for l in layout.layers], np.int32)
    layer_slot = jax.tree.map(lambda a: a[idx], serving["layers"])

    heads = [s for s in layout.vocab_slices if s is not None]
    width = max(hi - lo for lo, hi in heads)
    # Serving form: slice the resident integer codes. Training form: slice the float weights, so
    # the output cards run the same quantized_product (and get its gradients) as the sequential model.
    served = "tw" in serving["lm_head"]
    head_w = serving["lm_head"]["tw"].to_matrix() if served else llama.lm_head_weight(serving)
    s_w = serving["lm_head"]["s_w"]
    tq = prec.head("w")

    def head_slot(sl):
        lo, hi = sl if sl is not None else heads[0]
        w = jnp.pad(head_w[:, lo:hi], ((0, 0), (0, width - (hi - lo))))
        p = {"s_w": jnp.pad(jnp.broadcast_to(s_w, (cfg.vocab_size,))[lo:hi], (0, width - (hi - lo)), constant_values=1.0),
             "s_x": serving["lm_head"]["s_x"], "lo": jnp.int32(lo), "n": jnp.int32(hi - lo)}
        if served:
            p["tw"] = tile_weights(w, bits=tq.bits, signed=tq.signed)
        else:
            p["w"] = w
        return p

    slots = [head_slot(s) for s in layout.vocab_slices]
    head = jax.tree.map(lambda *xs: jnp.stack(xs), *slots)
    return {"layers": layer_slot, "n_layers": jnp.asarray(counts), "head": head,
            "final_norm": jnp.broadcast_to(serving["final_norm"], (C, cfg.d_model))}


def card_programs(cfg: ModelConfig, policy, with_cache: bool = True, result: str = "greedy"):
    """(layer_fn, head_fn) for np_jax.pipeline: one card's work on one micro-batch."""
    prec = llama.resolve(policy, cfg)

    def layer_fn(p, x, aux, st):
        """The card's layers on one micro-batch; `st` is its KV cache [layers, users, S, K, E]."""
        def body(x, inp):
            lp, i, kv = inp

            def run(x, kv):
                y, kv_new = llama._layer(lp, x, aux["pos"], kv, cfg, prec, None)
                return y.astype(x.dtype), kv_new

            # padding layers (cards holding fewer layers than the most loaded card) pass through
            return jax.lax.cond(i < p["n_layers"], run, lambda x, kv: (x, kv), x, kv)

        kv = (st["k"], st["v"]) if with_cache else None
        n = jax.tree.leaves(p["layers"])[0].shape[0]
        x, kv_new = jax.lax.scan(body, x, (p["layers"], jnp.arange(n), kv))
        return x, ({"k": kv_new[0], "v": kv_new[1]} if with_cache else st)

    def head_fn(p, x, aux):
        h = vu.rmsnorm(x, p["final_norm"], cfg.rms_eps, prec.dtype)
        hp = p["head"]
        lin = {k: hp[k] for k in ("tw", "w", "s_w", "s_x") if k in hp}
        logits = qlayers.linear(h, lin, prec.head("x"), prec.head("w"), dtype=prec.dtype).astype(jnp.float32)
        valid = jnp.arange(logits.shape[-1]) < hp["n"]
        logits = jnp.where(valid, logits, -jnp.inf)
        if result == "logits":
            return logits
        last = jnp.take_along_axis(logits, aux["last"][:, None, None], axis=1)[:, 0]  # [mb, V_card]
        return {"max": jnp.max(last, -1), "arg": jnp.argmax(last, -1).astype(jnp.int32) + hp["lo"]}

    return layer_fn, head_fn


def pipelined_logits(params: llama.Params, tokens_BxL: jax.Array, cfg: ModelConfig, policy, layout: CardLayout,
                     mesh) -> jax.Array:
    """`llama.forward` through the card pipeline: logits [B, L, V], differentiable.

    `params` are in training form (float weights and step sizes); the B sequences are split
    into the layout's micro-batches, which flow card to card over `mesh`
    (`np_jax.pipeline.card_mesh`). The forward is bit-identical to `llama.forward`; gradients
    agree to the fp16 resolution of the activations (tests/test_appliance.py).
    """
    from np_jax.pipeline import run_pipeline

    M = layout.micro_batches
    B, L = tokens_BxL.shape
    if B % M:
        raise ValueError(f"{B} sequences cannot be split into {M} micro-batches")
    layer_fn, head_fn = card_programs(cfg, policy, with_cache=False, result="logits")
    cards = build_cards(params, cfg, policy, layout)
    x = llama.embed(params, tokens_BxL, llama.resolve(policy, cfg)).reshape(M, B // M, L, -1)
    no_state = {"none": jnp.zeros((len(layout.roles), B, 1))}
    res, _ = run_pipeline(layout.schedule, mesh, layer_fn, head_fn, cards, x,
                          {"pos": jnp.broadcast_to(jnp.arange(L), (M, B // M, L))}, no_state)
    parts = [res[c][..., : hi - lo] for c, ((lo, hi), r) in enumerate(zip(
        [v if v is not None else (0, 0) for v in layout.vocab_slices], layout.roles)) if r == "head"]
    return jnp.concatenate(parts, -1).reshape(B, L, -1)


def combine_greedy(res: dict, layout: CardLayout) -> np.ndarray:
    """Greedy token per user from the output cards' (max, argmax) over their vocabulary slices.

    Ties go to the lower vocabulary index, as an argmax over the whole vocabulary would.
    Returns [M * micro_batch] token ids.
    """
    heads = [c for c, r in enumerate(layout.roles) if r == "head"]
    mx = np.asarray(res["max"])[heads]  # [H, M, mb]
    arg = np.asarray(res["arg"])[heads]
    best = np.argmax(mx, axis=0)  # first (lowest-vocabulary) card among equal maxima
    return np.take_along_axis(arg, best[None], 0)[0].reshape(-1)


class ApplianceGenerator:
    """Greedy generation for N users on the emulated appliance (cards = pipeline stages)."""

    def __init__(self, serving: llama.Params, cfg: ModelConfig, policy, layout: CardLayout, users: int,
                 cache_len: int = 512, devices: int | None = None, min_bucket: int = 16):
        if users % layout.micro_batches:
            raise ValueError(f"{users} users cannot be split into {layout.micro_batches} equal micro-batches")
        if cache_len > cfg.max_seq_len:
            raise llama.ModelInputError(f"cache of {cache_len} positions exceeds the context of {cfg.max_seq_len}")
        self.cfg, self.policy, self.layout, self.users = cfg, policy, layout, users
        self.prec = llama.resolve(policy, cfg)
        self.cache_len, self.min_bucket = cache_len, min_bucket
        self.mb = users // layout.micro_batches
        self.serving = serving
        C = len(layout.roles)
        lmax = max(1, max(len(l) for l in layout.layers))
        dt = jnp.float32 if self.prec.kv.is_float else jnp.int8
        shape = (C, lmax, users, cache_len, cfg.n_kv_heads, cfg.head_dim)  # per card: layer-major
        state = {"k": np.zeros(shape, dt), "v": np.zeros(shape, dt)}
        layer_fn, head_fn = card_programs(cfg, policy)
        self.runtime = ApplianceRuntime(layout.schedule, layer_fn, head_fn, build_cards(serving, cfg, policy, layout),
                                        state, devices=devices, user_axis=1)

    def _frames(self, toks_NxL: np.ndarray):
        M = self.layout.micro_batches
        x = llama.embed(self.serving, jnp.asarray(toks_NxL), self.prec)
        return x.reshape(M, self.mb, *x.shape[1:])

    def generate(self, prompts: list[list[int]], max_new_tokens: int, eos_ids=(), progress=None) -> GenerationResult:
        if len(prompts) != self.users:
            raise llama.ModelInputError(f"the appliance is configured for {self.users} users, got {len(prompts)} prompts")
        if any(len(p) == 0 for p in prompts) or max_new_tokens < 1:
            raise llama.ModelInputError("every user needs a non-empty prompt and max_new_tokens >= 1")
        lengths = np.array([len(p) for p in prompts], np.int32)
        need = int(lengths.max()) + max_new_tokens - 1
        if need > self.cache_len:
            raise llama.ModelInputError(f"longest prompt ({lengths.max()}) + {max_new_tokens} new tokens needs {need} "
                                        f"cache positions; the cache holds {self.cache_len}")
        M, mb = self.layout.micro_batches, self.mb
        L = min(bucket_length(int(lengths.max()), self.min_bucket), self.cache_len)
        toks = np.zeros((self.users, L), np.int32)
        for i, p in enumerate(prompts):
            toks[i, : len(p)] = p
        llama.check_tokens(toks, self.cfg)
        self.runtime.reset()
        compile0 = self.runtime.compile_s
        aux = {"pos": jnp.broadcast_to(jnp.arange(L), (M, mb, L)), "last": jnp.asarray((lengths - 1).reshape(M, mb))}
        frames = self._frames(toks)
        decode_aux = lambda pos: {"pos": jnp.asarray(pos.reshape(M, mb, 1)), "last": jnp.zeros((M, mb), jnp.int32)}
        self.runtime.compile(frames, aux)
        self.runtime.compile(self._frames(toks[:, :1]), decode_aux(lengths))
        t0 = time.perf_counter()
        tok = combine_greedy(self.runtime.run(frames, aux), self.layout)
        t1 = time.perf_counter()
        out = [[int(t)] for t in tok]
        done = np.array([int(t) in eos_ids for t in tok])
        pos = lengths.copy()
        steps = 0
        if progress:
            progress(1)
        for _ in range(max_new_tokens - 1):
            if done.all():
                break
            tok = combine_greedy(self.runtime.run(self._frames(tok[:, None]), decode_aux(pos)), self.layout)
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
                                compile_s=self.runtime.compile_s - compile0,
                                timings={"devices": self.runtime.devices, "frames": self.runtime.frames.summary()})
