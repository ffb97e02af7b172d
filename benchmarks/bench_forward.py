"""The integer forward over whole windows (what `np-jax eval`, calibration and QAT run) vs plain
float32 JAX on the same windows.

Run: `python -m benchmarks.bench_forward [--precisions w4a4 w8a8] [--windows 4] [--seq-len 256]
[--weights real|random] [--rounds 3] [--json] [--profile]`.

The integer side is `np-jax eval`'s jitted step (models.evaluate.perplexity: `llama.forward` at
the precision, the summed NLL and the top-1 predictions) on the default recipe's model; the
baseline is the same step at the float policy on the float model the recipe started from (no
rotations, no online Hadamards: plain JAX). Both are compiled ahead of time (the compile time is
reported apart) and timed interleaved in rounds in this process (noise hits both); the ratio is
integer / float. `--weights real` uses SmolLM2-135M's prepared model (from the cache, else
prepared once); `random` (no model file needed) runs the recipe's transforms on random weights
of SmolLM2's shape and calibrates their steps on random tokens: the same program, other values.
Goal: <= 1.2 (issue on the quality loop's speed).

`--profile` also traces one call of each side (`jax.profiler`, XLA CPU's per-op events) and sums
the ops' times by the piece of the model that made them (the function in the op's source stack,
read from the compiled HLO): where the integer forward spends what the float one does not.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import sys
import tempfile
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


def _stacks(hlo: str):
    """stack_frame_id -> the function names of its source stack, from the HLO text's tables."""
    def table(name):
        m = re.search(rf"^{name}\n(.*?)\n\n", hlo, re.S | re.M)
        return m.group(1).splitlines() if m else []
    names = {int(line.split()[0]): line.split(None, 1)[1].strip('"') for line in table("FunctionNames")}
    fn_of = {int(line.split()[0]): int(re.search(r"function_name_id=(\d+)", line).group(1))
             for line in table("FileLocations")}
    frames = {int(line.split()[0]): (int(re.search(r"file_location_id=(\d+)", line).group(1)),
                                     int(re.search(r"parent_frame_id=(\d+)", line).group(1)) - 1)
              for line in table("StackFrames")}  # parents are printed one-based, 0 = none

    def stack(i):
        out = []
        while i in frames and len(out) < 100:
            loc, i = frames[i]
            out.append(names.get(fn_of.get(loc), ""))
        return set(out)
    return stack


def piece(stack: set, op_name: str, is_dot: bool) -> str:
    """The piece of the forward an op belongs to, from its source stack and its op name."""
    if "head" in stack:
        return "output layer: dot" if is_dot else "output layer: norm, quantization, scaling"
    if "token_nll" in stack:
        return "loss (log-softmax, NLL, argmax)"
    if "online_rotation" in stack:
        return "online rotations: dots" if is_dot else "online rotations: quantization, transposes, scaling"
    if "silu_lut" in stack:
        return "SiLU lookup tables"
    if "_quantize_b" in stack:
        return "weight quantization and tiling"
    if "_batched_core_vmm" in stack or "bkle" in op_name or "bklt" in op_name:
        return "attention products (QK^T, PV)"
    if is_dot and "linear" in stack:
        return "layer linear dots"
    if stack & {"act_codes", "scale_accumulator", "int_dot", "array_vmm"}:
        return "activation quantization, dot conversions, scaling"
    if "_split_prefix" in stack or "concatenate" in op_name:
        return "sink prefix: split, concatenate"
    if "softmax" in stack:
        return "softmax"
    return "everything else (norms, RoPE, residuals, SiLU x up)"


def profile(compiled, params, windows) -> dict[str, float]:
    """ms per call of every piece (`piece`): one traced call, each op's time from XLA's events."""
    import jax

    hlo = compiled.as_text()
    stack = _stacks(hlo)
    ops = {}
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = \S+ (\w[\w-]*)\(", line)
        if m:
            op = re.search(r'op_name="([^"]+)"', line)
            sf = re.search(r"stack_frame_id=(\d+)", line)
            op = op.group(1) if op else ""
            ops.setdefault(m.group(1), piece(stack(int(sf.group(1))) if sf else set(), op,
                                             op.endswith("dot_general") or m.group(2) == "dot"))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            jax.block_until_ready(compiled(params, windows))
        found = glob.glob(f"{d}/**/perfetto_trace.json.gz", recursive=True)
        if not found:
            raise RuntimeError("jax.profiler wrote no perfetto trace")
        with gzip.open(found[0]) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    out = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e.get("name") in ops:
            out[ops[e["name"]]] += e.get("dur", 0) / 1e3
    return dict(out)


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
    ap.add_argument("--profile", action="store_true",
                    help="also the time of each piece of the forward (op time of one traced call, ms)")
    a = ap.parse_args(argv)

    import jax
    import numpy as np

    from models.evaluate.perplexity import nll_fn  # the jitted step np-jax eval runs

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 49152, (a.windows, a.seq_len + 1)).astype(np.int32)
    rows = []
    for precision in a.precisions:
        cfg_f, fparams, cfg_q, qparams = _models(a.weights, precision, windows[:, :-1], log)
        sides = {}
        for name, cfg, params, policy in (("integer", cfg_q, qparams, precision), ("float32", cfg_f, fparams, "float")):
            t0 = time.perf_counter()
            compiled = nll_fn(cfg, policy).lower(params, windows).compile()
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
        if a.profile:
            rows[-1]["profile_ms"] = {k: profile(s["call"], s["params"], windows) for k, s in sides.items()}
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
            if "profile_ms" in r:
                pr = r["profile_ms"]
                print("    op time of one call, ms (ops on several threads overlap): integer | float32")
                for k in sorted(set(pr["integer"]) | set(pr["float32"]), key=lambda k: -pr["integer"].get(k, 0)):
                    print(f"    {k:55s} {pr['integer'].get(k, 0):7.0f} | {pr['float32'].get(k, 0):7.0f}")
                print(f"    {'all ops':55s} {sum(pr['integer'].values()):7.0f} | {sum(pr['float32'].values()):7.0f}")
    return 0 if all(r["ratio"] <= GOAL for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
