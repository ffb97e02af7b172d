"""The decoder on the emulated appliance: card parameters and card programs from a `Mapping`, and
the appliance backend of the generation loop (models.generate).

`build_cards` turns serving (or training-form) parameters and a mapping into card-stacked
parameters: every card carries a layer slot (its layers, padded to the most layers any card
holds, with a count) and an output-layer slot (its vocabulary columns of the output layer,
tiled with the mapping's own `output_tiling`, and the final norm); a card uses the slot of its
role (idle cards do nothing). The card programs are the model's public functions
(`llama.run_layers`, `llama.head`) on that slot. `Appliance` is the host side: embedding on the
host, the cards' results combined into the next token (greedy or Gumbel-max sampled, exactly as
the sequential model picks it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import ModelConfig
from np_jax.appliance.mapping import Mapping
from np_jax.appliance.pipeline import Schedule, run_pipeline
from np_jax.appliance.runtime import ApplianceRuntime, choose_devices
from np_jax.chip.array import TiledWeights, dot_form, tile_weights, with_form


def cards_of(mapping: Mapping) -> list:
    """The mapping's cards, when the emulator can run it (whole layers per card)."""
    if not mapping.executable:
        raise ValueError(f"this mapping splits every layer over {mapping.cards_per_layer} cards (a rack plan); the "
                         "emulator runs whole layers per card")
    return mapping.cards


def schedule_of(mapping: Mapping) -> Schedule:
    """The pipeline schedule of the mapping's cards."""
    cards_of(mapping)
    return mapping.schedule


def card_precision(cfg: ModelConfig, policy, mapping: Mapping) -> llama.Precision:
    """The precision with the mapping's tilings: its layer matrices and one output card's slice."""
    return llama.resolve(policy, cfg, tilings=mapping.tilings | {"lm_head": mapping.output_tiling})


def in_form(tree, form: str | None):
    """`tree` with every `TiledWeights` holding its codes in `form` (None: unchanged)."""
    if form is None:
        return tree
    return jax.tree.map(lambda v: with_form(v, form) if isinstance(v, TiledWeights) else v, tree,
                        is_leaf=lambda v: isinstance(v, TiledWeights))


def _output_slots(serving: llama.Params, cfg: ModelConfig, policy, mapping: Mapping, form: str = "auto"):
    """A function: a card's vocabulary slice -> its output-layer slot (codes held in `form`)."""
    prec = llama.resolve(policy, cfg)
    cards = cards_of(mapping)
    t = mapping.output_tiling
    width = t.n
    served = "tw" in serving["lm_head"]
    # Serving form: slice the resident integer codes and tile each slice with the mapping's tiling.
    # Training form: slice the float weights, so the output cards run the same quantized product
    # (and get its gradients) as the sequential model.
    head_w = serving["lm_head"]["tw"].to_matrix() if served else llama.lm_head_weight(serving)
    s_w = jnp.broadcast_to(serving["lm_head"]["s_w"], (cfg.vocab_size,))
    tq = prec.head("w")
    first_out = next(c.vocab_slice for c in cards if c.role == "output")

    if served:  # one compiled program for every card's slice (the slice's start and length are operands)
        head_w = jnp.pad(head_w, ((0, 0), (0, width)))
        s_w = jnp.pad(s_w, (0, width), constant_values=1.0)

    def output_slot(sl):
        lo, hi = sl if sl is not None else first_out
        if served:
            p = _served_slot(head_w, s_w, jnp.int32(lo), jnp.int32(hi - lo), bits=tq.bits, signed=tq.signed,
                             tiling=t, form=form)
            tw = p["tw"]  # the mapping's own tiling object (the compiled program holds an equal one)
            return p | {"tw": TiledWeights(tw.w_RxKbxCxNb, t, tw.bits, tw.signed), "s_x": serving["lm_head"]["s_x"]}
        w = jnp.pad(head_w[:, lo:hi], ((0, 0), (0, width - (hi - lo))))
        return {"s_w": jnp.pad(s_w[lo:hi], (0, width - (hi - lo)), constant_values=1.0),
                "s_x": serving["lm_head"]["s_x"], "lo": jnp.int32(lo), "n": jnp.int32(hi - lo), "w": w}

    return output_slot


@functools.partial(jax.jit, static_argnames=("bits", "signed", "tiling", "form"))
def _served_slot(head_w_padded, s_w_padded, lo, n, *, bits, signed, tiling, form):
    """An output card's slot in serving form: the codes of vocabulary columns [lo, lo + n) placed
    with the card's tiling, zero columns (step 1) after them up to the tiling's width."""
    width = tiling.n
    keep = jnp.arange(width) < n
    w = jnp.where(keep[None, :], jax.lax.dynamic_slice_in_dim(head_w_padded, lo, width, axis=1), 0)
    s = jnp.where(keep, jax.lax.dynamic_slice_in_dim(s_w_padded, lo, width), 1.0)
    return {"s_w": s, "lo": lo, "n": n, "tw": tile_weights(w, bits=bits, signed=signed, tiling=tiling, form=form)}


def build_cards(serving: llama.Params, cfg: ModelConfig, policy, mapping: Mapping, form: str = "auto") -> dict:
    """Card-stacked parameters [cards, ...] for the layer slot and the output-layer slot (the
    form a device mesh shards: every card the same structure).

    `serving` may be in serving form (integer codes, from `llama.prepare_serving` with the
    mapping's tilings) or in training form (float weights): the latter keeps the cards
    differentiable (training through the pipeline). `form`: the output layer's code form.
    """
    cards = cards_of(mapping)
    lmax = max(1, max(len(c.layers) for c in cards))
    idx = np.array([list(c.layers) + [c.layers[-1] if c.layers else 0] * (lmax - len(c.layers)) for c in cards],
                   np.int32)  # [C, lmax]
    counts = np.array([len(c.layers) for c in cards], np.int32)
    layer_slot = jax.tree.map(lambda a: a[idx], serving["layers"])
    output_slot = _output_slots(serving, cfg, policy, mapping, form)
    slots = [output_slot(c.vocab_slice) for c in cards]
    out = jax.tree.map(lambda *xs: jnp.stack(xs), *slots)
    # a per-layer policy: each slot's layer index picks its widths (`llama.layer_at`)
    ids = {"layer_ids": jnp.asarray(idx)} if llama.resolve(policy, cfg).mixed else {}
    return {"layers": layer_slot, "n_layers": jnp.asarray(counts), **ids, "output": out,
            "final_norm": jnp.broadcast_to(serving["final_norm"], (len(cards), cfg.d_model))}


LAYER_FORMS = ("scan", "unrolled")


def card_list(serving: llama.Params, cfg: ModelConfig, policy, mapping: Mapping, layers: str = "scan",
              form: str = "auto") -> list:
    """One parameter pytree per card, holding only what its role uses (the resident form on one
    device, `pipeline.run_cards_in_order`): a layer card its layers, an output-layer card its
    vocabulary slot and the final norm, an idle card nothing. The same values as `build_cards`.

    `layers`: "scan" stacks a card's own layers (one layer compiled; each step slices a layer's
    weights out of the stack), "unrolled" keeps a list of per-layer parameters (every layer reads
    its own resident arrays, no per-step copy; compiles each layer). The same bits either way.
    `form`: the form of the output layer's codes (`tile_weights`; the layers keep `serving`'s).
    """
    if layers not in LAYER_FORMS:
        raise ValueError(f"layers must be one of {LAYER_FORMS}, got {layers!r}")
    output_slot = _output_slots(serving, cfg, policy, mapping, form)
    mixed = llama.resolve(policy, cfg).mixed
    out = []
    for c in cards_of(mapping):
        if c.role == "layers":
            idx = np.asarray(c.layers, np.int32)
            whole = tuple(c.layers) == tuple(range(cfg.n_layers))  # all layers in order: no copy
            stack = serving["layers"] if whole else jax.tree.map(lambda a: a[idx], serving["layers"])
            out.append({"layers": stack if layers == "scan" else llama.unstack_layers(stack)}
                       | ({"layer_ids": idx} if mixed else {}))
        elif c.role == "output":
            out.append({"output": output_slot(c.vocab_slice), "final_norm": serving["final_norm"]})
        else:
            out.append({})
    return out


def init_card_states(cfg: ModelConfig, policy, mapping: Mapping, cache_len: int, stacked: bool, layers: str = "scan"):
    """Empty KV caches for the cards: card-stacked [cards, layers (padded), users, S, Kv, E], or
    (`stacked=False`) a list with each layer card's cache: [layers, users, S, Kv, E] for
    `layers="scan"`, a list of per-layer [users, S, Kv, E] for "unrolled" (see `card_list`)."""
    cards = cards_of(mapping)
    if stacked:
        lmax = max(1, max(len(c.layers) for c in cards))
        one = llama.init_cache(cfg, mapping.users, cache_len, policy, layers=lmax, xp=np)
        return {k: np.broadcast_to(v, (len(cards), *v.shape)) for k, v in one.items()}  # per card: layer-major
    out = []
    for c in cards:
        st = llama.init_cache(cfg, mapping.users, cache_len, policy, layers=len(c.layers), xp=np) \
            if c.role == "layers" else {}
        out.append(st if layers == "scan" else {k: list(v) for k, v in st.items()})
    return out


def card_programs(cfg: ModelConfig, policy, mapping: Mapping, with_cache: bool = True, result: str = "greedy"):
    """(layer_fn, output_fn) for np_jax.appliance.pipeline: one card's work on one micro-batch.

    `result`: "greedy" (each output card's (max, argmax) of its slice at the users' last
    positions, Gumbel noise added when the micro-batch's aux carries it) or "logits" (its slice
    of the logits, for training through the pipeline).
    """
    prec = card_precision(cfg, policy, mapping)

    def layer_fn(p, x, aux, st):
        """The card's layers on one micro-batch; `st` is its KV cache [layers, users, S, Kv, E]."""
        x, cache = llama.run_layers(p["layers"], x, aux["pos"], st if with_cache else None, cfg, prec,
                                    n_valid=p.get("n_layers"), layer_ids=p.get("layer_ids"))
        return x, (cache if with_cache else st)

    def output_fn(p, x, aux):
        op = p["output"]
        lin = {k: op[k] for k in ("tw", "w", "s_w", "s_x") if k in op}
        logits = llama.head({"final_norm": p["final_norm"], "lm_head": lin}, x, cfg, prec)
        valid = jnp.arange(logits.shape[-1]) < op["n"]
        logits = jnp.where(valid, logits, -jnp.inf)
        if result == "logits":
            return logits
        last = jnp.take_along_axis(logits, aux["last"][:, None, None], axis=1)[:, 0]  # [mb, V_card]
        if "noise" in aux:  # Gumbel-max sampling: this card's slice of the host's noise
            noise = jax.lax.dynamic_slice_in_dim(aux["noise"], op["lo"], last.shape[-1], axis=-1)
            last = jnp.where(valid, last / aux["temperature"] + noise, -jnp.inf)
        return {"max": jnp.max(last, -1), "arg": jnp.argmax(last, -1).astype(jnp.int32) + op["lo"]}

    return layer_fn, output_fn


def pipelined_logits(params: llama.Params, tokens_BxL: jax.Array, cfg: ModelConfig, policy, mapping: Mapping,
                     mesh) -> jax.Array:
    """`llama.forward` through the card pipeline: logits [B, L, V], differentiable.

    `params` are in training form (float weights and step sizes); the B sequences are split
    into the mapping's micro-batches, which flow card to card over `mesh`
    (`np_jax.appliance.pipeline.card_mesh`). The forward is bit-identical to `llama.forward`.
    """
    M = mapping.micro_batches
    B, L = tokens_BxL.shape
    if B % M:
        raise ValueError(f"{B} sequences cannot be split into {M} micro-batches")
    layer_fn, output_fn = card_programs(cfg, policy, mapping, with_cache=False, result="logits")
    cards = build_cards(params, cfg, policy, mapping)
    x = llama.embed(params, tokens_BxL, llama.resolve(policy, cfg)).reshape(M, B // M, L, -1)
    sched = schedule_of(mapping)
    no_state = {"none": jnp.zeros((sched.n_cards, B, 1))}
    res, _ = run_pipeline(sched, mesh, layer_fn, output_fn, cards, x,
                          {"pos": jnp.broadcast_to(jnp.arange(L), (M, B // M, L))}, no_state)
    parts = [res[j][..., : c.vocab_slice[1] - c.vocab_slice[0]]
             for j, c in enumerate(cards_of(mapping)) if c.role == "output"]
    return jnp.concatenate(parts, -1).reshape(B, L, -1)


def combine_greedy(res: dict, schedule: Schedule) -> np.ndarray:
    """The token per user from the output cards' (max, argmax) over their vocabulary slices.

    Ties go to the lower vocabulary index, as an argmax over the whole vocabulary would.
    Returns [M * micro_batch] token ids.
    """
    outs = schedule.output_cards
    mx = np.asarray(res["max"])[outs]  # [H, M, mb]
    arg = np.asarray(res["arg"])[outs]
    best = np.argmax(mx, axis=0)  # first (lowest-vocabulary) card among equal maxima
    return np.take_along_axis(arg, best[None], 0)[0].reshape(-1)


class Appliance:
    """The generation backend that runs the model on the emulated appliance (cards = pipeline stages).

    `devices`: JAX devices the cards are spread over (default `runtime.default_devices`: one
    per card on accelerators, the fewest that run fastest where the devices are virtual CPU
    devices sharing a few cores); the result is the same, bit for bit, on any count.
    """

    def __init__(self, serving: llama.Params, cfg: ModelConfig, policy, mapping: Mapping, cache_len: int = 512,
                 devices: int | None = None, layers: str = "scan", weights_form: str | None = "auto"):
        users = mapping.users
        if cache_len > cfg.max_seq_len:
            raise llama.ModelInputError(f"cache of {cache_len} positions exceeds the context of {cfg.max_seq_len}")
        self.cfg, self.policy, self.mapping, self.users, self.cache_len = cfg, policy, mapping, users, cache_len
        self.prec = llama.resolve(policy, cfg)
        self.schedule = schedule_of(mapping)
        self.mb = mapping.micro_batch_size
        self.serving = serving
        n_dev, why = choose_devices(self.schedule.n_cards, devices)
        layer_fn, output_fn = card_programs(cfg, policy, mapping)
        # The resident codes in the form whose exact dot is the faster for the rows a decode step
        # gives each card (all its users): np_jax.chip.array.dot_form.
        self.weights_form = dot_form(users) if weights_form == "auto" else weights_form
        serving = in_form(serving, self.weights_form)
        why += f"; weight codes held as {self.weights_form or 'given'}"
        if layers not in LAYER_FORMS:
            raise ValueError(f"layers must be one of {LAYER_FORMS}, got {layers!r}")
        if n_dev == 1:  # resident cards: each card's weights in arrays of its own
            params = card_list(serving, cfg, policy, mapping, layers, form=self.weights_form or "auto")
            state = init_card_states(cfg, policy, mapping, cache_len, stacked=False, layers=layers)
            why += f"; each card's weights resident in arrays of its own, layers {layers}"
            user_axis = 1 if layers == "scan" else 0
        else:
            if layers != "scan":
                if devices is not None:
                    raise ValueError("unrolled layers are a one-device form; a device mesh scans the stacked cards")
                why += "; layers scanned (unrolled is a one-device form)"
            params = build_cards(serving, cfg, policy, mapping, form=self.weights_form or "auto")
            state = init_card_states(cfg, policy, mapping, cache_len, stacked=True)
            user_axis = 1
        self.runtime = ApplianceRuntime(self.schedule, layer_fn, output_fn, params, state, devices=n_dev,
                                        user_axis=user_axis, device_choice=why)

    @property
    def compile_s(self) -> float:
        return self.runtime.compile_s

    def _frames(self, toks_NxL: np.ndarray):
        x = llama.embed(self.serving, jnp.asarray(toks_NxL), self.prec)
        return x.reshape(self.mapping.micro_batches, self.mb, *x.shape[1:])

    def _aux(self, pos_NxL: np.ndarray, last_N: np.ndarray, noise, temperature: float) -> dict:
        M, mb = self.mapping.micro_batches, self.mb
        aux = {"pos": jnp.asarray(pos_NxL.reshape(M, mb, -1)), "last": jnp.asarray(last_N.reshape(M, mb))}
        if noise is not None:
            cols = self.mapping.output_tiling.n * len(self.schedule.output_cards)
            noise = jnp.pad(jnp.asarray(noise), ((0, 0), (0, cols - noise.shape[-1])))
            aux["noise"] = noise.reshape(M, mb, cols)
            aux["temperature"] = jnp.full((M,), temperature, jnp.float32)
        return aux

    def _check(self, batch: int) -> None:
        if batch != self.users:
            raise llama.ModelInputError(f"the appliance is configured for {self.users} users, got {batch} prompts")

    def start(self, batch: int) -> None:
        self._check(batch)
        self.runtime.reset()

    def compile(self, batch: int, length: int, sampling: bool) -> None:
        self._check(batch)
        noise = np.zeros((batch, self.cfg.vocab_size), np.float32) if sampling else None
        pos = np.broadcast_to(np.arange(length), (batch, length))
        zeros = np.zeros(batch, np.int32)
        self.runtime.compile(self._frames(np.zeros((batch, length), np.int32)), self._aux(pos, zeros, noise, 1.0))
        self.runtime.compile(self._frames(np.zeros((batch, 1), np.int32)), self._aux(zeros[:, None], zeros, noise, 1.0))

    def prefill(self, toks_BxL, lengths_B, noise_BxV, temperature):
        B, L = toks_BxL.shape
        pos = np.broadcast_to(np.arange(L), (B, L))
        res = self.runtime.run(self._frames(toks_BxL), self._aux(pos, np.asarray(lengths_B) - 1, noise_BxV, temperature))
        return combine_greedy(res, self.schedule)

    def decode(self, tok_B, pos_B, noise_BxV, temperature):
        res = self.runtime.run(self._frames(np.asarray(tok_B)[:, None]),
                               self._aux(np.asarray(pos_B)[:, None], np.zeros(len(tok_B), np.int32), noise_BxV,
                                         temperature))
        return combine_greedy(res, self.schedule)

    def info(self) -> dict:
        return {"backend": "appliance", "devices": self.runtime.devices, "cards": self.schedule.n_cards,
                "frames": self.runtime.frames.summary()}
