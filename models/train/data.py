"""Training and held-out data: Python source files, tokenized and packed into fixed windows.

Corpus: every `.py` file under the given directories (default: the running interpreter's
standard library, present on every machine), skipping `site-packages`, `dist-packages`,
`__pycache__` and hidden directories. Files are listed in sorted order of their path
relative to their directory.

Split (by file, deterministic): a file is held out when
`sha256(f"{split_seed}/{relative path}")`, read as a fraction of 2^64, is below
`held_out_fraction`. The decision depends only on the file's own relative path and the seed,
so adding or removing other files never moves a file between the sets.

Packing: files are tokenized one by one, each followed by a document separator token, and
concatenated into one stream. A window is `seq_len + 1` consecutive tokens (inputs are the
first `seq_len`, targets the last `seq_len`); window `w` starts at token `w * seq_len`.

Training order (deterministic from `seed` and the step index alone): the training stream is
infinite: epoch `e` packs all training files in the order of a permutation drawn from
`numpy.random.default_rng([seed, e])`. Windows are then shuffled within blocks of
`shuffle_block` windows (block `k` uses the permutation `default_rng([seed, 2**31 + k])`),
and step `i` with `grad_accum` micro-batches of `batch_size` rows reads shuffled windows
`i * A * B ... (i + 1) * A * B - 1` as an `[A, B, seq_len + 1]` array. Any step can be
rebuilt without replaying the previous ones (the stream is tokenized lazily up to the block
it needs), which is what makes resumption after an interruption exact.

Held-out windows: the held-out files in the order of their split hash, each contributing at
most `tokens_per_file` tokens (plus its separator), packed and cut into non-overlapping
windows; the first `n_windows` are used.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from models.io.encoders import ByteEncoder, Encoder, TokenizerEncoder  # noqa: F401 (re-exported)

SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
STDLIB = "stdlib"


@dataclass(frozen=True)
class DataConfig:
    """Where the corpus comes from and how it is split.

    dirs: directories searched for `.py` files; empty means the standard library.
    held_out_fraction: expected fraction of files held out (0 < f < 1).
    split_seed: seed of the file split (independent of the training order seed).
    """

    dirs: tuple[str, ...] = ()
    held_out_fraction: float = 0.05
    split_seed: int = 0

    def __post_init__(self):
        if not 0.0 < self.held_out_fraction < 1.0:
            raise ValueError(f"held-out fraction must be in (0, 1), got {self.held_out_fraction}")

    def describe(self) -> dict:
        return {"dirs": list(self.dirs) or [STDLIB], "held_out_fraction": self.held_out_fraction,
                "split_seed": self.split_seed}


@dataclass(frozen=True)
class SourceFile:
    """One corpus file: `rel` (posix path relative to its directory) names it in the split."""

    rel: str
    path: Path


def stdlib_dir() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(dirs: Sequence[str | os.PathLike] = ()) -> list[SourceFile]:
    """Every `.py` file under `dirs` (default: the standard library), sorted by relative path.

    Raises OSError for a missing directory and ValueError when no `.py` file is found.
    """
    roots = [Path(d).expanduser() for d in dirs] if dirs else [stdlib_dir()]
    out: list[SourceFile] = []
    for root in roots:
        if not root.is_dir():
            raise OSError(f"data directory {str(root)!r} does not exist or is not a directory")
        for cur, subdirs, files in os.walk(root):
            subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS and not d.startswith("."))
            for f in files:
                if f.endswith(".py"):
                    p = Path(cur) / f
                    out.append(SourceFile(p.relative_to(root).as_posix(), p))
    if not out:
        raise ValueError(f"no .py files under {', '.join(map(str, roots))}")
    out.sort(key=lambda s: (s.rel, str(s.path)))
    return out


def split_hash(rel: str, split_seed: int) -> float:
    """The file's position in [0, 1) for the split (and the held-out order)."""
    h = hashlib.sha256(f"{split_seed}/{rel}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def split_files(files: Sequence[SourceFile], held_out_fraction: float, split_seed: int = 0
                ) -> tuple[list[SourceFile], list[SourceFile]]:
    """(train, held_out): held-out files in split-hash order, training files in listing order."""
    keyed = [(split_hash(f.rel, split_seed), f) for f in files]
    held = [f for h, f in sorted(keyed, key=lambda t: (t[0], t[1].rel)) if h < held_out_fraction]
    train = [f for h, f in keyed if h >= held_out_fraction]
    if not train or not held:
        raise ValueError(f"splitting {len(files)} files with held-out fraction {held_out_fraction} leaves "
                         f"{len(train)} for training and {len(held)} held out; both need at least one "
                         "(give more files or change --held-out-fraction)")
    return train, held


def read_source(path: Path) -> str:
    """A file's text (UTF-8; undecodable bytes become U+FFFD, so any file is usable)."""
    return path.read_bytes().decode("utf-8", "replace")


@dataclass
class Corpus:
    """The split corpus and its encoder; tokenizes files lazily and remembers them."""

    config: DataConfig
    encoder: Encoder
    train: list[SourceFile] = field(init=False)
    held_out: list[SourceFile] = field(init=False)

    def __post_init__(self):
        self.train, self.held_out = split_files(list_files(self.config.dirs), self.config.held_out_fraction,
                                                self.config.split_seed)
        self._cache: dict[Path, np.ndarray] = {}

    def tokens(self, f: SourceFile) -> np.ndarray:
        """Token ids of one file followed by the separator (int32)."""
        t = self._cache.get(f.path)
        if t is None:
            ids = self.encoder.encode(read_source(f.path))
            t = np.asarray(ids + [self.encoder.separator_id], np.int32)
            self._cache[f.path] = t
        return t

    def describe(self) -> dict:
        return {**self.config.describe(), "train_files": len(self.train), "held_out_files": len(self.held_out),
                "tokenizer": self.encoder.name}


class TrainStream:
    """The training batches: `batch(step)` is a pure function of (seed, step) and the settings."""

    def __init__(self, corpus: Corpus, seq_len: int, batch_size: int, grad_accum: int = 1, seed: int = 0,
                 shuffle_block: int = 256):
        for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("grad_accum", grad_accum),
                        ("shuffle_block", shuffle_block)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.corpus, self.L, self.B, self.A, self.seed = corpus, seq_len, batch_size, grad_accum, seed
        self.block = shuffle_block
        self._chunks: list[np.ndarray] = []  # the packed stream, file by file
        self._length = 0                     # tokens packed so far
        self._next = (0, 0)                  # (epoch, index in that epoch's order) of the next file
        self._orders: dict[int, np.ndarray] = {}
        self._flat = np.zeros(0, np.int32)

    @property
    def tokens_per_step(self) -> int:
        """Target tokens per optimizer step (A * B * L)."""
        return self.A * self.B * self.L

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.corpus.train))
        return self._orders[epoch]

    def _ensure(self, n_tokens: int) -> None:
        grew = False
        while self._length < n_tokens:
            epoch, i = self._next
            f = self.corpus.train[int(self._order(epoch)[i])]
            t = self.corpus.tokens(f)
            self._chunks.append(t)
            self._length += len(t)
            self._next = (epoch + 1, 0) if i + 1 == len(self.corpus.train) else (epoch, i + 1)
            grew = True
        if grew:
            self._flat = np.concatenate(self._chunks)
            self._chunks = [self._flat]

    def window(self, w: int) -> np.ndarray:
        """Shuffled window `w`: `seq_len + 1` tokens."""
        k, j = divmod(w, self.block)
        perm = np.random.default_rng([self.seed, 2**31 + k]).permutation(self.block)
        raw = k * self.block + int(perm[j])
        self._ensure((k + 1) * self.block * self.L + 1)
        return self._flat[raw * self.L: raw * self.L + self.L + 1]

    def batch(self, step: int) -> np.ndarray:
        """Step `step`'s tokens, int32 [grad_accum, batch_size, seq_len + 1]."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        n = self.A * self.B
        ws = [self.window(step * n + r) for r in range(n)]
        return np.stack(ws).reshape(self.A, self.B, self.L + 1)

    def calibration(self, n_windows: int) -> np.ndarray:
        """Windows for calibrating step sizes: the first `n_windows` of the shuffled training order, [n, L]."""
        return np.stack([self.window(w)[: self.L] for w in range(n_windows)])


def held_out_windows(corpus: Corpus, seq_len: int, n_windows: int, tokens_per_file: int = 512,
                     from_end: bool = False) -> np.ndarray:
    """The first `n_windows` held-out windows, int32 [n, seq_len + 1] (fewer if the set runs out).
    `from_end`: read the held-out files from the last one backwards (training's validation), so
    that these windows and evaluation's (from the first file on) share no file until together
    they need more tokens than the held-out files hold."""
    if seq_len < 1 or n_windows < 1 or tokens_per_file < 1:
        raise ValueError("seq_len, the number of windows and tokens per file must be >= 1")
    need = n_windows * seq_len + 1
    parts, total = [], 0
    for f in reversed(corpus.held_out) if from_end else corpus.held_out:
        t = corpus.tokens(f)
        if len(t) > tokens_per_file + 1:
            t = np.concatenate([t[:tokens_per_file], t[-1:]])  # keep the separator
        parts.append(t)
        total += len(t)
        if total >= need:
            break
    flat = np.concatenate(parts)
    n = min(n_windows, (len(flat) - 1) // seq_len)
    if n < 1:
        raise ValueError(f"the held-out files hold only {len(flat)} tokens, fewer than one window of {seq_len + 1}")
    return np.stack([flat[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])
