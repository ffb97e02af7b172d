"""A decode step of the emulated appliance vs a good plain-JAX float32 decode step of the same model.

Run: `python -m benchmarks.bench_appliance [--cases smollm2:1:512 smollm2:28:128 granite3b:28:128]
[--layers scan unrolled] [--float-forms scan unrolled] [--weights real|random]
[--devices N] [--rounds 3] [--json]`.

Each case is MODEL:USERS:CACHE. For each, one decode step for every user: the appliance (w4a4,
the mapping `np-jax run` uses: the best predicted one for these users and cache; the cards on
the devices `runtime.default_devices` picks, or `--devices`) against plain JAX float32 on one
device (`llama.step` with the float policy, jitted, the KV cache donated and updated in place),
in two forms: the layers scanned and the layers unrolled (each reads its own weights; the
faster one is the baseline). The appliance runs in the layer forms of `--layers` (the same two,
`Appliance(layers=...)`). All sides keep their state resident and are timed interleaved in
rounds in this process (noise hits all); the ratio is the faster appliance form's median time
over the faster float form's (`ratio_same_form`: each form against its float twin).
SmolLM2 uses its real weights (the default recipe's serving form, from the prepared-model
cache when present), or with `--weights random` (no model file needed) random weights of its
shape through the recipe's transforms, steps calibrated on random tokens: the same programs, other
values (as `bench_forward`); its float reference is the float model either way. The 3B shape
always uses random integer weights, whose float reference is their dequantized values (the same
model).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

ALIASES = {"smollm2": "smollm2-135m", "granite3b": "granite-3b-northpole"}
# issue goals (model, users): SmolLM2 at 1 user no slower than float, at 28 users <= 0.7; the 3B shape <= 1.0
GOALS = {("smollm2-135m", 1): 1.0, ("smollm2-135m", 28): 0.7, ("granite-3b-northpole", 28): 1.0}


def _timer(step, repeats):
    """Median seconds of `step()` (which blocks) over `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["smollm2:1:512", "smollm2:28:128"], metavar="MODEL:USERS:CACHE")
    ap.add_argument("--devices", type=int, default=None, help="devices for the cards (default: runtime.default_devices)")
    ap.add_argument("--virtual-devices", type=int, default=16, help="CPU devices to create (virtual)")
    ap.add_argument("--layers", nargs="+", default=["scan", "unrolled"], choices=["scan", "unrolled"],
                    help="the appliance's layer forms to time (Appliance(layers=...); one device only for unrolled)")
    ap.add_argument("--float-forms", nargs="+", default=["scan", "unrolled"], choices=["scan", "unrolled"],
                    help="the float32 baseline's layer forms (each holds its own copy of the weights)")
    ap.add_argument("--weights", choices=["real", "random"], default="real",
                    help="SmolLM2's prepared model, or random weights of its shape (no model file)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", a.virtual_devices)
    import jax.numpy as jnp
    import numpy as np

    from models import llama
    from models.appliance import Appliance
    from models.config import get_config
    from np_jax import cost

    rows = []
    for case in a.cases:
        name, users, S = case.split(":")
        name, users, S = ALIASES.get(name, name), int(users), int(S)
        if name == "smollm2-135m" and a.weights == "random":
            from models import recipe as R

            fcfg = get_config(name)
            fparams = llama.init_params(fcfg, jax.random.key(0))
            cfg, qparams = R.transform(fparams, fcfg, R.DEFAULT_RECIPE, "w4a4")
            calib = jax.random.randint(jax.random.key(1), (4, 256), 0, fcfg.vocab_size)
            qparams = llama.calibrate(qparams, calib, cfg, "w4a4", "lsq")
        elif name == "smollm2-135m":
            from models.io.load import load_model
            from models.prepared import prepare
            from models.recipe import DEFAULT_RECIPE

            model = load_model(name, log=lambda m: None)
            cfg, qparams, _ = prepare(model, DEFAULT_RECIPE, "w4a4", log=lambda m: print(m, file=sys.stderr))
            fcfg, fparams = model.cfg, model.params
        else:
            cfg = fcfg = get_config(name)
            qparams = None
        mapping = cost.plan_mapping(cfg, "w4a4", users=users, context=S, cards=16, prompt_tokens=S // 2,
                                    gen_tokens=S // 2)
        tilings = mapping.tilings | {"lm_head": llama.model_tilings(cfg)["lm_head"]}
        if qparams is not None:
            serving = llama.prepare_serving(qparams, cfg, "w4a4", tilings)
        else:
            serving = llama.init_serving_random(cfg, jax.random.key(0), "w4a4")
            fparams = llama.dequantize_serving(serving, cfg)
        tok = np.arange(users, dtype=np.int32) % cfg.vocab_size
        pos = np.full((users,), S // 2, np.int32)

        # plain JAX float32: one decode step for all users, the cache donated and updated in place;
        # two forms of the same model: the layers scanned (one layer compiled, each layer's weights
        # sliced out of the stack) and unrolled (each layer reads its own weights, no copy)
        fstep = jax.jit(lambda p, t, q, c: llama.step(p, t[:, None], q[:, None], c, fcfg, "float"), donate_argnums=3)
        ftok, fpos = jnp.asarray(tok), jnp.asarray(pos)
        cache = llama.init_cache(fcfg, users, S, "float")
        forms = {}
        if "scan" in a.float_forms:
            forms["scan"] = (fparams, cache)
        if "unrolled" in a.float_forms:
            forms["unrolled"] = ({**fparams, "layers": llama.unstack_layers(fparams["layers"])},
                                 {k: list(v) for k, v in cache.items()})
        fstate = {k: c for k, (_, c) in forms.items()}

        def float_step(form):
            def f():
                logits, fstate[form] = fstep(forms[form][0], ftok, fpos, fstate[form])
                jax.block_until_ready(logits)
            return f

        # the appliance: the same users through the card programs, state resident on the cards, in
        # each layer form (one device: `Appliance(layers=...)`; a mesh scans)
        M, mb = mapping.micro_batches, mapping.micro_batch_size
        gens = {form: Appliance(serving, cfg, "w4a4", mapping, cache_len=S, devices=a.devices, layers=form)
                for form in a.layers}
        gen = next(iter(gens.values()))
        x = gen._frames(tok[:, None])
        aux = {"pos": jnp.asarray(pos.reshape(M, mb, 1)), "last": jnp.zeros((M, mb), jnp.int32)}

        def app_step(g):
            def f():
                jax.block_until_ready(g.runtime.run(x, aux))
            return f

        steps = {f"float32_{form}": float_step(form) for form in forms}
        steps |= {f"appliance_{form}": app_step(g) for form, g in gens.items()}
        compile_s = {}
        for k, f in steps.items():  # compile and warm up
            t0 = time.perf_counter()
            f()
            compile_s[k] = time.perf_counter() - t0
            f()
        times = {k: [] for k in steps}
        for _ in range(a.rounds):  # interleaved
            for k, f in steps.items():
                times[k].append(_timer(f, a.repeats))
        med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        best_f = min((k for k in med if k.startswith("float32_")), key=med.get)  # the baseline: the faster form
        best_a = min((k for k in med if k.startswith("appliance_")), key=med.get)
        rows.append({"model": cfg.name, "weights": "random" if qparams is None else a.weights, "users": users,
                     "cache_len": S, "micro_batches": M,
                     "devices": gen.runtime.devices, "mapping": mapping.one_line(),
                     "appliance_decode_ms": med[best_a], "appliance_form": best_a.split("_", 1)[1],
                     "float32_decode_ms": med[best_f], "float32_form": best_f.split("_", 1)[1],
                     "ratio": med[best_a] / med[best_f], "goal": GOALS.get((cfg.name, users)),
                     "ms": med, "first_call_s": compile_s,
                     "ratio_same_form": {form: med[f"appliance_{form}"] / med[f"float32_{form}"] for form in gens
                                         if form in forms}})
        print(rows[-1], file=sys.stderr)
        gen = gens = serving = fparams = fstate = forms = steps = None  # free before the next case
        gc.collect()

    info = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}
    if a.json:
        print(json.dumps({**info, "cases": rows}, indent=2))
    else:
        print(f"appliance decode step (w4a4) vs plain JAX float32 decode step on {info['backend']}")
        for r in rows:
            print(f"{r['model']:<22} users {r['users']:>3} cache {r['cache_len']:>4} M {r['micro_batches']:>2} devices "
                  f"{r['devices']:>2}: appliance {r['appliance_decode_ms']:8.1f} ms ({r['appliance_form']}), float32 "
                  f"{r['float32_decode_ms']:8.1f} ms ({r['float32_form']}), ratio {r['ratio']:.2f}"
                  + (f" (goal <= {r['goal']})" if r["goal"] else ""))
    return 0 if all(r["goal"] is None or r["ratio"] <= r["goal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
