"""Byte-level BPE tokenizer (GPT-2 family, e.g. SmolLM2) rebuilt from GGUF metadata.

The GGUF file stores the vocabulary (``tokenizer.ggml.tokens``), the BPE merges
(``"left right"`` strings, highest priority first), per-token types and the name of
the pre-tokenizer (``tokenizer.ggml.pre``).  We rebuild an equivalent Hugging Face
``tokenizers.Tokenizer`` from them; for SmolLM2 this reproduces llama.cpp's token ids
and round-trips exactly any text whose UTF-8 bytes all have a token (SmolLM2 lacks 21
byte tokens; see :attr:`Tokenizer.missing_bytes`).

Chat formatting implements ChatML (``<|im_start|>role\\ncontent<|im_end|>\\n``), the
format SmolLM2's embedded Jinja template produces, including that template's default
system prompt; we do not evaluate Jinja.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Mapping, Sequence

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from models.io.gguf import GGUFTokenizerData, read_gguf_tokenizer_data

__all__ = ["BYTE_TO_UNICODE", "Tokenizer", "build_tokenizer", "chatml_default_system_prompt"]

# llama.cpp token types (gguf.constants.TokenType).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# llama.cpp pre-tokenizer names whose regex is "\p{N}" (each digit alone) followed by
# the GPT-2 regex; HF expresses that as Digits(individual) + ByteLevel(use_regex).
_PRE_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"})
# Names that are the plain GPT-2 regex.
_PRE_GPT2 = frozenset({"gpt2", "default"})

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"

# Matches the default-system-prompt branch of SmolLM2-style ChatML templates:
# {% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n...<|im_end|>\n' }}{% endif %}
_DEFAULT_SYSTEM_RE = re.compile(
    r"\{%-?\s*if\s+loop\.first\s+and\s+messages\[0\]\['role'\]\s*!=\s*'system'\s*-?%\}"
    r"\s*\{\{-?\s*'<\|im_start\|>system\n([^'\\]*)<\|im_end\|>\n'\s*-?\}\}",
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from each byte to a printable character (the byte-level alphabet).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to U+0100.. in order
    (so space 0x20 -> "Ġ", newline 0x0A -> "Ċ").
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return dict(sorted(mapping.items()))


BYTE_TO_UNICODE: dict[int, str] = _bytes_to_unicode()


def build_tokenizer(
    tokens: Sequence[str],
    merges: Sequence[str],
    token_types: Sequence[int] | None = None,
    *,
    pre: str | None = "smollm",
) -> tokenizers.Tokenizer:
    """Build a byte-level BPE ``tokenizers.Tokenizer`` from GGUF-style vocabulary data.

    Args:
        tokens: token strings in byte-level alphabet (``Ġ`` = space); index = id.
        merges: BPE merges as ``"left right"`` strings, highest priority first.
        token_types: llama.cpp token type per id; CONTROL (3) tokens become special
            tokens (never split, skippable on decode), USER_DEFINED (4) become added
            tokens (never split).  None: all normal.
        pre: llama.cpp pre-tokenizer name (``tokenizer.ggml.pre``); ``"smollm"`` and
            its aliases split every digit separately, ``"gpt2"``/``"default"``/None use
            the plain GPT-2 regex.

    Raises:
        ValueError: duplicate tokens, malformed merges, mismatched lengths, or an
            unsupported pre-tokenizer.
    """
    if token_types is not None and len(token_types) != len(tokens):
        raise ValueError(f"{len(token_types)} token types for {len(tokens)} tokens")
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise ValueError(f"duplicate token {tok!r} at ids {vocab[tok]} and {i}")
        vocab[tok] = i
    merge_pairs: list[tuple[str, str]] = []
    for m in merges:
        parts = m.split(" ")
        # Byte-level tokens never contain a literal space (it is mapped to "Ġ").
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"malformed merge {m!r} (expected 'left right')")
        # tokenizers would raise a bare Exception (or panic) on these; say which merge is wrong
        for side in parts:
            if side not in vocab:
                raise ValueError(f"merge {m!r}: token {side!r} is not in the vocabulary")
        if parts[0] + parts[1] not in vocab:
            raise ValueError(f"merge {m!r}: its result {parts[0] + parts[1]!r} is not in the vocabulary")
        merge_pairs.append((parts[0], parts[1]))

    try:
        bpe = models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False)
    except BaseException as e:  # a Rust panic is a BaseException (pyo3_runtime.PanicException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise ValueError(f"the tokenizer vocabulary is invalid: {' '.join(str(e).split())[:200]}") from None
    tok = tokenizers.Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_DIGITS_THEN_GPT2:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre is None or pre in _PRE_GPT2:
        tok.pre_tokenizer = byte_level
    else:
        raise ValueError(f"unsupported pre-tokenizer {pre!r}")
    tok.decoder = decoders.ByteLevel()

    if token_types is not None:
        special = [t for t, ty in zip(tokens, token_types) if ty == _TOKEN_TYPE_CONTROL]
        user = [t for t, ty in zip(tokens, token_types) if ty == _TOKEN_TYPE_USER_DEFINED]
        # normalized=False: match the literal text; the tokens already exist in the
        # vocabulary, so their ids are kept.
        if special:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        if user:
            tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tok


def chatml_default_system_prompt(template: str | None) -> str | None:
    """The default system prompt a SmolLM2-style ChatML Jinja template inserts, if any.

    Such templates emit ``<|im_start|>system\\n{prompt}<|im_end|>\\n`` before the first
    message when that message is not a system message.
    """
    if not template:
        return None
    m = _DEFAULT_SYSTEM_RE.search(template)
    return m.group(1) if m else None


class Tokenizer:
    """Text <-> token ids for a GGUF byte-level BPE model, plus ChatML formatting.

    ``encode`` recognises special-token text (e.g. ``<|im_start|>``) as single ids, as
    needed for chat prompts.

    A vocabulary may lack tokens for some bytes (SmolLM2 lacks 21: six ASCII control
    characters such as U+0004, the never-valid UTF-8 bytes C0, C1, F5-FF, and the lead
    bytes F1, F2 of the unassigned planes U+40000-U+BFFFF).  Such bytes cannot be
    encoded; like llama.cpp and HF, ``encode`` silently drops them unless ``strict=True``.
    See :attr:`missing_bytes`.
    """

    def __init__(
        self,
        hf_tokenizer: tokenizers.Tokenizer,
        *,
        bos_id: int | None,
        eos_id: int | None,
        chat_template: str | None = None,
    ):
        """Wrap a built ``tokenizers.Tokenizer``; ids must be inside its vocabulary."""
        self._tok = hf_tokenizer
        n = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        for label, tid in (("bos", bos_id), ("eos", eos_id)):
            if tid is not None and not 0 <= tid < n:
                raise ValueError(f"{label} id {tid} outside vocabulary of {n}")
        self._bos_id = bos_id
        self._eos_id = eos_id
        self.chat_template = chat_template
        self.default_system_prompt = chatml_default_system_prompt(chat_template)
        # Ids that end a generation: the declared EOS plus ChatML's end markers.
        stop = {eos_id} if eos_id is not None else set()
        for text in (IM_END, END_OF_TEXT):
            tid = hf_tokenizer.token_to_id(text)
            if tid is not None:
                stop.add(tid)
        self._eos_ids = frozenset(stop)
        self._missing_bytes = frozenset(
            b for b, ch in BYTE_TO_UNICODE.items() if hf_tokenizer.token_to_id(ch) is None
        )

    @classmethod
    def from_tokenizer_data(cls, data: GGUFTokenizerData) -> "Tokenizer":
        """Build from :class:`GGUFTokenizerData` (e.g. ``read_gguf(path).tokenizer``)."""
        if data.model != "gpt2":
            raise ValueError(f"unsupported tokenizer model {data.model!r} (only byte-level BPE 'gpt2')")
        hf = build_tokenizer(data.tokens, data.merges, data.token_types, pre=data.pre)
        return cls(hf, bos_id=data.bos_id, eos_id=data.eos_id, chat_template=data.chat_template)

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> "Tokenizer":
        """Build from a GGUF file, reading only its metadata (~0.1 s + ~1 s to build for SmolLM2)."""
        return cls.from_tokenizer_data(read_gguf_tokenizer_data(path))

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        """The underlying Hugging Face tokenizer."""
        return self._tok

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence id (SmolLM2: 1, ``<|im_start|>``)."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """Declared end-of-sequence id (SmolLM2: 2, ``<|im_end|>``)."""
        return self._eos_id

    @property
    def eos_ids(self) -> frozenset[int]:
        """Ids that should stop generation: eos, ``<|im_end|>`` and ``<|endoftext|>`` if present."""
        return self._eos_ids

    @property
    def missing_bytes(self) -> frozenset[int]:
        """Byte values that have no token, so text containing them cannot round-trip."""
        return self._missing_bytes

    def unencodable_chars(self, text: str) -> set[str]:
        """Characters of ``text`` whose UTF-8 bytes include a :attr:`missing_bytes` value."""
        if not self._missing_bytes:
            return set()
        return {c for c in set(text) if not self._missing_bytes.isdisjoint(c.encode("utf-8", "surrogatepass"))}

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary string (byte-level alphabet), or None."""
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Vocabulary string of an id (byte-level alphabet), or None."""
        return self._tok.id_to_token(token_id)

    def encode(self, text: str, *, add_bos: bool = False, strict: bool = False) -> list[int]:
        """Token ids of ``text``; special-token text becomes single ids.

        Args:
            text: input text.
            add_bos: prepend ``bos_id`` (SmolLM2's metadata says not to by default).
            strict: raise ValueError if ``text`` has characters the vocabulary cannot
                represent (see :attr:`missing_bytes`) instead of dropping their bytes.
        """
        if strict:
            bad = self.unencodable_chars(text)
            if bad:
                raise ValueError(f"characters not representable by this vocabulary: {sorted(bad)!r}")
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos:
            if self._bos_id is None:
                raise ValueError("this tokenizer has no BOS token")
            ids = [self._bos_id, *ids]
        return ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; special tokens are kept as text unless ``skip_special_tokens``."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """Format a conversation as ChatML text (encode it with :meth:`encode`).

        Each message becomes ``<|im_start|>{role}\\n{content}<|im_end|>\\n``.  If the
        model's template has a default system prompt and the first message is not a
        system message, that prompt is inserted first (as SmolLM2's template does).

        Args:
            messages: dicts with string ``role`` and ``content``.
            add_generation_prompt: append ``<|im_start|>assistant\\n`` so the model answers.

        Raises:
            ValueError: malformed messages, or the model's template is not ChatML.
        """
        if self.chat_template is not None and IM_START not in self.chat_template:
            raise ValueError("the model's chat template is not ChatML; only ChatML is implemented")
        for special in (IM_START, IM_END):
            if self._tok.token_to_id(special) is None:
                raise ValueError(f"vocabulary has no {special} token; cannot format ChatML")
        parts: list[str] = []
        for i, msg in enumerate(messages):
            role, content = msg.get("role"), msg.get("content")
            if not isinstance(role, str) or not isinstance(content, str):
                raise ValueError(f"message {i} needs string 'role' and 'content', got {msg!r}")
            if i == 0 and role != "system" and self.default_system_prompt is not None:
                parts.append(f"{IM_START}system\n{self.default_system_prompt}{IM_END}\n")
            parts.append(f"{IM_START}{role}\n{content}{IM_END}\n")
        if add_generation_prompt:
            parts.append(f"{IM_START}assistant\n")
        return "".join(parts)
