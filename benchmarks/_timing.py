"""Shared timing helper for benchmarks: median wall time of a jitted call, interleaved runs."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, repeats: int = 15, warmup: int = 2) -> float:
    """Median seconds per call of `fn(*args)` (compiled and warmed up first)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compare(candidate, baseline, args_c, args_b, rounds: int = 3, repeats: int = 10) -> tuple[float, float]:
    """Interleave candidate/baseline timing rounds (noise hits both) and return their medians."""
    tc, tb = [], []
    for _ in range(rounds):
        tb.append(median_seconds(baseline, *args_b, repeats=repeats))
        tc.append(median_seconds(candidate, *args_c, repeats=repeats))
    return statistics.median(tc), statistics.median(tb)
