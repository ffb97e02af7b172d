"""Encoders: what the data pipeline and the generator need of a tokenizer.

`TokenizerEncoder` wraps a byte-level BPE tokenizer (models.io.tokenizer, e.g. SmolLM2's);
`ByteEncoder` uses UTF-8 bytes as token ids, for models without a tokenizer (random-init
configs such as `tiny`), so that their output is still text.
"""

from __future__ import annotations

from typing import Protocol, Sequence


def check_text(text: str, what: str = "text") -> str:
    """`text` when it is valid Unicode, else ValueError: a str holding lone surrogates (how Python
    carries command-line bytes that are not UTF-8) cannot be tokenized."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start:e.end].encode("utf-8", "surrogateescape")
        raise ValueError(f"{what} is not valid UTF-8 (byte 0x{raw[:1].hex()} at character {e.start}); "
                         "give it as UTF-8 text") from None
    return text


class Encoder(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str
    separator_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteEncoder:
    """UTF-8 bytes as token ids (for models without a tokenizer, e.g. random-init configs).

    Ids are 0..255; the document separator is 0 (the NUL byte, absent from source text).
    Needs a vocabulary of at least 256.
    """

    name = "bytes"
    separator_id = 0

    def __init__(self, vocab_size: int = 256):
        if vocab_size < 256:
            raise ValueError(f"byte tokens need a vocabulary of at least 256, got {vocab_size}")

    def encode(self, text: str) -> list[int]:
        return list(check_text(text).encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", "replace")

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset({self.separator_id})

    def chat(self, text: str) -> str:
        raise ValueError("this model has no tokenizer and so no chat template (--chat needs a GGUF model)")


class TokenizerEncoder:
    """A `models.io.tokenizer.Tokenizer` (e.g. SmolLM2's); separator `<|endoftext|>` or else EOS.
    `chat(text)` wraps a prompt in the tokenizer's chat template (ChatML)."""

    def __init__(self, tokenizer, name: str = "gguf"):
        self.tok = tokenizer
        self.name = name
        sep = tokenizer.token_to_id("<|endoftext|>")
        if sep is None:
            sep = tokenizer.eos_id
        if sep is None:
            raise ValueError("the tokenizer has neither <|endoftext|> nor an EOS token to separate documents")
        self.separator_id = int(sep)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(check_text(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @property
    def stop_ids(self) -> frozenset[int]:
        return frozenset(self.tok.eos_ids | {self.separator_id})

    def chat(self, text: str) -> str:
        return self.tok.apply_chat_template([{"role": "user", "content": check_text(text)}])
