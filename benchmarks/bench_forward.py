"""The integer forward over whole windows (what `np-jax eval`, calibration and QAT run) vs plain
float32 JAX on the same windows.

Run: `python -m benchmarks.bench_forward [--precisions w4a4 w8a8] [--windows 4] [--seq-len 256]
[--weights real|random] [--rounds 3] [--json]`.

The integer side is `np-jax eval`'s jitted step (models.evaluate.perplexity: `llama.forward` at
the precision, the summed NLL and the top-1 predictions) on the default recipe's model; the
baseline is the same step at the float policy on the float model the recipe started from (no
rotations, no online Hadamards: plain JAX). Both are compiled ahead of time (the compile time is
reported apart) and timed interleaved in rounds in this process (noise hits both); the ratio is
integer / float. `--weights real` uses SmolLM2-135M's prepared model (from the cache, else
prepared once); `random` (no model file needed) runs the recipe's transforms on random weights
of SmolLM2's shape and calibrates their steps on random tokens: the same program, other values.
Goal: <= 1.2 (issue on the quality loop's speed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

GOAL = 1.2


def _models(weights: str, precision: str, windows, log):
    """(float config, float params, integer config, integer params)."""
    import jax
    import jax.numpy as jnp

    from models import llama, recipe as R
    from models.config import get_config

    if weights == "real":
        from models.io.load import load_model
        from models.prepared import prepare

        model = load_model("smollm2-135m", log=lambda m: None)
        cfg_q, q, _ = prepare(model, R.DEFAULT_RECIPE, precision, log=log)
        return model.cfg, model.params, cfg_q, q
    cfg = get_config("smollm2-135m")
    params = llama.init_params(cfg, jax.random.key(0))
    cfg_q, q = R.transform(params, cfg, R.DEFAULT_RECIPE, precision)
    q = llama.calibrate(q, jnp.asarray(windows), cfg_q, precision, "lsq")
    return cfg, params, cfg_q, q


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["w4a4", "w8a8"])
    ap.add_argument("--windows", type=int, default=4, help="windows per call (np-jax eval's --batch-size)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    ap.add_argument("--weights", choices=["real", "random"], default="real",
                    help="SmolLM2-135M's prepared model, or random weights of its shape (no model file)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    import jax
    import numpy as np

    from models.evaluate.perplexity import _nll_fn  # the jitted step np-jax eval runs

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 49152, (a.windows, a.seq_len + 1)).astype(np.int32)
    rows = []
    for precision in a.precisions:
        cfg_f, fparams, cfg_q, qparams = _models(a.weights, precision, windows[:, :-1], log)
        sides = {}
        for name, cfg, params, policy in (("integer", cfg_q, qparams, precision), ("float32", cfg_f, fparams, "float")):
            t0 = time.perf_counter()
            compiled = _nll_fn(cfg, policy).lower(params, windows).compile()
            compile_s = time.perf_counter() - t0
            jax.block_until_ready(compiled(params, windows))  # warm
            sides[name] = {"call": compiled, "params": params, "compile_s": compile_s, "times": []}
        for _ in range(a.rounds):
            for s in sides.values():
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(s["call"](s["params"], windows))
                    s["times"].append(time.perf_counter() - t0)
        t = {k: statistics.median(s["times"]) for k, s in sides.items()}
        rows.append({"precision": precision, "weights": a.weights, "windows": a.windows, "seq_len": a.seq_len,
                     "integer_s": t["integer"], "float32_s": t["float32"], "ratio": t["integer"] / t["float32"],
                     "integer_compile_s": sides["integer"]["compile_s"],
                     "float32_compile_s": sides["float32"]["compile_s"], "goal": GOAL})
        sides = fparams = qparams = None
    out = {"benchmark": "forward", "backend": jax.default_backend(), "device": str(jax.devices()[0]), "rows": rows}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"integer forward vs float32, {a.windows} x {a.seq_len} tokens, SmolLM2-135M ({a.weights} weights), "
              f"{out['backend']}")
        for r in rows:
            print(f"  {r['precision']}: {r['integer_s']:.3f} s vs {r['float32_s']:.3f} s = {r['ratio']:.2f}x "
                  f"(goal <= {GOAL}); compile {r['integer_compile_s']:.1f} s vs {r['float32_compile_s']:.1f} s")
    return 0 if all(r["ratio"] <= GOAL for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
