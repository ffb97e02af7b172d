"""The appliance's GPipe pipeline: cards as stages of a `jax.shard_map` over a device mesh.

Cards are the pipeline stages. A mini-batch of users is split into M equal micro-batches that
flow card to card; at tick t, card c works on micro-batch t - depth(c). Card-to-card transfers
are `ppermute`s between the devices holding the cards (the appliance's direct PCIe transfers).
The output-layer cards all take their input from the last layer card and run in the same
tick (tensor parallel over vocabulary slices).

With fewer devices than cards, each device holds a contiguous block of cards and steps
through them (a loop over its cards; each card's `lax.switch` runs only its own role),
so the arithmetic, and hence every bit, is the same on 1, 2, 4, 8 or 16 devices.

The pipeline is generic: the model supplies
  layer_fn(card_params, x, aux, state) -> (x_out, state)   for layer cards,
  output_fn(card_params, x, aux) -> result                   for output-layer cards,
where `card_params` is one card's slice of a card-stacked pytree, `x` one micro-batch's
activation, `aux` that micro-batch's slice of per-micro-batch data (positions, lengths), and
`state` the card's per-user state (its KV cache) restricted to the micro-batch's users (every
state leaf has the user axis first). Idle cards and ticks outside a card's window do nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from np_jax.appliance.distributed import to_global

ROLES = ("layers", "output", "idle")


@dataclass(frozen=True)
class Schedule:
    """Static description of the cards: role, tick offset (depth) and source card of each."""

    roles: tuple[str, ...]
    micro_batches: int

    def __post_init__(self):
        if any(r not in ROLES for r in self.roles):
            raise ValueError(f"card roles must be among {ROLES}, got {self.roles}")
        if "layers" not in self.roles or "output" not in self.roles:
            raise ValueError("a pipeline needs at least one layer card and one output-layer card")
        if self.micro_batches < 1:
            raise ValueError("micro_batches must be >= 1")

    @property
    def n_cards(self) -> int:
        return len(self.roles)

    @property
    def layer_cards(self) -> list[int]:
        return [c for c, r in enumerate(self.roles) if r == "layers"]

    @property
    def output_cards(self) -> list[int]:
        return [c for c, r in enumerate(self.roles) if r == "output"]

    def depth_of(self, card: int) -> int:
        """Tick offset of a card: its index among layer cards; all output cards share the last."""
        r = self.roles[card]
        if r == "layers":
            return self.layer_cards.index(card)
        return len(self.layer_cards) if r == "output" else -1

    def source_of(self, card: int) -> int:
        """The card whose previous-tick output this card consumes (-1: the host)."""
        if self.roles[card] == "layers":
            i = self.layer_cards.index(card)
            return -1 if i == 0 else self.layer_cards[i - 1]
        return self.layer_cards[-1] if self.roles[card] == "output" else -1

    @property
    def depth(self) -> int:
        return len(self.layer_cards) + 1

    @property
    def ticks(self) -> int:
        """GPipe ticks for M micro-batches through `depth` card steps: M + depth - 1."""
        return self.micro_batches + self.depth - 1


def card_mesh(n_devices: int | None = None, axis: str = "cards") -> Mesh:
    """A 1-D mesh over the first `n_devices` devices (all by default)."""
    devs = jax.devices()
    n = len(devs) if n_devices is None else n_devices
    if not 1 <= n <= len(devs):
        raise ValueError(f"asked for {n} devices, {len(devs)} available")
    return Mesh(np.array(devs[:n]), (axis,))


def place_cards(tree, mesh: Mesh, axis: str = "cards"):
    """Shard the leading card axis of every leaf over the mesh (cards must divide evenly).

    Works when the mesh spans several processes: each process places the cards of its own
    devices (every process holds the same host values).
    """
    n = mesh.shape[axis]
    sharding = NamedSharding(mesh, P(axis))

    def put(x):
        if x.shape[0] % n:
            raise ValueError(f"{x.shape[0]} cards cannot be split evenly over {n} devices")
        if jax.process_count() == 1:
            return jax.device_put(x, sharding)
        return to_global(jax.device_get(x), sharding)

    return jax.tree.map(put, tree)


def run_cards_in_order(schedule: Schedule, layer_fn, output_fn, cards: list, x_MxBxLxD, aux_M, state: list,
                       user_axis: int = 0):
    """Resident cards on one device: every card its own parameters, nothing stacked.

    `cards[c]` is card c's parameter pytree (only what its role uses: no padded layer slots, no
    copy out of a card-stacked array) and `state[c]` its state (leaves with the user axis at `user_axis`;
    any pytree, e.g. empty, for cards without state). Each layer card in pipeline order runs all M
    micro-batches (vmapped over the micro-batch axis; one micro-batch runs unmapped, so nothing in
    XLA's program is there for the mapping: with a size-1 axis, the mapped cache update had
    cost ten copies of the KV cache per layer), then the output cards: the card programs of the
    GPipe ticks on the same data, so the same bits (tests/test_appliance.py).
    Returns (results [n_cards, M, ...], new state list).
    """
    C, M = schedule.n_cards, schedule.micro_batches
    if len(cards) != C or len(state) != C:
        raise ValueError(f"expected {C} cards and {C} card states, got {len(cards)} and {len(state)}")
    mb = x_MxBxLxD.shape[1]

    def split(v):  # [..., users, ...] -> [M, ..., mb, ...]
        v = v.reshape(*v.shape[:user_axis], M, mb, *v.shape[user_axis + 1:])
        return jnp.moveaxis(v, user_axis, 0)

    def merge(v, like):  # the inverse of split
        return jnp.moveaxis(v, 0, user_axis).reshape(like.shape).astype(like.dtype)

    x = x_MxBxLxD
    state = list(state)
    if M == 1:  # one micro-batch: each card program once on it, its state as it is (no axis to map over)
        drop_m = partial(jax.tree.map, lambda v: v[0])
        add_m = partial(jax.tree.map, lambda v: v[None])
        for c in schedule.layer_cards:
            y, st = layer_fn(cards[c], x[0], drop_m(aux_M), state[c])
            state[c] = jax.tree.map(lambda v, like: v.astype(like.dtype), st, state[c])
            x = y[None]
        outs = {c: add_m(output_fn(cards[c], x[0], drop_m(aux_M))) for c in schedule.output_cards}
    else:
        for c in schedule.layer_cards:
            y, st = jax.vmap(layer_fn, in_axes=(None, 0, 0, 0))(cards[c], x, aux_M, jax.tree.map(split, state[c]))
            state[c] = jax.tree.map(merge, st, state[c])
            x = y
        outs = {c: jax.vmap(output_fn, in_axes=(None, 0, 0))(cards[c], x, aux_M) for c in schedule.output_cards}
    first = outs[schedule.output_cards[0]]
    results = jax.tree.map(lambda *vs: jnp.stack(vs), *[outs.get(c, jax.tree.map(jnp.zeros_like, first))
                                                        for c in range(C)])
    return results, state


def run_pipeline(schedule: Schedule, mesh: Mesh, layer_fn: Callable, output_fn: Callable, card_params, x_MxBxLxD,
                 aux_M, state, *, axis: str = "cards", user_axis: int = 0, force_ticks: bool = False):
    """Run M micro-batches through the cards. Returns (results [n_cards, M, ...], new state).

    `card_params` and `state` have a leading card axis (sharded over `axis`); after it, every
    state leaf has its user axis at `user_axis`. `x_MxBxLxD` and `aux_M` (leading
    micro-batch axis) are replicated host inputs. `results[c, m]` is output
    card c's `output_fn` result for micro-batch m (zeros on other cards).

    On a one-device mesh the cards run in pipeline order without ticks (`run_cards_in_order` on each card's
    slice, the same bits); `force_ticks` keeps the GPipe ticks there too (to test that they agree). Given
    lists of per-card parameters and states (one device), `run_cards_in_order` runs them.
    """
    C, M = schedule.n_cards, schedule.micro_batches
    n_dev = mesh.shape[axis]
    if isinstance(card_params, list):  # resident cards, one pytree each (one device)
        if n_dev != 1 or force_ticks:
            raise ValueError("per-card parameter lists run on one device; stack the cards for a mesh")
        return run_cards_in_order(schedule, layer_fn, output_fn, card_params, x_MxBxLxD, aux_M, state, user_axis)
    if C % n_dev:
        raise ValueError(f"{C} cards cannot be split evenly over {n_dev} devices")
    if x_MxBxLxD.shape[0] != M:
        raise ValueError(f"expected {M} micro-batches, got {x_MxBxLxD.shape[0]}")
    if n_dev == 1 and not force_ticks:  # the same card programs in pipeline order, on each card's slice
        sliced = [jax.tree.map(lambda a, c=c: a[c], (card_params, state)) for c in range(C)]
        results, st = run_cards_in_order(schedule, layer_fn, output_fn, [p for p, _ in sliced], x_MxBxLxD, aux_M,
                                         [s for _, s in sliced], user_axis)
        return results, jax.tree.map(lambda *xs: jnp.stack(xs), *st)
    c_loc = C // n_dev
    mb = x_MxBxLxD.shape[1]

    # Static routing tables, indexed [device, local card].
    role_idx = np.array([ROLES.index(r) for r in schedule.roles], np.int32).reshape(n_dev, c_loc)
    depth = np.array([schedule.depth_of(c) for c in range(C)], np.int32).reshape(n_dev, c_loc)
    src = [schedule.source_of(c) for c in range(C)]
    offsets = sorted({c // c_loc - s // c_loc for c, s in enumerate(src) if s >= 0})
    off_idx = np.array([offsets.index(c // c_loc - s // c_loc) if s >= 0 else 0 for c, s in enumerate(src)],
                       np.int32).reshape(n_dev, c_loc)
    src_loc = np.array([s % c_loc if s >= 0 else 0 for s in src], np.int32).reshape(n_dev, c_loc)
    from_host = np.array([s < 0 for s in src]).reshape(n_dev, c_loc)

    one_params = jax.tree.map(lambda a: a[0], card_params)
    one_state = jax.tree.map(lambda a: jax.lax.slice_in_dim(a[0], 0, mb, axis=user_axis), state)
    one_aux = jax.tree.map(lambda a: a[0], aux_M)
    res_shape = jax.eval_shape(output_fn, one_params, x_MxBxLxD[0], one_aux)
    hid_dtype = jax.eval_shape(layer_fn, one_params, x_MxBxLxD[0], one_aux, one_state)[0].dtype

    def body(params_loc, state_loc, xs, aux):
        dev = jax.lax.axis_index(axis)
        t_role, t_depth = jnp.asarray(role_idx)[dev], jnp.asarray(depth)[dev]
        t_off, t_src, t_host = jnp.asarray(off_idx)[dev], jnp.asarray(src_loc)[dev], jnp.asarray(from_host)[dev]
        zeros_res = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), res_shape)
        regs = jnp.zeros((c_loc, *x_MxBxLxD.shape[1:]), hid_dtype)
        results = jax.tree.map(lambda s: jnp.zeros((c_loc, M, *s.shape), s.dtype), res_shape)

        def tick(carry, t):
            regs, state_loc, results = carry

            def card(j, inner):
                outs, state_loc, results = inner
                m = t - t_depth[j]
                active = (m >= 0) & (m < M)
                mc = jnp.clip(m, 0, M - 1)
                x = regs[j]
                a = jax.tree.map(lambda v: v[mc], aux)

                # Card parameters are sliced inside the branch that uses them (slicing outside
                # would copy every card's slots every tick).
                def card_params():
                    return jax.tree.map(lambda v: v[j], params_loc)

                def at(v):  # start index of (card j, micro-batch mc's users) in a state leaf
                    idx = [0] * v.ndim
                    idx[0], idx[1 + user_axis] = j, mc * mb
                    return tuple(idx)

                def size(v):
                    sz = list(v.shape)
                    sz[0], sz[1 + user_axis] = 1, mb
                    return tuple(sz)

                is_layer = active & (t_role[j] == ROLES.index("layers"))

                def do_layer(state_loc):
                    st_m = jax.tree.map(lambda v: jax.lax.dynamic_slice(v, at(v), size(v))[0], state_loc)
                    y, st_new = layer_fn(card_params(), x, a, st_m)
                    state_loc = jax.tree.map(lambda v, n: jax.lax.dynamic_update_slice(v, n[None].astype(v.dtype), at(v)),
                                             state_loc, st_new)
                    return y.astype(hid_dtype), state_loc

                def no_layer(state_loc):
                    return jnp.zeros_like(x), state_loc

                # Only active layer cards touch their state (idle cards would otherwise copy a
                # micro-batch of KV cache in and out every tick).
                y, state_loc = jax.lax.cond(is_layer, do_layer, no_layer, state_loc)
                r = jax.lax.cond(active & (t_role[j] == ROLES.index("output")),
                                 lambda: output_fn(card_params(), x, a), lambda: zeros_res)
                keep = active & (t_role[j] == ROLES.index("output"))
                results = jax.tree.map(
                    lambda buf, v: jax.lax.dynamic_update_slice(
                        buf, jnp.where(keep, v, buf[j, mc])[None, None], (j, mc) + (0,) * (buf.ndim - 2)),
                    results, r)
                return outs.at[j].set(y), state_loc, results

            outs = jnp.zeros_like(regs)
            outs, state_loc, results = jax.lax.fori_loop(0, c_loc, card, (outs, state_loc, results))
            # Card-to-card transfers for the next tick: each card reads its source's output.
            cands = [outs if o == 0 else jax.lax.ppermute(outs, axis, [(d, d + o) for d in range(n_dev - o)])
                     for o in offsets]
            cand = jnp.stack(cands)  # [n_offsets, c_loc, mb, L, D]
            routed = cand[t_off, t_src]
            host_in = xs[jnp.clip(t + 1, 0, M - 1)].astype(hid_dtype)
            regs = jnp.where(t_host.reshape(-1, *([1] * (routed.ndim - 1))), host_in[None], routed)
            return (regs, state_loc, results), None

        regs = jnp.where(jnp.asarray(t_host).reshape(-1, *([1] * (regs.ndim - 1))), xs[0].astype(hid_dtype)[None], regs)
        (_, state_loc, results), _ = jax.lax.scan(tick, (regs, state_loc, results), jnp.arange(schedule.ticks))
        return results, state_loc

    f = jax.shard_map(body, mesh=mesh, in_specs=(P(axis), P(axis), P(), P()), out_specs=(P(axis), P(axis)),
                      check_vma=False)
    return f(card_params, state, x_MxBxLxD, aux_M)
