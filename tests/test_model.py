"""The decoder on the tiny config: KV-cache correctness, training == serving, generation, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models import llama
from models.config import CONFIGS, get_config
from models.generate import Generator, bucket_length
from np_jax.appliance.mapping import kv_cache_bytes

CFG = get_config("tiny")


@pytest.fixture(scope="module")
def params():
    p = llama.init_params(CFG, jax.random.key(0))
    cal = jax.random.randint(jax.random.key(1), (2, 32), 0, CFG.vocab_size)
    return {pol: llama.calibrate(p, cal, CFG, pol) for pol in ("float", "w4a4", "a8c8w4")}


def _incremental(params, toks, split, policy, cache_len=64):
    """Prefill toks[:, :split], then decode the rest one token at a time."""
    B, L = toks.shape
    sp = llama.prepare_serving(params, CFG, policy)
    cache = llama.init_cache(CFG, B, cache_len, policy)
    step = jax.jit(lambda p, t, pos, c: llama.step(p, t, pos, c, CFG, policy))
    logits, cache = step(sp, toks[:, :split], jnp.broadcast_to(jnp.arange(split), (B, split)), cache)
    outs = [logits]
    for t in range(split, L):
        lg, cache = step(sp, toks[:, t:t + 1], jnp.full((B, 1), t), cache)
        outs.append(lg)
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("policy", ["w4a4", "a8c8w4"])
def test_prefill_then_decode_equals_full_forward_bit_exact(params, policy):
    toks = jax.random.randint(jax.random.key(2), (3, 14), 0, CFG.vocab_size)
    full = jax.jit(lambda p, t: llama.forward(p, t, CFG, policy))(params[policy], toks)
    inc, cache = _incremental(params[policy], toks, 9, policy)
    np.testing.assert_array_equal(np.asarray(inc), np.asarray(full))
    assert cache["k"].dtype == jnp.int8
    bits = llama.resolve(policy).kv.bits
    lo = -(2 ** (bits - 1))
    assert int(cache["k"].min()) >= lo and int(cache["k"].max()) <= -lo - 1


def test_prefill_then_decode_close_to_full_forward_in_float(params):
    toks = jax.random.randint(jax.random.key(3), (2, 12), 0, CFG.vocab_size)
    full = llama.forward(params["float"], toks, CFG, "float")
    inc, _ = _incremental(params["float"], toks, 5, "float")
    np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=1e-5, rtol=1e-5)


def test_training_forward_equals_serving_forward(params):
    toks = jax.random.randint(jax.random.key(4), (2, 16), 0, CFG.vocab_size)
    f = jax.jit(lambda p, t: llama.forward(p, t, CFG, "w4a4"))
    train_logits = f(params["w4a4"], toks)
    serve_logits = f(llama.prepare_serving(params["w4a4"], CFG, "w4a4"), toks)
    np.testing.assert_array_equal(np.asarray(train_logits), np.asarray(serve_logits))


def test_quantized_gradients_reach_every_parameter(params):
    toks = jax.random.randint(jax.random.key(5), (2, 16), 0, CFG.vocab_size)

    def loss(p):
        logits = llama.forward(p, toks[:, :-1], CFG, "w4a4")
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), toks[:, 1:, None], -1))

    grads = jax.jit(jax.grad(loss))(params["w4a4"])
    flat = jax.tree_util.tree_leaves_with_path(grads)
    for path, g in flat:
        g = np.asarray(g)
        assert np.isfinite(g).all(), path
    zero = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g))]
    assert not zero, f"parameters without gradient: {zero}"


def test_users_are_independent_and_prompt_length_buckets(params):
    """A batch of users at different positions decodes exactly as each user alone."""
    gen = Generator(params["w4a4"], CFG, "w4a4", cache_len=64)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (3, 11, 17)]
    together = gen.generate(prompts, 6).tokens
    alone = [gen.generate([p], 6).tokens[0] for p in prompts]
    assert together == alone
    assert bucket_length(3) == 16 and bucket_length(17) == 32 and bucket_length(64, 16) == 64


def test_generation_stops_at_eos(params):
    gen = Generator(params["w4a4"], CFG, "w4a4", cache_len=64)
    first = gen.generate([[1, 2, 3]], 8).tokens[0]
    stopped = gen.generate([[1, 2, 3]], 8, eos_ids={first[2]}).tokens[0]
    assert stopped == first[: first.index(first[2]) + 1]


def test_bad_inputs_raise_clear_errors(params):
    with pytest.raises(llama.ModelInputError, match="token ids"):
        llama.forward(params["float"], jnp.array([[0, CFG.vocab_size]]), CFG)
    with pytest.raises(llama.ModelInputError, match="token ids"):
        llama.forward(params["float"], jnp.array([[-1, 3]]), CFG)
    with pytest.raises(llama.ModelInputError, match="context"):
        llama.forward(params["float"], jnp.zeros((1, CFG.max_seq_len + 1), jnp.int32), CFG)
    gen = Generator(params["w4a4"], CFG, "w4a4", cache_len=32)
    with pytest.raises(llama.ModelInputError, match="cache"):
        gen.generate([[1] * 30], 8)
    with pytest.raises(llama.ModelInputError, match="non-empty"):
        gen.generate([[]], 4)
    with pytest.raises(llama.ModelInputError, match="context"):
        Generator(params["w4a4"], CFG, "w4a4", cache_len=CFG.max_seq_len + 1)
    with pytest.raises(ValueError, match="unknown model"):
        get_config("gpt-5")
    bad = dict(params["w4a4"])
    bad["layers"] = {**bad["layers"], "attn": {**bad["layers"]["attn"], "s_k": -bad["layers"]["attn"]["s_k"]}}
    with pytest.raises(ValueError, match="positive"):
        llama.prepare_serving(bad, CFG, "w4a4")


def test_kv_cache_byte_accounting_matches_spec():
    cfg = CONFIGS["granite-3b-northpole"]
    # spec sec. 3: 28 users x 2048 positions x 2 x 1024 x 0.5 B = 58.7 MB per layer
    assert kv_cache_bytes(28, 2048, cfg.kv_dim, 4, layers=1) == 28 * 2048 * 2 * 1024 // 2
    assert kv_cache_bytes(28, 2048, cfg.kv_dim, 8, layers=1) == 2 * kv_cache_bytes(28, 2048, cfg.kv_dim, 4, layers=1)
    assert cfg.layer_params() == 218_103_808  # 218.1 M parameters per layer (spec sec. 3)


@settings(max_examples=2)  # each example compiles a prefill and a decode
@given(n=st.integers(1, 20), split=st.integers(1, 19), seed=st.integers(0, 1000))
def test_prefill_split_point_does_not_change_bits(params, n, split, seed):
    split = min(split, n)
    toks = jax.random.randint(jax.random.key(seed), (1, n), 0, CFG.vocab_size)
    full = jax.jit(lambda p, t: llama.forward(p, t, CFG, "w4a4"))(params["w4a4"], toks)
    inc, _ = _incremental(params["w4a4"], toks, split, "w4a4", cache_len=32)
    np.testing.assert_array_equal(np.asarray(inc), np.asarray(full))


def test_random_serving_weights_cover_the_code_range_and_follow_the_key():
    # init_serving_random draws codes on the host (numpy), seeded from the key: every code of the
    # width occurs, none outside it, the same key gives the same model and another key another
    a = llama.init_serving_random(CFG, jax.random.key(0), "w4a4")
    b = llama.init_serving_random(CFG, jax.random.key(0), "w4a4")
    c = llama.init_serving_random(CFG, jax.random.key(1), "w4a4")
    codes = lambda p: np.asarray(jax.tree.map(lambda v: v[0], p["layers"]["mlp"]["up"]["tw"]).to_matrix())  # noqa: E731
    lo, hi = int(codes(a).min()), int(codes(a).max())
    assert (lo, hi) == (-8, 7) and len(np.unique(codes(a))) == 16
    assert np.array_equal(codes(a), codes(b)) and not np.array_equal(codes(a), codes(c))
    assert np.array_equal(np.asarray(a["embed"]), np.asarray(b["embed"]))
    logits, _ = llama.step(a, jnp.array([[1, 2]]), jnp.array([[0, 1]]), llama.init_cache(CFG, 1, 8, "w4a4"), CFG,
                           "w4a4")
    assert logits.shape == (1, 2, CFG.vocab_size) and bool(jnp.isfinite(logits).all())


@pytest.mark.parametrize("sink", [0, 1])
def test_dynamic_probability_steps_decode_as_the_full_forward_bit_exact(tmp_path, sink):
    """Each probability row at its own step (max over the row / Q_P): the cached decode path and the
    window forward quantize the same rows the same way; serving equals training."""
    from np_jax.quant.policy import load_policy

    f = tmp_path / "pdyn.json"
    f.write_text('{"name": "w8a8-pdyn", "base": "w8a8", "rules": [["*.attn.probs", {"bits": 8, "dynamic": true}]]}')
    pol = load_policy(f)
    cfg = CFG.replace(sink_positions=sink)
    p = llama.init_params(cfg, jax.random.key(0))
    p = llama.calibrate({**p, "layers": llama.with_act_steps(p["layers"], cfg)},
                        jax.random.randint(jax.random.key(1), (2, 32), 0, cfg.vocab_size), cfg, pol)
    toks = jax.random.randint(jax.random.key(2), (3, 14), 0, cfg.vocab_size)
    full = llama.forward(p, toks, cfg, pol)
    static = llama.forward(p, toks, cfg, "w8a8")
    assert not np.array_equal(np.asarray(full), np.asarray(static))  # the dynamic steps are in use
    np.testing.assert_array_equal(np.asarray(llama.forward(llama.prepare_serving(p, cfg, pol), toks, cfg, pol)),
                                  np.asarray(full))
    sp = llama.prepare_serving(p, cfg, pol)
    cache = llama.init_cache(cfg, 3, 64, pol)
    step = jax.jit(lambda p, t, pos, c: llama.step(p, t, pos, c, cfg, pol))
    logits, cache = step(sp, toks[:, :9], jnp.broadcast_to(jnp.arange(9), (3, 9)), cache)
    outs = [logits]
    for t in range(9, 14):
        lg, cache = step(sp, toks[:, t:t + 1], jnp.full((3, 1), t), cache)
        outs.append(lg)
    np.testing.assert_array_equal(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full))
