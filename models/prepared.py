"""The prepared model: a recipe's result, made once per (GGUF file, recipe, precision) and cached.

Preparing the serving form of SmolLM2 (rotations, GPTQ, calibration) takes minutes on a CPU;
`prepare` stores its result under np_jax's cache folder (`$NP_JAX_CACHE`, else
`~/.cache/np_jax`, never in the repository) and later runs load it in seconds. An entry is named
by a SHA-256 of everything that determines it (the GGUF file's own SHA-256, the recipe, the
precision, the calibration data, the format version); it holds `params.npz` and `meta.json`
with the model config, the inputs and a SHA-256 of the arrays. An entry whose arrays do not
match their hash, or that cannot be read, is reported and rebuilt; an entry of another format
version is never read (its key differs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from models import llama, recipe as recipes
from models.config import ModelConfig
from models.io.load import Model
from models.train.data import Corpus, DataConfig, TrainStream

FORMAT = "np_jax.prepared/2"
CALIB_SEQ_LEN = 256

Log = Callable[[str], None]


def cache_root() -> Path:
    if os.environ.get("NP_JAX_CACHE"):
        return Path(os.environ["NP_JAX_CACHE"]).expanduser() / "prepared"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "np_jax" / "prepared"


def calib_seq_len(cfg: ModelConfig) -> int:
    """Tokens per calibration window: 256, or the model's context if shorter."""
    return min(CALIB_SEQ_LEN, cfg.max_seq_len)


def calibration_windows(model: Model, n: int, data: DataConfig = DataConfig(), seed: int = 0) -> np.ndarray:
    """The first `n` windows of the training split's shuffled order, [n, calib_seq_len] (as
    `np-jax train` calibrates: the held-out files are never used)."""
    return TrainStream(Corpus(data, model.encoder), calib_seq_len(model.cfg), 1, 1, seed).calibration(n)


def _flatten(params) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _unflatten(arrays: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, a in arrays.items():
        path = [k.strip("'\"") for k in key.strip("[]").split("][")]
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = a
    return out


def arrays_sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cache_key(model: Model, recipe: recipes.Recipe, policy: str, data: DataConfig = DataConfig(),
              seed: int = 0) -> tuple[str, dict]:
    inputs = {"format": FORMAT, "model": model.cfg.name, "gguf_sha256": model.sha256, "source": model.source,
              "recipe": recipe.to_json(), "precision": policy,
              "calibration": {"windows": recipe.calib_windows, "seq_len": calib_seq_len(model.cfg),
                              "data": data.describe(), "seed": seed}}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32], inputs


def _load(d: Path) -> tuple[ModelConfig, llama.Params]:
    meta = json.loads((d / "meta.json").read_text())
    with np.load(d / "params.npz") as z:
        arrays = {k: z[k] for k in z.files}
    if meta.get("format") != FORMAT or arrays_sha256(arrays) != meta["arrays_sha256"]:
        raise ValueError("its arrays do not match the SHA-256 in its meta.json")
    cfg = ModelConfig(**meta["model_config"])
    return cfg, jax.tree.map(jax.numpy.asarray, _unflatten(arrays))


def prepare(model: Model, recipe: str | recipes.Recipe, policy: str, *, data: DataConfig = DataConfig(),
            seed: int = 0, log: Log = lambda m: None, use_cache: bool = True) -> tuple[ModelConfig, llama.Params, dict]:
    """(config, parameters, info) of `model` prepared by `recipe` at `policy`, calibrated on the
    first windows of `data`'s training split in the order of `seed`; from the cache when a verified
    entry exists (info["cached"]), else made and stored. Models without a file hash (random init,
    checkpoints) are prepared and not cached."""
    recipe = recipes.get_recipe(recipe)
    key, inputs = cache_key(model, recipe, policy, data, seed)
    d = cache_root() / key
    info = {"recipe": recipe.name, "calibration": inputs["calibration"], "steps": recipe.steps(policy), "cache": str(d), "cached": False}
    if use_cache and model.sha256 is not None and d.is_dir():
        try:
            t0 = time.perf_counter()
            cfg, params = _load(d)
            log(f"prepared model from the cache {d} in {time.perf_counter() - t0:.1f} s")
            return cfg, params, info | {"cached": True}
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
            log(f"the prepared-model cache {d} is corrupt or unreadable ({e}); rebuilding it")
            shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    log(f"preparing {model.cfg.name} for {policy} with recipe {recipe.name} ({', '.join(recipe.steps(policy))}); "
        "this runs once and is cached")
    windows = calibration_windows(model, recipe.calib_windows, data, seed)
    cfg, params = recipes.apply(model.params, model.cfg, recipe, policy, windows, log)
    info["prepare_s"] = time.perf_counter() - t0
    if use_cache and model.sha256 is not None:
        _store(d, cfg, params, inputs, log)
    return cfg, params, info


def _store(d: Path, cfg: ModelConfig, params, inputs: dict, log: Log) -> None:
    arrays = _flatten(params)
    meta = {"format": FORMAT, "inputs": inputs, "model_config": dataclasses.asdict(cfg),
            "arrays_sha256": arrays_sha256(arrays)}
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=d.parent))
    try:
        np.savez(tmp / "params.npz", **arrays)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)  # the entry appears whole or not at all
        log(f"cached the prepared model in {d}")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"warning: could not cache the prepared model in {d}: {e}")
