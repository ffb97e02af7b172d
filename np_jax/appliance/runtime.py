"""The appliance runtime: configure the cards once, then send and receive tensors.

Mirrors the paper's user-space runtime (HPEC24 sec. III-C): at initialisation every card is
configured with its resident data (weights, KV cache) which stays on its device; at run time
the host sends input frames (one per micro-batch) to the first card and receives result frames
from the output cards; intermediate tensors move card to card inside the pipeline. A
`FrameLedger` books the bytes each card's frame buffer receives and sends.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from np_jax.appliance.distributed import to_global, to_host

from np_jax.appliance.pipeline import Schedule, card_mesh, place_cards, run_pipeline


@dataclass
class FrameLedger:
    """Bytes through each card's frame buffer (input and output frames), accumulated over runs."""

    n_cards: int
    bytes_in: np.ndarray = field(default=None)
    bytes_out: np.ndarray = field(default=None)
    runs: int = 0

    def __post_init__(self):
        self.bytes_in = np.zeros(self.n_cards, np.int64)
        self.bytes_out = np.zeros(self.n_cards, np.int64)

    def record(self, schedule: Schedule, frame_bytes: int, result_bytes: int) -> None:
        """One pipeline run: every active card receives and sends one frame per micro-batch."""
        M = schedule.micro_batches
        for c, r in enumerate(schedule.roles):
            if r == "layers":
                self.bytes_in[c] += M * frame_bytes
                self.bytes_out[c] += M * frame_bytes
            elif r == "output":
                self.bytes_in[c] += M * frame_bytes
                self.bytes_out[c] += M * result_bytes
        self.runs += 1

    def summary(self) -> dict:
        return {"runs": self.runs, "bytes_in": self.bytes_in.tolist(), "bytes_out": self.bytes_out.tolist()}


def default_devices(n_cards: int) -> tuple[int, str]:
    """How many devices to spread `n_cards` cards over, and why.

    On accelerators (and on a mesh spanning processes) one card per device, or the most devices
    over which the cards split evenly. In one process on CPU, the devices are virtual: they
    share the host's few cores, so every cross-device transfer is pure overhead and all cards go
    on one device (the same card programs, bit-identical on any device count).
    """
    devs = jax.devices()
    if devs[0].platform == "cpu" and jax.process_count() == 1:
        return 1, "all cards on one device: the CPU devices are virtual and share the host's cores"
    n = max(d for d in range(1, min(len(devs), n_cards) + 1) if n_cards % d == 0)
    return n, ("one card per device" if n == n_cards else f"{n_cards // n} cards per device")


def check_devices(n_cards: int, devices: int) -> None:
    """Raise ValueError, with the reason, unless `devices` JAX devices exist and `n_cards` cards split
    evenly over them (a mesh spanning processes counts every process's devices)."""
    if n_cards % devices:
        raise ValueError(f"{n_cards} cards cannot be split evenly over {devices} devices")
    have = jax.devices()
    if devices > len(have):
        platform, procs = have[0].platform, jax.process_count()
        if platform == "cpu" and procs == 1:
            why = (f"JAX started with {len(have)} CPU device(s); virtual CPU devices can only be requested "
                   "(jax_num_cpu_devices) before JAX's backend starts")
        else:
            why = f"{procs} process(es) have {len(have)} {platform} device(s) in all"
        raise ValueError(f"asked for {devices} devices; {why}")


def choose_devices(n_cards: int, devices: int | None) -> tuple[int, str]:
    """(devices, why): `default_devices` unless a count is asked for (then checked: `check_devices`)."""
    if devices is None:
        return default_devices(n_cards)
    check_devices(n_cards, devices)
    return devices, f"{devices} device(s) as asked"


class ApplianceRuntime:
    """Cards configured once (params and state resident, sharded over a mesh); `run` streams micro-batches.

    `card_params` and `state` are card-stacked pytrees (leading card axis, sharded over the mesh),
    or, on one device, lists with one pytree per card (each card's weights in arrays of their
    own: `pipeline.run_cards_in_order`).
    """

    def __init__(self, schedule: Schedule, layer_fn, output_fn, card_params, state, *, devices: int | None = None,
                 axis: str = "cards", user_axis: int = 0, device_choice: str | None = None):
        self.schedule = schedule
        self.resident = isinstance(card_params, list)
        n_dev, why = choose_devices(schedule.n_cards, 1 if self.resident and devices is None else devices)
        self.device_choice = device_choice or why
        if self.resident and n_dev != 1:
            raise ValueError("per-card parameter lists run on one device; stack the cards for a mesh")
        self.mesh = card_mesh(n_dev, axis)
        self.params = self._place(card_params)  # configure: weights resident on their cards
        self.state = self._place(state)  # KV cache resident on its card
        self.frames = FrameLedger(schedule.n_cards)
        self._compiled: dict = {}
        self.compile_s = 0.0  # ahead-of-time compilation time, kept out of run timings
        self._run = jax.jit(partial(run_pipeline, schedule, self.mesh, layer_fn, output_fn, axis=axis, user_axis=user_axis),
                            donate_argnums=(3,))

    @property
    def devices(self) -> int:
        return self.mesh.devices.size

    def _inputs(self, x_MxBxLxD, aux_M):
        """Host inputs as arrays replicated over the mesh (global arrays when it spans processes)."""
        if jax.process_count() == 1:
            return x_MxBxLxD, aux_M
        rep = NamedSharding(self.mesh, P())
        return jax.tree.map(lambda v: to_global(jax.device_get(v), rep), (x_MxBxLxD, aux_M))

    def compile(self, x_MxBxLxD: jax.Array, aux_M):
        """The pipeline compiled for these input shapes (cached; time booked in `compile_s`)."""
        x_MxBxLxD, aux_M = self._inputs(x_MxBxLxD, aux_M)
        key = tuple((a.shape, a.dtype) for a in jax.tree.leaves((x_MxBxLxD, aux_M)))
        if key not in self._compiled:
            t0 = time.perf_counter()
            self._compiled[key] = self._run.lower(self.params, x_MxBxLxD, aux_M, self.state).compile()
            self.compile_s += time.perf_counter() - t0
        return self._compiled[key]

    def run(self, x_MxBxLxD: jax.Array, aux_M) -> object:
        """Send one input frame per micro-batch through the cards; returns the output cards' results.

        Results come back as host numpy arrays (gathered from every process of a multi-process mesh).
        """
        x_MxBxLxD, aux_M = self._inputs(x_MxBxLxD, aux_M)
        results, self.state = self.compile(x_MxBxLxD, aux_M)(self.params, x_MxBxLxD, aux_M, self.state)
        results = jax.tree.map(to_host, results)
        frame = int(np.prod(x_MxBxLxD.shape[1:])) * x_MxBxLxD.dtype.itemsize
        res = sum(int(np.prod(r.shape[2:])) * r.dtype.itemsize for r in jax.tree.leaves(results))
        self.frames.record(self.schedule, frame, res)
        return results

    def _place(self, tree):
        if self.resident:
            return jax.device_put(tree, NamedSharding(self.mesh, P()))
        return place_cards(tree, self.mesh, self.mesh.axis_names[0])

    def reset(self) -> None:
        """Clear the per-user state (start a new mini-batch of users)."""
        self.state = self._place(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), self.state))
