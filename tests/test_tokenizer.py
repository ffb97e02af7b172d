"""Tests for models.io.tokenizer: SmolLM2's byte-level BPE rebuilt from its GGUF file."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import pre_tokenizers

from models.io.gguf import GGUFTokenizerData, read_gguf_tokenizer_data, smollm2_gguf_path
from models.io.tokenizer import BYTE_TO_UNICODE, Tokenizer, build_tokenizer, chatml_default_system_prompt

# Reference ids from llama.cpp / HF for SmolLM2 (measured independently of this code).
FIB_TEXT = "def fibonacci(n):"
FIB_IDS = [1604, 3987, 46477, 24, 94, 727]
# Text of the default system prompt in SmolLM2-135M-Instruct's embedded chat template.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

ROUND_TRIP_CASES = [
    "",
    " ",
    "def fibonacci(n):\n\tif n < 2:\n\t\treturn n\n\treturn fibonacci(n - 1) + fibonacci(n - 2)\n",
    "x  =   1    +     2\n\n\n    y = 3.14159e-10  # comment\r\n",
    "café résumé naïve é É",
    "你好，世界！ こんにちは 안녕하세요",
    "emoji 🎉🚀 👩‍👩‍👧‍👦 and flags 🇫🇷",
    "digits 0123456789 1,000,000 3.5e+12 ٣٤٥",
    "tabs\tand\ttrailing spaces   \n\t \n",
    "\x00\x01\x1f\x7f control chars",
    "<|im_start|>user\nhi<|im_end|>\n",
    "< |im_start| > not special",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf_path())


def test_reference_ids(tok):
    assert tok.encode(FIB_TEXT) == FIB_IDS
    assert tok.decode(FIB_IDS) == FIB_TEXT


def test_ids_and_sizes(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_id == 1 and tok.eos_id == 2
    assert tok.id_to_token(1) == "<|im_start|>" and tok.id_to_token(2) == "<|im_end|>"
    assert {tok.eos_id, tok.token_to_id("<|im_end|>")} <= tok.eos_ids
    assert tok.bos_id not in tok.eos_ids
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]


@pytest.mark.parametrize("text", ROUND_TRIP_CASES)
def test_round_trip_fixed(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


_SETTINGS = settings(max_examples=100, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture])


@_SETTINGS
@given(text=st.text())
def test_round_trip_any_representable_text(tok, text):
    bad = tok.unencodable_chars(text)
    if bad:
        # Lossy by construction (no token for some byte): strict mode must refuse it.
        with pytest.raises(ValueError, match="not representable"):
            tok.encode(text, strict=True)
    else:
        assert tok.decode(tok.encode(text, strict=True)) == text


def test_byte_alphabet_matches_hf_byte_level():
    assert set(BYTE_TO_UNICODE.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    assert BYTE_TO_UNICODE[ord(" ")] == "Ġ" and BYTE_TO_UNICODE[ord("\n")] == "Ċ"
    assert BYTE_TO_UNICODE[ord("a")] == "a"


def test_missing_bytes_of_smollm2(tok):
    data = read_gguf_tokenizer_data(smollm2_gguf_path())
    vocab = set(data.tokens)
    expected = {b for b, ch in BYTE_TO_UNICODE.items() if ch not in vocab}
    assert tok.missing_bytes == expected
    # Measured on SmolLM2-135M-Instruct: 6 control chars, never-valid UTF-8 bytes, and
    # the lead bytes of unassigned planes 4-11.
    assert expected == {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2, *range(0xF5, 0x100)}
    text = "ok\x04 \U00040000 fine"
    assert tok.unencodable_chars(text) == {"\x04", "\U00040000"}
    with pytest.raises(ValueError, match="not representable"):
        tok.encode(text, strict=True)
    # Non-strict drops the unencodable bytes (as llama.cpp does) but keeps the rest.
    ids = tok.encode("ok\x04ok")
    assert tok.decode(ids) == "okok"
    assert tok.unencodable_chars("plain ascii, é, 你好, 🎉") == set()


_CODE_ALPHABET = st.sampled_from(list("abcXYZ_019 \t\n\r(){}[]:;.,'\"#=+-*/\\<>|!é你🎉") + ["<|im_end|>", "    "])


@_SETTINGS
@given(parts=st.lists(_CODE_ALPHABET, max_size=60))
def test_round_trip_code_like_text(tok, parts):
    text = "".join(parts)
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_split_individually(tok):
    ids = tok.encode("20250117")
    assert [tok.decode([i]) for i in ids] == list("20250117")


def test_control_tokens_are_single_special_ids(tok):
    data = read_gguf_tokenizer_data(smollm2_gguf_path())
    control = [i for i, t in enumerate(data.token_types) if t == 3]
    assert control == list(range(17))
    for i in control:
        assert tok.encode(data.tokens[i]) == [i]
    ids = tok.encode("a<|im_end|>b")
    assert ids == [*tok.encode("a"), 2, *tok.encode("b")]
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.decode(ids) == "a<|im_end|>b"


def test_chat_template_default_system_prompt(tok):
    assert tok.default_system_prompt == SMOLLM2_DEFAULT_SYSTEM
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    # Expected output of the GGUF's Jinja template for this conversation.
    assert text == (
        f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(text)
    assert ids.count(tok.bos_id) == 3 and ids.count(tok.token_to_id("<|im_end|>")) == 2
    assert ids[0] == tok.token_to_id("<|im_start|>")
    assert tok.decode(ids) == text


def test_chat_template_explicit_system_and_no_generation_prompt(tok):
    msgs = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == (
        "<|im_start|>system\nBe terse.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    with pytest.raises(ValueError):
        tok.apply_chat_template([{"role": "user"}])


def test_default_system_prompt_parser():
    tpl = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are X<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] "
           "+ '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
    assert chatml_default_system_prompt(tpl) == "You are X"
    assert chatml_default_system_prompt("{% for m in messages %}<|im_start|>{% endfor %}") is None
    assert chatml_default_system_prompt(None) is None


# ----------------------------------------------------------------------------- synthetic vocab


def _tiny_data() -> GGUFTokenizerData:
    # Byte-level alphabet for printable ASCII plus space ("Ġ") and newline ("Ċ").
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ"]
    merges = ["Ġ t", "h e", "Ġt he", "1 2"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, "Ġt", "he", "Ġthe", "12"]
    return GGUFTokenizerData(
        model="gpt2", pre="gpt2", tokens=tuple(tokens), merges=tuple(merges),
        token_types=tuple([3, 3, 3] + [1] * (len(tokens) - 3)), bos_id=1, eos_id=0, unk_id=None,
        pad_id=None, add_bos=False, add_eos=False, chat_template=None,
    )


def test_build_tokenizer_applies_merges_and_special_tokens():
    data = _tiny_data()
    t = Tokenizer.from_tokenizer_data(data)
    the = data.tokens.index("Ġthe")
    assert t.encode(" the") == [the]
    assert t.encode("he") == [data.tokens.index("he")]
    assert t.encode("<|im_end|>") == [2]
    assert t.eos_ids == {0, 2}  # declared eos (<|endoftext|>) plus <|im_end|>
    assert t.default_system_prompt is None
    assert t.apply_chat_template([{"role": "user", "content": "x"}]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n")
    # pre="gpt2" keeps digit runs together so the "1 2" merge applies; "smollm" splits digits.
    assert t.encode("12") == [data.tokens.index("12")]
    smollm = Tokenizer.from_tokenizer_data(dataclasses.replace(data, pre="smollm"))
    assert smollm.encode("12") == [data.tokens.index("1"), data.tokens.index("2")]
    assert t.decode(t.encode("the 12 the\n")) == "the 12 the\n"


def test_build_tokenizer_rejects_bad_inputs():
    data = _tiny_data()
    with pytest.raises(ValueError, match="duplicate"):
        build_tokenizer([*data.tokens, "a"], data.merges)
    with pytest.raises(ValueError, match="malformed merge"):
        build_tokenizer(data.tokens, ["Ġthe"])
    with pytest.raises(ValueError, match="token types"):
        build_tokenizer(data.tokens, data.merges, [1])
    # merges naming tokens the vocabulary lacks: a ValueError naming the merge, never the library's
    # bare Exception or its Rust panic (a BaseException)
    with pytest.raises(ValueError, match="'ab' is not in the vocabulary"):
        build_tokenizer(["a", "b", "c"], ["a b"])
    with pytest.raises(ValueError, match="token 'x' is not in the vocabulary"):
        build_tokenizer(["a", "b", "ab"], ["a x"])
    with pytest.raises(ValueError, match="pre-tokenizer"):
        build_tokenizer(data.tokens, data.merges, pre="llama-bpe")
    with pytest.raises(ValueError, match="tokenizer model"):
        Tokenizer.from_tokenizer_data(dataclasses.replace(data, model="llama"))
