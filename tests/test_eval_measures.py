"""The measures that tell quantized models apart (models.evaluate): KL(float || model) per token
and 'same code as float' (leading greedy tokens identical to float's), on the tiny config."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models import llama
from models.evaluate.agreement import PROMPT_TOKENS, common_prefix_lengths, greedy_continuations, held_out_prompts
from models.evaluate.perplexity import evaluate, rounded_weights, token_kl
from models.io.load import load_model
from models.train.data import Corpus, DataConfig, held_out_windows


def _np_kl(ref, logits):
    """KL(softmax(ref) || softmax(logits)) per position, float64 numpy."""
    def log_softmax(x):
        x = np.asarray(x, np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    lp, lq = log_softmax(ref), log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2), st.sampled_from([1, 3]), st.sampled_from([2, 7, 40]), st.floats(0.1, 20.0),
       st.integers(0, 2**31 - 1))
def test_token_kl_matches_numpy(b, length, vocab, scale, seed):
    rng = np.random.default_rng(seed)
    ref = (rng.standard_normal((b, length, vocab)) * scale).astype(np.float32)
    logits = (rng.standard_normal((b, length, vocab)) * scale).astype(np.float32)
    got = np.asarray(token_kl(jnp.asarray(ref), jnp.asarray(logits)))
    assert got.shape == (b, length) and (got >= 0).all()
    np.testing.assert_allclose(got, _np_kl(ref, logits), rtol=1e-4, atol=1e-5)
    assert (np.asarray(token_kl(jnp.asarray(ref), jnp.asarray(ref))) == 0).all()


@pytest.fixture(scope="module")
def tiny():
    m = load_model("tiny", log=lambda s: None)
    return m.cfg, m.params, m.encoder


@pytest.fixture(scope="module")
def sharp():
    """Another tiny model, with sharper next-token distributions than a random init's (whose are
    nearly uniform): KL from the first is far from 0 and its greedy choices are not near-ties."""
    return jax.tree.map(lambda x: 3 * x, load_model("tiny", seed=1, log=lambda s: None).params)


@pytest.fixture(scope="module")
def corpus(tiny):
    return Corpus(DataConfig(), tiny[2])


def test_evaluate_kl_against_numpy(tiny, sharp, corpus):
    cfg, ref, _ = tiny
    other = sharp
    w = held_out_windows(corpus, 16, 3)
    r = evaluate(other, cfg, "float", w, batch_size=2, reference_params=ref)
    oracle = _np_kl(llama.forward(ref, jnp.asarray(w[:, :-1]), cfg), llama.forward(other, jnp.asarray(w[:, :-1]), cfg))
    assert r["kl"] > 0.1
    np.testing.assert_allclose(r["kl"], oracle.mean(), rtol=1e-4)
    # the reference changes nothing else (up to how XLA fuses the larger program)
    np.testing.assert_allclose(r["nll"], evaluate(other, cfg, "float", w, batch_size=2)["nll"], rtol=1e-6)
    assert evaluate(ref, cfg, "float", w, batch_size=2, reference_params=ref)["kl"] == 0.0
    assert "kl" not in evaluate(ref, cfg, "float", w, batch_size=2)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(1, 12), st.data())
def test_common_prefix_lengths_against_a_loop(p, t, data):
    ref = np.array(data.draw(st.lists(st.lists(st.integers(0, 3), min_size=t, max_size=t), min_size=p, max_size=p)))
    got = np.array(data.draw(st.lists(st.lists(st.integers(0, 3), min_size=t, max_size=t), min_size=p, max_size=p)))

    def oracle(a, b):
        n = 0
        while n < len(a) and a[n] == b[n]:
            n += 1
        return n

    np.testing.assert_array_equal(common_prefix_lengths(ref, got), [oracle(a, b) for a, b in zip(ref, got)])
    assert (common_prefix_lengths(ref, ref) == t).all()


def test_common_prefix_lengths_by_hand():
    ref = np.array([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    got = np.array([[5, 6, 7, 8], [9, 6, 7, 8], [5, 6, 0, 8]])  # a later match after a miss does not count
    np.testing.assert_array_equal(common_prefix_lengths(ref, got), [4, 0, 2])
    with pytest.raises(ValueError, match="do not match"):
        common_prefix_lengths(ref, got[:, :3])


def test_held_out_prompts_are_deterministic_line_starts(corpus):
    prompts = held_out_prompts(corpus, 6)
    assert len(prompts) == 6 and prompts == held_out_prompts(corpus, 6)
    held = [f.path.read_bytes() for f in corpus.held_out[:20]]
    for p in prompts:
        assert PROMPT_TOKENS // 2 <= len(p) <= PROMPT_TOKENS
        # cut just after the last newline, unless that is in the first half
        assert p[-1] == ord("\n") or (len(p) == PROMPT_TOKENS and ord("\n") not in p[PROMPT_TOKENS // 2 - 1:])
        for part in bytes(p).split(b"\0"):  # 0 separates files in the held-out stream
            assert any(part in text for text in held)


def test_float_continuations_agree_with_themselves(tiny, sharp, corpus):
    cfg, params = tiny[0], sharp
    prompts = held_out_prompts(corpus, 3)
    a = greedy_continuations(params, cfg, "float", prompts, 8, batch_size=2)  # a padded last batch
    assert a.shape == (3, 8) and a.dtype == np.int32
    assert (common_prefix_lengths(a, a) == 8).all()
    # greedy: every token is the full forward's argmax after the prompt and the tokens before it
    for p, row in zip(prompts, a):
        logits = llama.forward(params, jnp.asarray([p + row[:-1].tolist()]), cfg)[0, len(p) - 1:]
        np.testing.assert_array_equal(np.argmax(logits, -1), row)


def _np_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 -> float32 by the bits: round to nearest, ties to even (finite inputs)."""
    b = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
    return b.astype(np.uint32).view(np.float32)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_rounded_weights_are_the_nearest_bf16_and_fp16(seed, scale):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((5, 7)) * scale).astype(np.float32)
    ties = np.array([1 + 2.0 ** -8, 1 + 3 * 2.0 ** -8, 2049.0, -2051.0], np.float32)  # exact halfway cases
    params = {"w": w, "t": ties, "codes": np.arange(6, dtype=np.int8)}
    b, h = rounded_weights(params, "bf16"), rounded_weights(params, "fp16")
    np.testing.assert_array_equal(np.asarray(b["w"]), _np_bf16(w))
    np.testing.assert_array_equal(np.asarray(b["t"]), _np_bf16(ties))
    np.testing.assert_array_equal(np.asarray(h["w"]), w.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(h["t"]), ties.astype(np.float16).astype(np.float32))
    assert np.asarray(b["w"]).dtype == np.float32 and np.asarray(b["codes"]).dtype == np.int8
    np.testing.assert_array_equal(np.asarray(b["codes"]), params["codes"])  # integers are not weights to round
    with pytest.raises(ValueError, match="bf16"):
        rounded_weights(params, "fp8")


def test_cli_rows_carry_kl_and_same_as_float(capsys):
    from np_jax.cli import main

    base = ["eval", "--model", "tiny", "--precision", "w4a4", "--recipe", "plain", "--calib-windows", "1",
            "--windows", "2", "--seq-len", "16"]
    assert main(base + ["--agreement-prompts", "2", "--agreement-tokens", "4", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    fl, q = rep["rows"]
    assert rep["agreement"] == {"prompts": 2, "tokens": 4, "prompt_tokens": PROMPT_TOKENS}
    assert "kl" not in fl and "same_as_float_tokens" not in fl  # the reference row
    assert q["kl"] >= 0 and 0 <= q["same_as_float_tokens"] <= 4 and 0 <= q["top1_agreement"] <= 1
    # each prompt's count is kept, and the mean's standard error is theirs (sample standard deviation / sqrt(P))
    per = np.asarray(q["same_as_float_per_prompt"])
    assert per.shape == (2,) and np.all((0 <= per) & (per <= 4)) and per.mean() == q["same_as_float_tokens"]
    assert q["same_as_float_sem"] == pytest.approx(np.std(per, ddof=1) / np.sqrt(2))
    assert main(base + ["--no-ptq", "--agreement-prompts", "0", "--rounded-float", "bf16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("model"))
    assert header.split()[-2:] == ["top-1", "KL"]  # no agreement column when skipped
    # the rounded float row is measured against float like a quantized one, and lines up with it
    row = next(line for line in lines if line.startswith("float, weights in bf16 "))
    assert len(row.split()) == len(header.split()) + 1 and float(row.split()[-1]) >= 0  # 4-word name, 2 2-word heads


@pytest.mark.parametrize("extra, msg", [
    (["--agreement-prompts", "-1"], "argument --agreement-prompts: must be >= 0, got -1"),
    (["--agreement-prompts", "x"], "argument --agreement-prompts: must be a whole number, got 'x'"),
    (["--agreement-tokens", "0"], "argument --agreement-tokens: must be >= 1, got 0"),
    (["--agreement-tokens", "66"], "--agreement-tokens 66 after a prompt of up to 64 tokens exceeds the context of "
                                   "tiny (128)"),
])
def test_cli_agreement_flags_refused_before_work(extra, msg, capsys):
    from np_jax.cli import main

    assert main(["eval", "--model", "tiny", "--no-ptq"] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("np-jax eval: error:") and msg in err and "\n" not in err, err
