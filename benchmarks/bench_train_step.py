"""One QAT training step (the integer forward with LSQ gradients) vs one float training step.

Run: `python -m benchmarks.bench_train_step [--precision w4a4] [--recipe rotate-gptq] [--seq-len 128]
[--weights real|random] [--rounds 3] [--json]`.

SmolLM2-135M, one sequence of `--seq-len` tokens per step, the same jitted optimizer step
`np-jax train` runs (`models.train.train_step_fn`: forward, backward, AdamW, parameters and
optimizer state donated): at `--precision` from the `--recipe`'s prepared model (cached per GGUF
file) against the float model. The two are timed interleaved in rounds in this process; the
ratio is QAT / float. Goal: <= 1.3. `--weights random` (no model file needed): random weights of
SmolLM2's shape through the recipe's transforms, steps calibrated on random tokens: the same
programs, other values (as `bench_forward`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

GOAL = 1.3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="w4a4")
    ap.add_argument("--recipe", default="rotate-gptq")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--weights", choices=["real", "random"], default="real",
                    help="SmolLM2-135M's prepared model, or random weights of its shape (no model file)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from models import llama, recipe as R, train as T
    from models.config import get_config

    if a.weights == "real":
        from models.io.load import load_model
        from models.prepared import prepare

        model = load_model("smollm2-135m", log=lambda m: None)
        fcfg, fparams = model.cfg, model.params
        qcfg, qparams, _ = prepare(model, a.recipe, a.precision, log=lambda m: print(m, file=sys.stderr))
    else:
        fcfg = get_config("smollm2-135m")
        fparams = llama.init_params(fcfg, jax.random.key(0))
        qcfg, qparams = R.transform(fparams, fcfg, a.recipe, a.precision)
        calib = jax.random.randint(jax.random.key(1), (4, 256), 0, fcfg.vocab_size)
        qparams = llama.calibrate(qparams, calib, qcfg, a.precision, "lsq")
    toks = jnp.asarray(np.arange(a.seq_len + 1).reshape(1, 1, -1) * 7 % fcfg.vocab_size, jnp.int32)

    sides = {}
    for name, cfg, params, precision in (("float", fcfg, fparams, "float"),
                                         ("qat", qcfg, qparams, a.precision)):
        tc = T.TrainConfig(precision=precision, recipe=a.recipe, batch_size=1, grad_accum=1, seq_len=a.seq_len)
        step = T.train_step_fn(cfg, tc)
        p = jax.tree.map(jnp.array, params)
        state = {"p": p, "o": T.make_optimizer(tc).init(p)}

        def run(step=step, state=state):
            state["p"], state["o"], m = step(state["p"], state["o"], None, toks)
            jax.block_until_ready(m["loss"])

        t0 = time.perf_counter()
        run()
        print(f"{name}: compiled and ran one step in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        run()
        sides[name] = run
    times = {k: [] for k in sides}
    for _ in range(a.rounds):
        for k, run in sides.items():
            ts = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                run()
                ts.append(time.perf_counter() - t0)
            times[k].append(statistics.median(ts))
    tq, tf = statistics.median(times["qat"]), statistics.median(times["float"])
    out = {"backend": jax.default_backend(), "jax": jax.__version__, "model": fcfg.name, "weights": a.weights,
           "precision": a.precision, "recipe": a.recipe, "tokens_per_step": a.seq_len,
           "qat_step_s": tq, "float_step_s": tf, "ratio": tq / tf, "goal": GOAL}
    if a.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['model']} {a.precision} ({a.recipe}) QAT step {tq:.2f} s vs float step {tf:.2f} s for "
              f"{a.seq_len} tokens on {out['backend']}: ratio {tq / tf:.2f} (goal <= {GOAL})")
    return 0 if tq / tf <= GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
