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

from benchmarks._timing import compare, median_seconds
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
        tw = na.tile_weights(w, bits=bits, form=na.dot_form(b))  # the form the emulator holds for b rows
        if not np.array_equal(np.asarray(emu(x, tw)), np.asarray(plain(x, w))):
            raise AssertionError(f"core array and plain dot disagree for {(b, k, n, bits)}")
        t_emu, t_plain = compare(emu, plain, (x, tw), (x, w), rounds=rounds, repeats=repeats)
        rows.append({"batch": b, "k": k, "n": n, "bits": bits, "form": na.dot_form(b),
                     "whole_k_dot": na.network_never_saturates(tw, bits), "core_array_ms": 1e3 * t_emu,
                     "plain_dot_ms": 1e3 * t_plain, "ratio": t_emu / t_plain})
    return rows


DOT_FORM_CASES = [  # (batch, K, N): SmolLM2-135M's MLP up/gate and down projections and its output layer
    (1, 576, 1536), (1, 1536, 576), (1, 576, 49152), (28, 576, 1536), (28, 576, 49152)]


def dot_forms(cases=DOT_FORM_CASES, rounds: int = 3, repeats: int = 10) -> list[dict]:
    """The same integer codes multiplied in every form the backend offers, against a float32 dot.

    The emulator's exact forms: float32 (exact below 2^24, `core.F32_EXACT`), int8 x int8 -> int32;
    and the narrow float forms a backend could use instead (bfloat16 and float16 hold every INT8
    code exactly; products accumulated in float32). Times are medians; `vs_float32` is the form's
    time over the float32 dot's, measured interleaved in this run."""
    dims = (((1,), (0,)), ((), ()))
    forms = {
        "float32": jax.jit(lambda x, w: jax.lax.dot_general(x, w, dims, precision=jax.lax.Precision.HIGHEST)),
        "int8->int32": jax.jit(lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.int32)),
        "bfloat16->float32": jax.jit(lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)),
        "float16->float32": jax.jit(lambda x, w: jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)),
        "core array": jax.jit(lambda x, tw: na.array_vmm(x, tw, x_bits=8)),  # codes in dot_form(batch)
    }
    dtypes = {"float32": jnp.float32, "int8->int32": jnp.int8, "bfloat16->float32": jnp.bfloat16,
              "float16->float32": jnp.float16}
    rows = []
    for b, k, n in cases:
        rng = np.random.default_rng(0)
        x = rng.integers(-128, 128, (b, k)).astype(np.int8)
        w = rng.integers(-8, 8, (k, n)).astype(np.int8)
        args = {f: (jnp.asarray(x, dt), jnp.asarray(w, dt)) for f, dt in dtypes.items()}
        args["core array"] = (jnp.asarray(x), na.tile_weights(jnp.asarray(w), bits=4, form=na.dot_form(b)))
        ref = np.asarray(forms["int8->int32"](*args["int8->int32"]), np.int64)
        for f in forms:
            if not np.array_equal(np.asarray(forms[f](*args[f])).astype(np.int64), ref):
                raise AssertionError(f"the {f} dot is not exact for {(b, k, n)}")
        times = {f: [] for f in forms}
        for _ in range(rounds):
            for f, fn in forms.items():
                times[f].append(median_seconds(fn, *args[f], repeats=repeats))
        med = {f: float(np.median(v)) for f, v in times.items()}
        rows.append({"batch": b, "k": k, "n": n, "ms": {f: 1e3 * t for f, t in med.items()},
                     "vs_float32": {f: t / med["float32"] for f, t in med.items()}})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--dot-forms", action="store_true",
                   help="instead: the same integer codes as float32, int8, bfloat16 and float16 dots (and the core "
                        "array) on SmolLM2's decode shapes, each against the float32 dot")
    a = p.parse_args(argv)
    info = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)}
    if a.dot_forms:
        rows = dot_forms(rounds=a.rounds, repeats=a.repeats)
        if a.json:
            print(json.dumps({**info, "dot_forms": rows}, indent=2))
        else:
            print(f"exact integer dots in each form on {info['backend']}: time / float32 dot time")
            names = list(rows[0]["ms"])
            print(f"{'batch':>5} {'K':>5} {'N':>6} {'float32 ms':>10} " + " ".join(f"{f:>18}" for f in names[1:]))
            for r in rows:
                print(f"{r['batch']:>5} {r['k']:>5} {r['n']:>6} {r['ms']['float32']:>10.3f} "
                      + " ".join(f"{r['vs_float32'][f]:>18.2f}" for f in names[1:]))
        return 0
    rows = run(rounds=a.rounds, repeats=a.repeats)
    info["goal_ratio"] = 1.3
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
