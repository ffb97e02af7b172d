"""Multi-process JAX: one mesh over the devices of several processes (hosts), same code.

`initialize` joins JAX's multi-controller runtime (`jax.distributed`) with bounded timeouts,
reading the standard variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID)
when arguments are not given, and turns failures (unreachable coordinator, missing peer) into
`DistributedError` with a clear message. `to_global` / `to_host` move host data to and from
arrays sharded over a mesh that may span processes; with one process they are plain
`device_put` / `np.asarray`. Every process runs the same program (SPMD).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding


class DistributedError(RuntimeError):
    """A multi-process run that could not start or lost a process."""


def request_cpu_devices(n: int) -> None:
    """Ask for `n` virtual CPU devices, which only works before JAX starts its backends.

    Afterwards (e.g. inside a test process) the devices are what they are; callers check the
    count they get and say so.
    """
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:
        pass


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None or not text.strip():
        return default
    try:
        return int(text)
    except ValueError:
        raise DistributedError(f"environment variable {name}={text!r} is not a whole number") from None


def settings_from_env(coordinator: str | None = None, num_processes: int | None = None,
                      process_id: int | None = None) -> tuple[str | None, int, int]:
    """(coordinator, num_processes, process_id) from arguments, else the JAX_* environment variables."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    n = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES", 1)
    pid = process_id if process_id is not None else _env_int("JAX_PROCESS_ID", 0)
    if n < 1 or not 0 <= pid < n:
        raise DistributedError(f"process id {pid} is not in [0, {n})")
    if n > 1 and not coordinator:
        raise DistributedError(f"{n} processes need a coordinator address (--coordinator HOST:PORT or "
                               "JAX_COORDINATOR_ADDRESS)")
    return coordinator, n, pid


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               timeout_s: int = 60, heartbeat_s: int = 30) -> int:
    """Join the multi-process runtime (no-op for one process); returns the number of processes.

    Must run before JAX computes anything. A worker whose coordinator never answers raises
    `DistributedError` within `timeout_s`; a coordinator whose peers never arrive is ended by
    jaxlib after `timeout_s` (an abort with jaxlib's message: bounded, not a hang); a peer that
    dies later is detected by the heartbeat (`heartbeat_s`), after which collectives fail.
    """
    coordinator, n, pid = settings_from_env(coordinator, num_processes, process_id)
    if n == 1:
        return 1
    if pid != 0:
        _wait_for_coordinator(coordinator, timeout_s, f"process {pid} of {n}")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid,
                                   initialization_timeout=timeout_s, heartbeat_timeout_seconds=heartbeat_s,
                                   shutdown_timeout_seconds=timeout_s)
    except Exception as e:  # jaxlib raises XlaRuntimeError / RuntimeError with long C++ text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"process {pid} of {n} could not join the coordinator at {coordinator} within "
                               f"{timeout_s} s: {first}") from None
    return n


def _wait_for_coordinator(address: str, timeout_s: float, who: str) -> None:
    """Poll the coordinator's TCP port; raise `DistributedError` if it never answers.

    jaxlib aborts the whole process (no Python exception) when a connection attempt times
    out, so a worker checks reachability first and fails with a readable message instead.
    """
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise DistributedError(f"coordinator address must be HOST:PORT, got {address!r}")
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(2.0, timeout_s)):
                return
        except OSError as e:
            last = e
            time.sleep(0.2)
    raise DistributedError(f"{who} could not join the coordinator at {address} within {timeout_s} s: "
                           f"{last or 'no answer'}")


def to_global(x, sharding: NamedSharding) -> jax.Array:
    """A global array with `sharding` from host data that every process holds in full."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(x) -> np.ndarray:
    """The full value of a (possibly multi-process) array on every process.

    A replicated array is read from a local replica (no communication); any other array that
    spans processes is gathered, which every process must then call together.
    """
    if jax.process_count() == 1 or getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
