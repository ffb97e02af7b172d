"""The computation compared between a single-process and a two-process 16-device mesh.

Used by tests/test_multiprocess.py in-process and by `python tests/_multiprocess_case.py
PORT PROCESS_ID OUT` in each worker process (8 CPU devices each, loopback coordinator).
"""

from __future__ import annotations

import sys


def compute() -> dict:
    """Tiny model on the 16-card appliance over every JAX device: generated tokens and prefill logits."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models import llama
    from models.appliance import ApplianceGenerator, CardLayout, build_cards, card_programs
    from models.config import get_config
    from np_jax.runtime import ApplianceRuntime

    cfg = get_config("tiny")
    params = llama.init_params(cfg, jax.random.key(0))
    params = llama.calibrate(params, jnp.asarray(np.arange(64).reshape(2, 32) % cfg.vocab_size), cfg, "w4a4")
    serving = llama.prepare_serving(params, cfg, "w4a4")
    layout = CardLayout.simple(cfg, 16, micro_batches=2, head_cards=2)
    prompts = [[5, 9, 11], [7] * 9, [3, 1, 4, 1, 5, 9, 2, 6], [100, 200]]
    gen = ApplianceGenerator(serving, cfg, "w4a4", layout, users=4, cache_len=32, devices=16)
    tokens = gen.generate(prompts, 6).tokens

    layer_fn, head_fn = card_programs(cfg, "w4a4", result="logits")
    state = {k: np.zeros((16, 1, 4, 16, cfg.n_kv_heads, cfg.head_dim), np.int8) for k in ("k", "v")}
    rt = ApplianceRuntime(layout.schedule, layer_fn, head_fn, build_cards(serving, cfg, "w4a4", layout), state,
                          devices=16, user_axis=1)
    toks = np.arange(32).reshape(4, 8) * 7 % cfg.vocab_size
    x = llama.embed(serving, jnp.asarray(toks), llama.resolve("w4a4")).reshape(2, 2, 8, -1)
    logits = rt.run(x, {"pos": jnp.broadcast_to(jnp.arange(8), (2, 2, 8))})
    return {"tokens": np.array(tokens), "logits": np.asarray(logits), "processes": jax.process_count(),
            "devices": len(jax.devices())}


def main(port: str, process_id: str, out: str) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    from np_jax.distributed import initialize

    initialize(f"127.0.0.1:{port}", 2, int(process_id), timeout_s=60, heartbeat_s=20)
    res = compute()
    if jax.process_index() == 0:
        np.savez(out, **res)


if __name__ == "__main__":
    main(*sys.argv[1:4])
