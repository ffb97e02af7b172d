"""The computations compared between a single-process and a two-process 16-device mesh.

Used by tests/test_multiprocess.py in-process and by `python tests/_multiprocess_case.py
PORT PROCESS_ID OUT TRAIN_DIR` in each worker process (8 CPU devices each, loopback
coordinator): the appliance (`compute`) and data-parallel training with a checkpoint, an
interruption and a resume (`train_case`).
"""

from __future__ import annotations

import sys


def compute(devices: int = 16, generate: bool = True) -> dict:
    """Tiny model on the 16-card appliance over `devices` JAX devices (16: every device of the
    two-process mesh; 1: the cards in order on one device, bit-identical as tests/test_appliance.py
    checks): prefill logits through the runtime, and the generator's tokens (prefill and decode
    steps with the KV cache on the cards) when `generate`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models import llama
    from models.appliance import Appliance, build_cards, card_programs
    from models.config import get_config
    from models.generate import Generator
    from np_jax.appliance.mapping import map_model
    from np_jax.appliance.runtime import ApplianceRuntime

    cfg = get_config("tiny")
    params = llama.init_params(cfg, jax.random.key(0))
    params = llama.calibrate(params, jnp.asarray(np.arange(64).reshape(2, 32) % cfg.vocab_size), cfg, "w4a4")
    serving = llama.prepare_serving(params, cfg, "w4a4")
    mapping = map_model(cfg, "w4a4", users=4, context=32, cards=16, micro_batches=2, output_cards=2, strict=False)
    prompts = [[5, 9, 11], [7] * 9, [3, 1, 4, 1, 5, 9, 2, 6], [100, 200]]
    out = {"processes": jax.process_count(), "devices": len(jax.devices())}
    if generate:
        gen = Generator(backend=Appliance(serving, cfg, "w4a4", mapping, cache_len=32, devices=devices))
        out["tokens"] = np.array(gen.generate(prompts, 6).tokens)

    layer_fn, head_fn = card_programs(cfg, "w4a4", mapping, result="logits")
    state = {k: np.zeros((16, 1, 4, 16, cfg.n_kv_heads, cfg.head_dim), np.int8) for k in ("k", "v")}
    rt = ApplianceRuntime(mapping.schedule, layer_fn, head_fn, build_cards(serving, cfg, "w4a4", mapping), state,
                          devices=devices, user_axis=1)
    toks = np.arange(32).reshape(4, 8) * 7 % cfg.vocab_size
    x = llama.embed(serving, jnp.asarray(toks), llama.resolve("w4a4")).reshape(2, 2, 8, -1)
    logits = rt.run(x, {"pos": jnp.broadcast_to(jnp.arange(8), (2, 2, 8))})
    return {**out, "logits": np.asarray(logits)}


def train_config(out: str):
    from models import train

    return train.TrainConfig(out=out, model="tiny", precision="float", batch_size=16, grad_accum=1, seq_len=32,
                             steps=2, save_every=1, lr=1e-3, calib_windows=1, warmup_steps=0)


def train_case(out: str) -> dict:
    """Two training steps of the tiny model (float: the data-parallel mechanics do not depend on
    the precision, and float compiles fastest): step 1 is saved, the run stops after step 2 without saving
    it (as a killed process would), and a second call resumes from step 1 and saves step 2."""
    import numpy as np

    from models import train
    from np_jax.appliance.distributed import to_host

    quiet = dict(progress=False, log=lambda s: None)
    first = train.train(train_config(out), stop_after=2, **quiet)
    res = train.train(train_config(out), **quiet)
    leaves = {"/".join(str(k) for k in path): to_host(x)
              for path, x in __import__("jax").tree_util.tree_flatten_with_path(res.params)[0]}
    return {"resumed_from": res.resumed_from, "first_losses": np.array([m["loss"] for m in first.metrics]),
            "losses": np.array([m["loss"] for m in res.metrics]), **{"param:" + k: v for k, v in leaves.items()}}


def main(port: str, process_id: str, out: str, train_dir: str, cases: str = "generate,train") -> None:
    """`cases`: "appliance" (prefill logits), "generate" (those and generated tokens), "train"."""
    import jax

    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    from np_jax.appliance.distributed import initialize

    initialize(f"127.0.0.1:{port}", 2, int(process_id), timeout_s=60, heartbeat_s=20)
    cases = cases.split(",")
    res = compute(generate="generate" in cases) if "appliance" in cases or "generate" in cases else {}
    if "train" in cases:
        res.update({"train:" + k: v for k, v in train_case(train_dir).items()})
    if jax.process_index() == 0:
        np.savez(out, **res)


if __name__ == "__main__":
    main(*sys.argv[1:6])
