"""A decode step of the emulated appliance vs a plain float32 JAX decode step of the same model and batch.

Run: `python -m benchmarks.bench_appliance [--models smollm2-135m granite-3b-northpole] [--devices N] [--json]`.
For each model: 28 users (14 micro-batches of 2), the appliance mapping for w4a4, one decode
step for all users through the 16-card GPipe pipeline (np_jax.appliance.runtime) against one float32
`llama.step` of the same batch on one device. Goal: ratio (appliance / float32) <= 1.5.
SmolLM2 uses its real weights; the 3B shape uses random weights (generated directly in
integer form; its float32 baseline uses random float weights of the same shapes).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "granite-3b-northpole"])
    ap.add_argument("--users", type=int, default=28)
    ap.add_argument("--cache-len", type=int, default=128)
    ap.add_argument("--devices", type=int, default=16, help="JAX devices for the 16 cards (CPU: virtual)")
    ap.add_argument("--micro-batches", type=int, nargs="+", default=[None],
                    help="micro-batch counts to measure (default: the mapping's, M = 14 for 28 users)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", a.devices)
    import jax.numpy as jnp
    import numpy as np

    from benchmarks._timing import median_seconds
    from models import llama
    from models.appliance import Appliance
    from models.config import get_config
    from models.io import weights as loaders
    from np_jax.appliance.mapping import map_model

    rows = []
    for name in a.models:
        cfg = get_config(name)
        users, S = a.users, a.cache_len
        tok = jnp.asarray(np.arange(users) % cfg.vocab_size, jnp.int32)
        pos = jnp.full((users,), S // 2, jnp.int32)

        # the model: SmolLM2's real weights; the 3B shape's random integer weights, whose float32
        # reference is their dequantized values (the same model, without a second random draw)
        if name == "smollm2-135m":
            cfg, params = loaders.load_gguf()
            cal = jax.random.randint(jax.random.key(1), (1, 64), 0, cfg.vocab_size)
            serving = llama.prepare_serving(llama.calibrate(params, cal, cfg, "w4a4", "mse"), cfg, "w4a4")
        else:
            serving = llama.init_serving_random(cfg, jax.random.key(0), "w4a4")
            params = llama.dequantize_serving(serving, cfg)

        # float32 baseline: one decode step for all users on one device
        cache = llama.init_cache(cfg, users, S, "float")
        f = jax.jit(lambda p, t, q, c: llama.step(p, t[:, None], q[:, None], c, cfg, "float")[0])
        t_float = median_seconds(f, params, tok, pos, cache, repeats=a.repeats)
        del params, cache, f
        gc.collect()

        # the appliance: w4a4 mapping, 16 cards, the same users
        for m_req in a.micro_batches:
            mapping = map_model(cfg, "w4a4", users=users, context=S, micro_batches=m_req)
            gen = Appliance(serving, cfg, "w4a4", mapping, cache_len=S, devices=a.devices)
            M, mb = mapping.micro_batches, mapping.micro_batch_size
            x = gen._frames(np.asarray(tok)[:, None])
            aux = {"pos": pos.reshape(M, mb, 1), "last": jnp.zeros((M, mb), jnp.int32)}
            t_app = median_seconds(lambda: gen.runtime.run(x, aux), repeats=a.repeats)
            rows.append({"model": cfg.name, "users": users, "micro_batches": M, "cache_len": S,
                         "devices": gen.runtime.devices, "mapping": mapping.one_line(),
                         "appliance_decode_ms": 1e3 * t_app, "float32_decode_ms": 1e3 * t_float,
                         "ratio": t_app / t_float})
            print(rows[-1], file=sys.stderr)
            del gen
            gc.collect()
        del serving
        gc.collect()

    info = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind), "goal_ratio": 1.5}
    if a.json:
        print(json.dumps({**info, "cases": rows}, indent=2))
    else:
        print(f"appliance decode step vs float32 decode step on {info['backend']}; goal ratio <= 1.5")
        for r in rows:
            print(f"{r['model']:<22} users {r['users']:>3} M {r['micro_batches']:>2} devices {r['devices']:>2}: appliance "
                  f"{r['appliance_decode_ms']:8.1f} ms, float32 {r['float32_decode_ms']:8.1f} ms, ratio {r['ratio']:.2f}")
    return 0 if all(r["ratio"] <= 1.5 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
