"""Core-array VMM vs a plain `lax.dot_general(int8, int8 -> int32)` on the same shapes.

Run: `python -m benchmarks.bench_core_array [--json]`. Prints, per case, both median times and
their ratio (core array / plain); the goal is a ratio of at most 1.3. Ratios are measured in
one run with interleaved rounds, so machine noise affects both sides alike.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import compare
from np_jax.chip import array as na
from np_jax.chip import core

CASES = [  # (batch, K, N, bits)
    (2, 4096, 4096, 4),
    (28, 4096, 4096, 4),
    (2, 4096, 14336, 4),
    (28, 4096, 14336, 4),
    (2, 4096, 4096, 8),
    (28, 4096, 14336, 8),
]


def run(cases=CASES, rounds: int = 3, repeats: int = 10) -> list[dict]:
    plain = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32))
    emu = jax.jit(lambda x, tw: na.array_vmm(x, tw, x_bits=tw.bits))
    rows = []
    for b, k, n, bits in cases:
        rng = np.random.default_rng(0)
        lo, hi = core.int_range(bits)
        x = jnp.asarray(rng.integers(lo, hi + 1, (b, k)), jnp.int8)
        w = jnp.asarray(rng.integers(lo, hi + 1, (k, n)), jnp.int8)
        tw = na.tile_weights(w, bits=bits)
        if not np.array_equal(np.asarray(emu(x, tw)), np.asarray(plain(x, w))):
            raise AssertionError(f"core array and plain dot disagree for {(b, k, n, bits)}")
        t_emu, t_plain = compare(emu, plain, (x, tw), (x, w), rounds=rounds, repeats=repeats)
        rows.append({"batch": b, "k": k, "n": n, "bits": bits, "core_array_ms": 1e3 * t_emu,
                     "plain_dot_ms": 1e3 * t_plain, "ratio": t_emu / t_plain})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    rows = run(rounds=a.rounds, repeats=a.repeats)
    info = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "goal_ratio": 1.3}
    if a.json:
        print(json.dumps({**info, "cases": rows}, indent=2))
    else:
        print(f"core-array VMM vs plain dot_general on {info['backend']} ({info['device']}); goal ratio <= 1.3")
        print(f"{'batch':>5} {'K':>6} {'N':>6} {'bits':>4} {'array ms':>9} {'plain ms':>9} {'ratio':>6}")
        for r in rows:
            print(f"{r['batch']:>5} {r['k']:>6} {r['n']:>6} {r['bits']:>4} {r['core_array_ms']:>9.3f} "
                  f"{r['plain_dot_ms']:>9.3f} {r['ratio']:>6.2f}")
    return 0 if all(r["ratio"] <= 1.3 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
