"""The prepared model: a recipe's result, made once per (GGUF file, recipe, precision) and cached.

Preparing the serving form of SmolLM2 (rotations, GPTQ, calibration) takes minutes on a CPU;
`prepare` stores its result under np_jax's cache folder (`$NP_JAX_CACHE/prepared`, else
`~/.cache/np_jax/prepared`, never in the repository) and later runs load it in 1.5-2.5 s.
An entry is a folder named by a SHA-256 of everything that determines it (the GGUF file's own
SHA-256, the recipe, the precision, the calibration data, the format version) holding two files:

- `arrays.bin`: every parameter in its most compact exact form, each one verified bit for bit
  when the entry is written: a weight matrix on its integer grid (GPTQ's and round-to-nearest's
  output is exactly `code * step`) as its codes, two INT4 codes per byte or one INT8 code; a
  table on GGUF's Q8_0 grid (one step per 32 values of a row) as INT8 codes and its steps;
  everything else (norms, biases, step sizes, any leaf no exact form fits) as it is, float32.
  Two leaves hold no array at all: the rotated embedding and the output layer's INT8 codes are
  recomputed from the model file's embedding and final norm exactly as the recipe computes them
  (`_derive`), which the entry's inputs name by the file's SHA-256.
- `meta.json`: the format, the inputs, the model config, where each array lies in `arrays.bin`,
  and one SHA-256 over the rest of `meta.json` (canonical JSON) and all of `arrays.bin`; each
  recomputed leaf is checked against a SHA-256 of its own.

A damaged entry (truncated, emptied, a byte changed anywhere, a file missing, meta edited) is
reported in one line, removed and prepared again: it is never used. Entries are written to a
temporary folder and renamed into place, so an interrupted run leaves no half-written entry;
temporary folders a killed run left behind, and entries of an older format, are removed by the
next `prepare`. The cache is bounded (`NP_JAX_CACHE_MAX`, default 5 GB): after an entry is
written, the least recently used ones are removed until the entries of this format fit
(`cache_limit`, `_trim`). `np-jax cache` lists the entries and frees them (models.commands.cache).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from models import llama, recipe as recipes
from models.config import ModelConfig
from models.io.load import Model
from models.train.data import Corpus, DataConfig, TrainStream
from np_jax.cli import cache_dir
from np_jax.quant import get_policy, gptq, hadamard

# 5: the key no longer holds the recipe's description (every key changed, so the version moves and
# the next preparation sweeps the entries no key can reach)
FORMAT_VERSION = 5
FORMAT = f"np_jax.prepared/{FORMAT_VERSION}"
CALIB_SEQ_LEN = 256
META, ARRAYS = "meta.json", "arrays.bin"
ALIGN = 64  # bytes: each array in arrays.bin starts on a multiple
BLOCK = 32  # values per step of a Q8_0 table row (GGUF's block)
STALE_TMP_S = 600  # a temporary folder this old is a killed run's: writing an entry takes seconds
LIMIT_ENV = "NP_JAX_CACHE_MAX"
DEFAULT_LIMIT = 5_000_000_000  # bytes: ~90 SmolLM2 entries at 4-bit weights, ~45 at w8a8
UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
         "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
TMP_PREFIX = ".tmp-"
DERIVED = ("rotated", "head")  # codecs recomputed from the model file (`_derive`): no array stored
FILE_TENSORS = ("embed", "final_norm")  # the model file's tensors they read

Log = Callable[[str], None]
Path_ = tuple[str, ...]


class DamagedEntry(Exception):
    """A cache entry that cannot be used; the message says why, in a few words."""


def cache_root() -> Path:
    return cache_dir() / "prepared"


def cache_limit() -> int | None:
    """The most bytes the entries of this format may take together: `$NP_JAX_CACHE_MAX` (a size
    such as 5GB, 800MB, 2GiB, or a plain number of bytes; `none` for no bound), default 5 GB.
    ValueError, naming the variable, for anything else."""
    raw = os.environ.get(LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_LIMIT
    if raw.lower() in ("none", "unlimited", "off"):
        return None
    m = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)", raw)
    unit = m and UNITS.get(m.group(2).lower())
    if not unit or not float(m.group(1)) * unit >= 1:
        raise ValueError(f"{LIMIT_ENV}={raw!r}: give the prepared-model cache's size bound as a size such as 5GB, "
                         "800MB or 2GiB, or none for no bound")
    return int(float(m.group(1)) * unit)


def calib_seq_len(cfg: ModelConfig) -> int:
    """Tokens per calibration window: 256, or the model's context if shorter."""
    return min(CALIB_SEQ_LEN, cfg.max_seq_len)


def calibration_windows(model: Model, n: int, data: DataConfig = DataConfig(), seed: int = 0) -> np.ndarray:
    """The first `n` windows of the training split's shuffled order, [n, calib_seq_len] (as
    `np-jax train` calibrates: the held-out files are never used)."""
    return TrainStream(Corpus(data, model.encoder), calib_seq_len(model.cfg), 1, 1, seed).calibration(n)


def cache_key(model: Model, recipe: recipes.Recipe, policy: str, data: DataConfig = DataConfig(),
              seed: int = 0) -> tuple[str, dict]:
    inputs = {"format": FORMAT, "model": model.cfg.name, "gguf_sha256": model.sha256, "source": model.source,
              "recipe": recipe.to_json(), "precision": get_policy(policy).key(),
              "transforms": recipe.steps(policy, model.cfg.n_layers),
              "calibration": {"windows": recipe.calib_windows, "seq_len": calib_seq_len(model.cfg),
                              "data": data.describe(), "seed": seed}}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32], inputs


# --- the exact compact forms -------------------------------------------------------------------------

def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit for bit (np.array_equal calls -0.0 and 0.0 equal)."""
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(_bits(a), _bits(b))


def _grid_codes(a: np.ndarray, step: np.ndarray) -> np.ndarray | None:
    """INT8 codes c with `c.astype(float32) * step` equal to `a` bit for bit, or None."""
    with np.errstate(all="ignore"):
        c = np.rint(np.divide(a, step, out=np.zeros(a.shape, np.float32), where=np.broadcast_to(step != 0, a.shape)))
    if not np.isfinite(c).all() or c.min(initial=0) < -128 or c.max(initial=0) > 127:
        return None
    c = c.astype(np.int8)
    return c if _same(c.astype(np.float32) * step, a) else None


def _pack4(c: np.ndarray) -> np.ndarray:
    u = (c.reshape(-1) & 0xF).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(0))
    return u[0::2] | (u[1::2] << 4)


def _unpack4(p: np.ndarray, n: int) -> np.ndarray:
    u = np.empty(2 * p.size, np.uint8)
    u[0::2], u[1::2] = p & 0xF, p >> 4
    return (u[:n].view(np.int8) ^ 8) - 8  # 0..15 -> -8..7


def _grid_decode(data: np.ndarray, bits, shape: tuple[int, ...]) -> np.ndarray:
    """INT8 codes of `shape` from a grid record's buffer: packed at `bits` (4 or 8), or, for a stack
    of layers of several widths, `bits` per layer (each layer packed at its own, in order)."""
    if not isinstance(bits, list):
        return (_unpack4(data, math.prod(shape)) if bits == 4 else data.view(np.int8)).reshape(shape)
    if len(bits) != shape[0] or any(b not in (4, 8) for b in bits):
        raise DamagedEntry("a per-layer grid record does not fit its shape")
    m, out, at = math.prod(shape[1:]), [], 0
    for b in bits:
        n = -(-m // 2) if b == 4 else m
        part = data[at:at + n].view(np.uint8)
        out.append(_unpack4(part, m) if b == 4 else part.view(np.int8))
        at += n
    if at != data.size:
        raise DamagedEntry("a per-layer grid record does not fit its buffer")
    return np.stack(out).reshape(shape)


def _rotations(rotation: dict, arrays: dict[str, np.ndarray]) -> list[jax.Array]:
    """The residual rotations in the order the recipe folds them: the Hadamard Q, then the learned
    R (`recipe.learn_rotation`) when the record names the entry's array that holds it."""
    out = [jnp.asarray(hadamard.orthogonal(int(rotation["hadamard"]), int(rotation["seed"])), jnp.float32)]
    if rotation.get("learned") is not None:
        try:
            out.append(jnp.asarray(arrays[rotation["learned"]], jnp.float32))
        except KeyError:
            raise DamagedEntry(f"its learned rotation {rotation['learned']!r} is missing") from None
    return out


def _derive(rec: dict, files: dict[str, np.ndarray], step: np.ndarray | None = None,
            arrays: dict[str, np.ndarray] | None = None) -> jax.Array:
    """A leaf the entry holds no array for, recomputed from the model file's tensors (`files`)
    exactly as the recipe computes it:
    - "rotated": the embedding times the residual rotation (`recipe.rotate_residual`; then the
      learned one, an array of the entry's `arrays`, if `recipe.learn_rotation`);
    - "head": the output layer's codes times their steps: the embedding's transpose times the
      final norm's gain (`recipe.fold_norms`), rotated (`rotate_residual`), rounded to its
      `bits`-bit grid of steps `step` (`recipe` weights step: round-to-nearest)."""
    if rec["codec"] == "rotated":
        x = jnp.asarray(files[rec["tensor"]], jnp.float32)
        for q in _rotations(rec["rotation"], arrays or {}):
            x = x @ q
        return x
    w = jnp.asarray(files["embed"], jnp.float32).T * jnp.asarray(files["final_norm"], jnp.float32)[:, None]
    if rec["rotation"] is not None:
        for q in _rotations(rec["rotation"], arrays or {}):
            w = q.T @ w
    s = jnp.asarray(step)
    return gptq.rtn(w, s, int(rec["bits"])).astype(jnp.float32) * s


@jax.jit
def _dequantize(codes_i8: jax.Array, step: jax.Array) -> jax.Array:
    """`codes.astype(float32) * step` (one rounding: the same bits as numpy's, on all cores)."""
    return codes_i8.astype(jnp.float32) * step[..., None, :]


class _Writer:
    """Lays arrays out in arrays.bin: `add` returns the buffer record meta.json keeps."""

    def __init__(self):
        self.arrays: list[np.ndarray] = []
        self.size = 0

    def add(self, a: np.ndarray) -> dict:
        a = np.require(a, requirements="C")  # (np.ascontiguousarray makes a 0-d array 1-d)
        if a.dtype.kind not in "fiub" or a.dtype.byteorder == ">":
            raise TypeError(f"cannot store an array of dtype {a.dtype}")
        rec = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": self.size, "nbytes": a.nbytes}
        self.arrays.append(a)
        self.size += -(-a.nbytes // ALIGN) * ALIGN
        return rec


def _encode_plain(a: np.ndarray) -> list[tuple[dict, list[np.ndarray]]]:
    """Exact forms of `a` on its own: as it is, and (a float32 table) on a Q8_0 block grid."""
    forms = [({"codec": "raw"}, [a])]
    if a.dtype == np.float32 and a.ndim >= 1 and a.shape[-1] % BLOCK == 0 and a.size >= 64 * BLOCK:
        blocks = a.reshape(*a.shape[:-1], -1, BLOCK)
        with np.errstate(all="ignore"):
            s = (np.max(np.abs(blocks), axis=-1) / np.float32(127)).astype(np.float32)
        codes = _grid_codes(blocks, s[..., None])
        if codes is not None:
            s16 = s.astype(np.float16)
            forms.append(({"codec": "block", "shape": list(a.shape)},
                          [codes.reshape(a.shape), s16 if _same(s16.astype(np.float32), s) else s]))
    return forms


def _encode_leaf(path: Path_, a: np.ndarray, siblings: dict, derived: dict,
                 files: dict[str, np.ndarray],
                 arrays: dict[str, np.ndarray] | None = None) -> tuple[dict, list[np.ndarray]]:
    """The smallest exact form of one parameter: (record without buffers, arrays). A leaf of
    `derived` (path -> a `_derive` record) that recomputes bit for bit from `files` is stored as
    that record alone, with the SHA-256 its recomputation must match."""
    if path in derived:
        rec = derived[path]
        got = np.asarray(_derive(rec, files, siblings.get("s_w"), arrays))
        if _same(got, a):
            return {**rec, "sha256": hashlib.sha256(_bits(a)).hexdigest()}, []
    forms = _encode_plain(a)
    step = siblings.get("s_w")
    if path[-1] == "w" and a.dtype == np.float32 and a.ndim >= 2 and step is not None \
            and step.dtype == np.float32 and step.shape == a.shape[:-2] + a.shape[-1:]:
        codes = _grid_codes(a, step[..., None, :])
        if codes is not None:
            bits = 4 if codes.min(initial=0) >= -8 and codes.max(initial=0) <= 7 else 8
            rec = {"codec": "grid", "bits": bits, "shape": list(a.shape), "step": list(path[:-1]) + ["s_w"]}
            forms.append((rec, [_pack4(codes) if bits == 4 else codes]))
            if bits == 8 and codes.ndim >= 3:  # a stack of layers of several widths: each at its own
                per = [4 if c.min(initial=0) >= -8 and c.max(initial=0) <= 7 else 8 for c in codes]
                if 4 in per:
                    forms.append(({**rec, "bits": per}, [np.concatenate(
                        [_pack4(c) if b == 4 else c.reshape(-1).view(np.uint8) for c, b in zip(codes, per)])]))
    return min(forms, key=lambda f: sum(x.nbytes for x in f[1]))  # ties: the first, as it is


def _decode_plain(rec: dict, arrays: list[np.ndarray]) -> np.ndarray:
    if rec["codec"] == "raw":
        return arrays[0]
    codes, s = arrays
    shape = tuple(rec["shape"])
    blocks = codes.reshape(*shape[:-1], -1, BLOCK).astype(np.float32) * s.astype(np.float32)[..., None]
    return blocks.reshape(shape)


def _leaves(tree: dict, prefix: Path_ = ()) -> Iterator[tuple[Path_, dict, object]]:
    """(path, the dict holding it, value) of every leaf of a tree of dicts."""
    for k, v in tree.items():
        if not isinstance(k, str):
            raise TypeError(f"parameter keys must be strings, got {k!r}")
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), tree, v


def _get(tree: dict, path: Path_):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree: dict, path: Path_, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _canonical(meta: dict) -> bytes:
    return json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True,
                      separators=(",", ":")).encode()


# --- writing and reading an entry ---------------------------------------------------------------------

def _tmp_dir(root: Path) -> Path:
    """A new temporary folder in `root`, named by this host and process (see `_stale`)."""
    return Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-", dir=root))


def write_entry(d: Path, cfg: ModelConfig, params: llama.Params, inputs: dict,
                derived: dict[Path_, dict] | None = None, files: dict[str, np.ndarray] | None = None,
                arrays: dict[str, np.ndarray] | None = None) -> dict:
    """Write the entry `d` whole or not at all; returns its meta. `derived`: path -> a `_derive`
    record for a leaf that may be stored as its recomputation from the model file's tensors
    `files` (the entry's inputs name the file by its SHA-256) and the entry's named `arrays`
    (a learned rotation; stored as they are). Raises OSError (disk full, not writable) with
    nothing left behind."""
    writer, records = _Writer(), []
    arrays = {k: np.asarray(v) for k, v in (arrays or {}).items()}
    named = {k: writer.add(v) for k, v in arrays.items()}
    numpy_tree: dict = {}
    for path, _, x in _leaves(params):
        _set(numpy_tree, path, np.asarray(x))
    for path, parent, a in _leaves(numpy_tree):
        rec, bufs = _encode_leaf(path, a, parent, derived or {}, files or {}, arrays)
        rec = {"path": list(path), **rec}
        if rec["codec"] not in DERIVED:
            rec["buffers"] = [writer.add(x) for x in bufs]
        records.append(rec)
    meta = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "inputs": inputs,
            "model_config": dataclasses.asdict(cfg), "jax": jax.__version__, "leaves": records, "bytes": writer.size}
    if named:
        meta["arrays"] = named
    h = hashlib.sha256(_canonical(meta) + b"\0")
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_dir(d.parent)
    try:
        with open(tmp / ARRAYS, "wb") as f:
            for a in writer.arrays:
                pad = bytes(-a.nbytes % ALIGN)
                for chunk in (memoryview(_bits(a)), pad):
                    h.update(chunk)
                    f.write(chunk)
        meta["sha256"] = h.hexdigest()
        (tmp / META).write_text(json.dumps(meta, indent=1))
        _install(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once installed
    return meta


def _install(tmp: Path, d: Path) -> None:
    """Rename `tmp` to `d`; an existing `d` is first renamed aside, so `d` is never half removed."""
    aside = None
    if d.exists():
        aside = _tmp_dir(d.parent)
        os.replace(d, aside)
    try:
        os.replace(tmp, d)
    finally:
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _discard(p: Path) -> None:
    """Remove an entry: renamed to a temporary name first, so an interrupted removal leaves no
    half entry (the next sweep finishes it)."""
    try:
        if p.is_dir() and not p.is_symlink():
            aside = _tmp_dir(p.parent)
            os.replace(p, aside)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        shutil.rmtree(p, ignore_errors=True)


def _buffer(blob: bytes, spec: dict) -> np.ndarray:
    dt = np.dtype(spec["dtype"])
    shape = tuple(int(n) for n in spec["shape"])
    off, nbytes = int(spec["offset"]), int(spec["nbytes"])
    if dt.kind not in "fiub" or nbytes != math.prod(shape) * dt.itemsize or off < 0 or off + nbytes > len(blob):
        raise DamagedEntry(f"an array record ({spec}) does not fit {ARRAYS}")
    return np.frombuffer(blob, dt, count=math.prod(shape), offset=off).reshape(shape)


def read_entry(d: Path, inputs: dict | None = None,
               files: Callable[[tuple[str, ...]], dict[str, np.ndarray]] | None = None
               ) -> tuple[ModelConfig, llama.Params, dict]:
    """(config, parameters, meta) of the entry `d`, verified: DamagedEntry (with the reason) for
    anything but the exact bytes written (and, given `inputs`, an entry made for other inputs).
    `files(names)` reads the model file's tensors that derived leaves are recomputed from."""
    try:
        return _read_entry(d, inputs, files)
    except (DamagedEntry, MemoryError):
        raise
    except FileNotFoundError as e:
        raise DamagedEntry(f"{Path(e.filename).name if e.filename else 'a file'} is missing") from e
    except json.JSONDecodeError as e:
        raise DamagedEntry(f"{META} is not valid JSON ({e})") from e
    except Exception as e:  # noqa: BLE001 - whatever a damaged entry raises, it is rebuilt, never a traceback
        raise DamagedEntry(f"{type(e).__name__}: {e}"[:200]) from e


def _read_entry(d: Path, inputs: dict | None, files) -> tuple[ModelConfig, llama.Params, dict]:
    meta = json.loads((d / META).read_bytes())
    if not isinstance(meta, dict):
        raise DamagedEntry(f"{META} is not an object")
    if meta.get("format") != FORMAT:
        raise DamagedEntry(f"its format is {meta.get('format')!r}, not {FORMAT!r}")
    with open(d / ARRAYS, "rb") as f:
        blob = f.read()
    if len(blob) != meta["bytes"]:
        raise DamagedEntry(f"{ARRAYS} has {len(blob)} bytes, not {meta['bytes']}")
    h = hashlib.sha256(_canonical(meta) + b"\0")
    h.update(blob)
    if h.hexdigest() != meta["sha256"]:
        raise DamagedEntry("its contents do not match their SHA-256")
    if inputs is not None and meta["inputs"] != json.loads(json.dumps(inputs)):
        raise DamagedEntry("it was made for other inputs")
    cfg = ModelConfig(**meta["model_config"])
    tree: dict = {}
    grid, derived = [], []
    for rec in meta["leaves"]:
        path = tuple(rec["path"])
        if rec["codec"] == "grid":
            grid.append(rec)
        elif rec["codec"] in DERIVED:
            derived.append(rec)
        else:
            _set(tree, path, _decode_plain(rec, [_buffer(blob, b) for b in rec["buffers"]]))
    if derived:
        if files is None:
            raise DamagedEntry("its derived leaves need the model file, which was not given")
        tensors = files(FILE_TENSORS)
        named = {k: _buffer(blob, b) for k, b in meta.get("arrays", {}).items()}
        for rec in derived:  # dispatched now, runs while the codes are decoded
            step = np.asarray(_get(tree, tuple(rec["path"][:-1]) + ("s_w",))) if rec["codec"] == "head" else None
            _set(tree, tuple(rec["path"]), _derive(rec, tensors, step, named))
    for rec in grid:  # after their steps
        step = np.asarray(_get(tree, tuple(rec["step"])))
        shape = tuple(rec["shape"])
        if step.shape != shape[:-2] + shape[-1:]:
            raise DamagedEntry(f"the steps of {'.'.join(rec['path'])} do not fit its shape")
        data = _buffer(blob, rec["buffers"][0])
        codes = _grid_decode(data, rec["bits"], shape)
        _set(tree, tuple(rec["path"]), _dequantize(jax.device_put(codes), jax.device_put(step)))  # as written
    for rec in derived:
        if hashlib.sha256(_bits(np.asarray(_get(tree, tuple(rec["path"]))))).hexdigest() != rec["sha256"]:
            raise DamagedEntry(f"its {'.'.join(rec['path'])} does not recompute bit for bit with this JAX "
                               f"({jax.__version__}; the entry was made with {meta.get('jax')})")
    # device_put, not jnp.asarray: the latter compiles a conversion per shape (~0.5 s here)
    return cfg, jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x), tree), meta


# --- the cache folder ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    """One item of the cache folder, as `np-jax cache` lists it (meta.json read, not verified)."""

    key: str
    path: Path
    bytes: int
    status: str  # "current", "older format", "newer format", "unreadable", "unfinished"
    created: str | None = None
    model: str | None = None
    precision: str | None = None
    recipe: str | None = None
    used: float | None = None  # when it was last written or read (the folder's mtime, `_touch`), Unix time

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "path": str(self.path)}


def _touch(d: Path) -> None:
    """Mark the entry `d` as used now (its folder's mtime), before it is read: so a concurrent
    `_trim` takes it for the newest. A read-only cache is read all the same."""
    try:
        os.utime(d)
    except OSError:
        pass


def _size(p: Path) -> int:
    if not p.is_dir():
        return p.lstat().st_size if p.exists() or p.is_symlink() else 0
    return sum(f.lstat().st_size for f in p.rglob("*") if not f.is_dir())


def _format_version(fmt) -> int | None:
    m = re.fullmatch(r"np_jax\.prepared/(\d+)", fmt) if isinstance(fmt, str) else None
    return int(m.group(1)) if m else None


def _stale(p: Path) -> bool:
    """A temporary folder left by a killed run: its process (on this host) is gone, or it is old."""
    host, _, rest = p.name[len(TMP_PREFIX):].rpartition("-")[0].rpartition("-")
    try:
        if time.time() - p.lstat().st_mtime > STALE_TMP_S:
            return True
        if host == socket.gethostname():
            os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError):
        pass
    return False


def entries(root: Path | None = None) -> list[Entry]:
    """Every item of the cache folder, oldest first."""
    root = cache_root() if root is None else root
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        size = _size(p)
        try:
            used = p.lstat().st_mtime
        except OSError:
            continue  # removed meanwhile (a concurrent `_trim` or `np-jax cache clear`)
        if p.name.startswith(TMP_PREFIX):
            out.append(Entry(p.name, p, size, "unfinished"))
            continue
        try:
            meta = json.loads((p / META).read_bytes())
            inputs = meta.get("inputs", {})
            version = _format_version(meta.get("format"))
            status = ("current" if version == FORMAT_VERSION else "older format" if version and version < FORMAT_VERSION
                      else "newer format" if version else "unreadable")
            recipe = inputs.get("recipe")
            out.append(Entry(p.name, p, size, status, meta.get("created"), inputs.get("model"),
                             inputs.get("precision"), recipe.get("name") if isinstance(recipe, dict) else None, used))
        except (OSError, ValueError, AttributeError):
            out.append(Entry(p.name, p, size, "unreadable"))
    return sorted(out, key=lambda e: (e.created or "", e.key))


def remove(items: list[Entry]) -> int:
    """Remove cache items; returns the bytes freed."""
    for e in items:
        _discard(e.path)
    return sum(e.bytes for e in items)


def _sweep(root: Path, log: Log) -> None:
    """Remove entries of an older format and temporary folders a killed run left behind."""
    old = [e for e in entries(root) if e.status == "older format"
           or (e.status == "unfinished" and _stale(e.path))]
    if old:
        n_old = sum(e.status == "older format" for e in old)
        freed = remove(old)
        log(f"removed {n_old} prepared-model cache entr{'y' if n_old == 1 else 'ies'} of an older format and "
            f"{len(old) - n_old} unfinished one(s) from {root} ({freed / 1e6:.0f} MB)")


def _trim(root: Path, limit: int | None, keep: Path, log: Log) -> None:
    """Remove the least recently used entries of this format until they fit in `limit` bytes
    together; never `keep` (the entry just written, which may exceed the bound alone). Entries of
    other formats and unfinished folders are not counted (`_sweep` handles them)."""
    if limit is None:
        return
    current = sorted((e for e in entries(root) if e.status == "current"), key=lambda e: (e.used or 0.0, e.key))
    total = sum(e.bytes for e in current)
    gone = []
    for e in current:
        if total <= limit:
            break
        if e.path != keep:
            gone.append(e)
            total -= e.bytes
    if gone:
        freed = remove(gone)
        log(f"removed {len(gone)} least recently used prepared-model cache entr{'y' if len(gone) == 1 else 'ies'} "
            f"({freed / 1e6:.0f} MB) to keep {root} under {limit / 1e9:.2f} GB ({LIMIT_ENV})")
    if total > limit:
        log(f"warning: the prepared-model cache entry {keep} alone exceeds the {limit / 1e9:.2f} GB bound "
            f"({LIMIT_ENV}); it is kept")


def _unwritable(root: Path, cfg: ModelConfig) -> str | None:
    """Why an entry for `cfg` cannot be written in `root` (None if it can), found before preparing."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        os.rmdir(_tmp_dir(root))
        need = cfg.n_layers * cfg.layer_params() + 2 * cfg.vocab_size * cfg.d_model  # INT8 codes: an upper bound
        free = shutil.disk_usage(root).free
    except OSError as e:
        return str(e)
    return None if free >= need else f"{free / 1e6:.0f} MB free, an entry needs up to {need / 1e6:.0f} MB"


# --- preparing ----------------------------------------------------------------------------------------

def read_cached(model: Model, recipe: str | recipes.Recipe, policy: str, *, data: DataConfig = DataConfig(),
                seed: int = 0) -> tuple[ModelConfig, llama.Params, float] | None:
    """(config, parameters, seconds) of `prepare`'s verified cache entry, or None (no entry, a damaged
    one, or nothing to cache): quiet, and changes nothing but the entry's time of use, so that it can
    run ahead of `prepare` in another thread (`prepare(..., cached=...)` takes its result)."""
    recipe = recipes.get_recipe(recipe)
    if model.sha256 is None or get_policy(policy).is_float:
        return None
    key, inputs = cache_key(model, recipe, policy, data, seed)
    d = cache_root() / key
    if not d.is_dir():
        return None
    _touch(d)
    t0 = time.perf_counter()
    try:
        cfg, params, _ = read_entry(d, inputs, model.file_tensors)
    except (DamagedEntry, MemoryError):
        return None
    return cfg, params, time.perf_counter() - t0


def prepare(model: Model, recipe: str | recipes.Recipe, policy: str, *, data: DataConfig = DataConfig(),
            seed: int = 0, log: Log | None = None, use_cache: bool = True,
            cached: tuple[ModelConfig, llama.Params, float] | None = None) -> tuple[ModelConfig, llama.Params, dict]:
    """(config, parameters, info) of `model` prepared by `recipe` at `policy`, calibrated on the
    first windows of `data`'s training split in the order of `seed`; from the cache when a verified
    entry exists (info["cached"]), else made and stored. Models without a file hash (random init,
    checkpoints) are prepared and not cached; at a float policy the model is its own prepared form.
    A cache hit never reads `model.params` (a lazy GGUF model's tensors stay on disk). `log`: each
    step's line and the preparation's progress (none if None). `cached`: `read_cached`'s result for
    the same arguments, read ahead (None: read here)."""
    progress_log, log = log, log or (lambda m: None)
    recipe = recipes.get_recipe(recipe)
    get_policy(policy).check_vmm_operands(model.cfg.n_layers)  # a policy the chip cannot run: before any work
    key, inputs = cache_key(model, recipe, policy, data, seed)
    root = cache_root()
    d = root / key
    info = {"recipe": recipe.name, "calibration": inputs["calibration"], "steps": recipe.steps(policy, model.cfg.n_layers), "cache": str(d),
            "cached": False}
    if get_policy(policy).is_float:  # recipes.apply is the identity there: nothing to store
        return model.cfg, model.params, info | {"cache": None}
    cacheable = use_cache and model.sha256 is not None
    if cacheable:
        limit = cache_limit()  # a bad NP_JAX_CACHE_MAX is refused now, not after the preparation
        _sweep(root, log)
        if cached is not None:
            log(f"prepared model from the cache {d} in {cached[2]:.1f} s")
            return cached[0], cached[1], info | {"cached": True}
        if d.exists() or d.is_symlink():
            _touch(d)
            t0 = time.perf_counter()
            try:
                cfg, params, _ = read_entry(d, inputs, model.file_tensors)
                log(f"prepared model from the cache {d} in {time.perf_counter() - t0:.1f} s")
                return cfg, params, info | {"cached": True}
            except DamagedEntry as e:
                log(f"the prepared-model cache entry {d} is damaged ({e}); rebuilding it")
                _discard(d)
        why = _unwritable(root, model.cfg)
        if why is not None:  # said now, not after minutes of preparation
            log(f"warning: cannot write the prepared-model cache in {root} ({why}): the model is prepared but not "
                "cached; set NP_JAX_CACHE to a writable folder to keep it")
            cacheable = False
    t0 = time.perf_counter()
    log(f"preparing {model.cfg.name} for {get_policy(policy).name} with recipe {recipe.name} ({', '.join(recipe.steps(policy, model.cfg.n_layers))}); "
        + ("this runs once and is cached" if cacheable else "not cached"))
    windows = calibration_windows(model, recipe.calib_windows, data, seed)
    learned: dict = {}
    cfg, params = recipes.apply(model.params, model.cfg, recipe, policy, windows, progress_log, learned=learned)
    info["prepare_s"] = time.perf_counter() - t0
    if cacheable:
        rotation = {"hadamard": model.cfg.d_model, "seed": recipe.seed} if recipe.rotate_residual else None
        arrays = {k: np.asarray(v, np.float32) for k, v in learned.items()}  # the learned rotation R, if any
        if arrays:  # the embedding and the output layer are recomputed through Q, then R
            rotation["learned"] = "residual_rotation"
        head = get_policy(policy).output("w")
        derived: dict[Path_, dict] = {} if head.is_float else {
            ("lm_head", "w"): {"codec": "head", "rotation": rotation, "bits": head.bits}}
        if rotation is not None:  # the embedding is the model file's table times the rotation
            derived[("embed",)] = {"codec": "rotated", "tensor": "embed", "rotation": rotation}
        try:
            meta = write_entry(d, cfg, params, inputs, derived, model.file_tensors(FILE_TENSORS), arrays)
            as_is = [".".join(r["path"]) for r in meta["leaves"] if r["codec"] == "raw"
                     and sum(b["nbytes"] for b in r["buffers"]) > 1 << 20]
            log(f"cached the prepared model in {d} ({meta['bytes'] / 1e6:.0f} MB"
                + (f"; kept as they are: {', '.join(as_is)}" if as_is else "") + ")")
            _trim(root, limit, d, log)
        except (OSError, TypeError) as e:
            log(f"warning: could not cache the prepared model in {d}: {e}")
    return cfg, params, info
