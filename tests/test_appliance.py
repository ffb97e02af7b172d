"""The 16-card appliance: mapping, GPipe pipeline vs sequential (bits and gradients), runtime."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models import llama
from models.appliance import (Appliance, build_cards, card_list, card_programs, combine_greedy, init_card_states,
                              pipelined_logits)
from models.config import get_config
from models.generate import Generator
from np_jax.appliance.mapping import map_model
from np_jax.appliance.pipeline import Schedule, card_mesh, run_pipeline
from np_jax.chip.memory import CoreMemoryError
from np_jax.plots import plot_card

# The tiny model with the recipe's online transforms (a QK Hadamard, a two-factor down-projection
# Hadamard as INT8 x INT2 VMMs, the INT8 attention-sink prefix), so that every equivalence below
# covers them too.
CFG = get_config("tiny").replace(qk_rotation=True, down_rotation=(4, 32), sink_positions=1)


def layout(cards, micro_batches, output_cards, users=4, context=16):
    """Near-equal layer blocks, the vocabulary over `output_cards` cards, the rest idle (the mapper's rules)."""
    return map_model(CFG, "w4a4", users=users, context=context, cards=cards, micro_batches=micro_batches,
                     output_cards=output_cards, strict=False)


@pytest.fixture(scope="module")
def model():
    p = llama.init_params(CFG, jax.random.key(0))
    p = llama.calibrate(p, jax.random.randint(jax.random.key(1), (2, 32), 0, CFG.vocab_size), CFG, "w4a4")
    return p, llama.prepare_serving(p, CFG, "w4a4")


# --- mapping ------------------------------------------------------------------------------------

def test_published_mapping_fits_and_8bit_kv_does_not():
    cfg = get_config("granite-3b-northpole")
    m = map_model(cfg, "w4a4", users=28, context=2048)
    assert m.fits and len(m.layer_cards) == 14 and len(m.output_cards) == 2
    assert (m.micro_batches, m.micro_batch_size) == (14, 2)
    assert all(c.layers == (i,) for i, c in enumerate(m.layer_cards))
    assert [c.vocab_slice for c in m.output_cards] == [(0, 24576), (24576, 49152)]
    s = m.cards[0].summary()
    assert s["weights_bytes"] >= 218_103_808 // 2 and s["kv_cache_bytes"] == 28 * 2048 * 2 * 1024 // 2
    assert s["fullest_core_bytes"] <= s["core_capacity_bytes"]
    with pytest.raises(CoreMemoryError) as e:  # spec sec. 3: an 8-bit KV cache would not fit
        map_model(cfg, "a8c8w4", users=28, context=2048)
    assert e.value.card == 0 and e.value.bytes_over > 0 and "card 0, core (" in str(e.value)
    loose = map_model(cfg, "a8c8w4", users=28, context=2048, strict=False)
    assert not loose.fits and "over by" in loose.first_error()


def test_mapping_layers_per_card_and_errors():
    m = map_model(get_config("smollm2-135m"), "w4a4", users=4, context=512)
    assert m.fits and sum(len(c.layers) for c in m.layer_cards) == 30
    assert sorted({c.role for c in m.cards}) == ["layers", "output"]
    with pytest.raises(ValueError, match="at least one card"):
        map_model(CFG, "w4a4", users=2, context=16, cards=0)
    with pytest.raises(ValueError, match="equal micro-batches"):
        map_model(CFG, "w4a4", users=5, context=16, micro_batches=2)
    with pytest.raises(CoreMemoryError, match="kv_cache"):  # more users than the KV cache can hold
        map_model(get_config("granite-3b-northpole"), "w4a4", users=64, context=2048)


def test_more_core_memory_never_breaks_a_fitting_mapping():
    import dataclasses

    from np_jax.spec import APPLIANCE
    cfg = get_config("granite-3b-northpole")
    for users in (8, 28, 40):
        base = map_model(cfg, "w4a4", users=users, context=2048, strict=False)
        bigger = dataclasses.replace(APPLIANCE, chip=dataclasses.replace(APPLIANCE.chip, core_sram_bytes=1024 * 1024))
        more = map_model(cfg, "w4a4", users=users, context=2048, strict=False, appliance=bigger)
        assert more.fits or not base.fits


def test_plot_card_writes_png(tmp_path):
    m = map_model(get_config("granite-3b-northpole"), "w4a4", users=28, context=2048)
    out = plot_card(m, 0, str(tmp_path / "card0.png"))
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


# --- execution ----------------------------------------------------------------------------------

def _sequential_logits(serving, toks, cache_len):
    cache = llama.init_cache(CFG, toks.shape[0], cache_len, "w4a4")
    B, L = toks.shape
    return llama.step(serving, toks, jnp.broadcast_to(jnp.arange(L), (B, L)), cache, CFG, "w4a4")


@pytest.mark.parametrize("devices", [16, 1, "resident", "unrolled", "one micro-batch"])
def test_pipelined_prefill_and_decode_equal_sequential_bits(model, devices):
    """16 devices (GPipe ticks), 1 device (card-stacked, in order), the resident form (one
    pytree per card, in order on one device), the resident form with every layer of one card
    unrolled, and the resident form with all users in one micro-batch (the cards run unmapped),
    all equal the sequential model, bit for bit."""
    _, serving = model
    mapping = {"unrolled": layout(2, 2, 1),  # one card, all layers
               "one micro-batch": layout(16, 1, 2)}.get(devices, layout(16, 2, 2))
    layer_fn, head_fn = card_programs(CFG, "w4a4", mapping, result="logits")
    users, L, S = 4, 8, 16
    M = mapping.micro_batches
    assert M == (1 if devices == "one micro-batch" else 2)
    user_axis = 1
    if devices in ("resident", "unrolled", "one micro-batch"):
        form = "unrolled" if devices == "unrolled" else "scan"
        cards = card_list(serving, CFG, "w4a4", mapping, layers=form)
        state = init_card_states(CFG, "w4a4", mapping, S, stacked=False, layers=form)
        keys = {"layers": ["layers"], "output": ["final_norm", "output"], "idle": []}  # only what each role uses
        assert [sorted(c) for c in cards] == [keys[r] for r in mapping.schedule.roles]
        assert "idle" in mapping.schedule.roles or form == "unrolled"
        if form == "unrolled":
            assert isinstance(cards[0]["layers"], list) and len(cards[0]["layers"]) == CFG.n_layers > 1
            user_axis = 0  # per-layer caches [users, S, Kv, E]
        devices = 1
    else:
        cards = build_cards(serving, CFG, "w4a4", mapping)
        state = {k: jnp.zeros((16, 1, users, S, CFG.n_kv_heads, CFG.head_dim), jnp.int8) for k in ("k", "v")}
    toks = jax.random.randint(jax.random.key(7), (users, L + 3), 0, CFG.vocab_size)
    mesh = card_mesh(devices)
    run = jax.jit(lambda c, x, a, s: run_pipeline(mapping.schedule, mesh, layer_fn, head_fn, c, x, a, s,
                                                  user_axis=user_axis))
    x = llama.embed(serving, toks[:, :L], llama.resolve("w4a4")).reshape(M, users // M, L, -1)
    res, state = run(cards, x, {"pos": jnp.broadcast_to(jnp.arange(L), (M, users // M, L))}, state)
    ref, ref_cache = _sequential_logits(serving, toks[:, :L], S)
    got = jnp.concatenate([res[c] for c in mapping.schedule.output_cards], -1).reshape(users, L, -1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    for t in range(L, L + 3):  # decode steps, each user at its own position
        x = llama.embed(serving, toks[:, t:t + 1], llama.resolve("w4a4")).reshape(M, users // M, 1, -1)
        res, state = run(cards, x, {"pos": jnp.full((M, users // M, 1), t)}, state)
        ref, ref_cache = llama.step(serving, toks[:, t:t + 1], jnp.full((users, 1), t), ref_cache, CFG, "w4a4")
        got = jnp.concatenate([res[c] for c in mapping.schedule.output_cards], -1).reshape(users, 1, -1)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    # the cards' KV caches hold exactly the sequential cache
    layer_cards = mapping.schedule.layer_cards
    k = (np.concatenate([np.asarray(jnp.stack(state[c]["k"]) if isinstance(state[c]["k"], list) else state[c]["k"])
                         for c in layer_cards]) if isinstance(state, list)
         else np.asarray(state["k"])[layer_cards][:, 0])
    np.testing.assert_array_equal(k, np.asarray(ref_cache["k"]))


@pytest.mark.parametrize("cards,head_cards,devices", [pytest.param(16, 2, 16, marks=pytest.mark.slow), (16, 2, 2),
                                                      (16, 2, 1), pytest.param(4, 1, 4, marks=pytest.mark.slow)])
def test_appliance_generation_equals_single_device_generation(model, cards, head_cards, devices):
    params, serving = model
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(0, CFG.vocab_size, n)) for n in (3, 11, 17, 5)]
    ref = Generator(params, CFG, "w4a4", cache_len=64, serving_params=serving).generate(prompts, 5).tokens
    mapping = layout(cards, 2, head_cards, context=64)
    gen = Generator(backend=Appliance(serving, CFG, "w4a4", mapping, cache_len=64, devices=devices))
    res = gen.generate(prompts, 5)
    assert res.tokens == ref and res.timings["devices"] == devices
    frames = res.timings["frames"]
    assert frames["runs"] == 5 and frames["bytes_in"][0] > 0


# --- gradients ------------------------------------------------------------------------------------

# The chip's vector unit is FP16, so the cotangents of the activations are FP16 too, and the cards
# round partial sums (a micro-batch's, an output card's vocabulary slice's) that the sequential
# model never forms: their gradients differ by FP16 roundings amplified by each sum's cancellation,
# with no bound relative to the gradient (docs/appliance.md). With the vector unit in float32
# (`F32`: the same integer products, float32 activations) nothing is rounded below float32, so the
# gradients differ only in the order of float32 additions: a few roundings (2^-24) of the terms,
# far below this bound, a quarter of one FP16 unit (2^-11).
F32 = llama.Precision(llama.resolve("w4a4").policy, jnp.float32)
F32_GRADIENT_RTOL = 2.0 ** -13


def _nll(logits, tokens):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))


@functools.lru_cache(maxsize=4)  # hypothesis examples with the same shapes reuse the compiled programs
def _gradient_programs(cfg, cards, micro_batches, output_cards, devices, precision):
    """Jitted loss and gradient through the pipeline (`cfg` on `cards` cards over `devices`
    devices, 4 users) and through `llama.forward` (each compiled when first called)."""
    mapping = map_model(cfg, "w4a4", users=4, context=16, cards=cards, micro_batches=micro_batches,
                        output_cards=output_cards, strict=False)
    mesh = card_mesh(devices)
    pipe = jax.jit(jax.value_and_grad(
        lambda p, t: _nll(pipelined_logits(p, t[:, :-1], cfg, precision, mapping, mesh), t)))
    seq = jax.jit(jax.value_and_grad(lambda p, t: _nll(llama.forward(p, t[:, :-1], cfg, precision), t)))
    return pipe, seq


def _check_gradients(params, cfg, tokens, *layout_and_devices, fp16=True):
    """The loss through the pipeline is the sequential one, bit for bit, at the chip's FP16 (unless
    `fp16` is False: one compile less) and with a float32 vector unit; with the latter, so is every
    gradient to float32 summation order. Returns the FP16 pipeline gradient (float32's without
    `fp16`)."""
    if fp16:
        pipe, seq = _gradient_programs(cfg, *layout_and_devices, "w4a4")
        lp, gp = pipe(params, tokens)
        assert float(lp) == float(seq(params, tokens)[0])
        assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(gp))
    pipe, seq = _gradient_programs(cfg, *layout_and_devices, F32)
    lp, gp32 = pipe(params, tokens)
    ls32, gs32 = seq(params, tokens)
    assert float(lp) == float(ls32)
    gaps = {}
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(gp32), jax.tree.leaves(gs32)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        gaps[jax.tree_util.keystr(path)] = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
    assert all(g <= F32_GRADIENT_RTOL for g in gaps.values()), {k: g for k, g in gaps.items() if g > F32_GRADIENT_RTOL}
    return gp if fp16 else gp32


@pytest.mark.parametrize("cards,devices,fp16", [(4, 2, False), pytest.param(16, 2, True, marks=pytest.mark.slow),
                                                pytest.param(16, 16, True, marks=pytest.mark.slow)])
def test_gradients_through_the_pipeline_match_sequential(model, cards, devices, fp16):
    """`cards` cards over `devices` devices (2: the same shard_map pipeline, several cards per
    device, and far fewer device threads to synchronise on 2 cores), 2 micro-batches, 2 output
    cards. The fast path: 4 cards (a layer per card, the vocabulary over two, two cards per
    device), the float32 vector unit only; the slow ones: 16 cards (idle cards between the layers
    and the output layer, the appliance's count), the chip's FP16 as well."""
    params, _ = model
    gp = _check_gradients(params, CFG, jax.random.randint(jax.random.key(9), (4, 9), 0, CFG.vocab_size), cards, 2, 2,
                          devices, fp16=fp16)
    # QAT trains every static step of the transformed model: all get a gradient but the dynamic
    # ones (the online rotations' INT8 inputs: per-row steps from the vector unit, the `*.rot.x`
    # rule) and the sink's query step (position 0 attends to itself alone: its softmax is 1)
    zero = {jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(gp)
            if "'s_" in jax.tree_util.keystr(k) and not np.any(np.asarray(v))}
    assert zero == {"['layers']['attn']['krot']['s_x']", "['layers']['attn']['qrot']['s_x']",
                    "['layers']['attn']['qrot']['s_x0']", "['layers']['attn']['s_q0']",
                    "['layers']['mlp']['rot0']['s_x']", "['layers']['mlp']['rot1']['s_x']"}, zero
    assert sum(jax.tree_util.keystr(k).endswith("0']") for k, _ in jax.tree_util.tree_leaves_with_path(gp)) >= 2


@pytest.mark.slow
@settings(max_examples=8, deadline=None)
@given(d_model=st.sampled_from([16, 40]), layers=st.integers(1, 3), vocab=st.integers(17, 200),
       tied=st.booleans(), micro_batches=st.sampled_from([1, 2, 4]), output_cards=st.integers(1, 3),
       devices=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_pipeline_gradients_on_random_configs(d_model, layers, vocab, tied, micro_batches, output_cards, devices,
                                              seed):
    """Any small decoder, mapping (micro-batches, output cards) and device count."""
    cfg = CFG.replace(n_layers=layers, d_model=d_model, vocab_size=vocab, tied_embeddings=tied)
    cards = layers + output_cards + (layers + output_cards) % devices  # an idle card to split evenly
    k = jax.random.split(jax.random.key(seed), 3)
    params = llama.calibrate(llama.init_params(cfg, k[0]), jax.random.randint(k[1], (2, 16), 0, vocab), cfg, "w4a4")
    _check_gradients(params, cfg, jax.random.randint(k[2], (4, 9), 0, vocab), cards, micro_batches, output_cards,
                     devices)


def test_combine_greedy_breaks_ties_to_lower_vocabulary():
    sched = Schedule(("layers", "output", "output"), 1)
    res = {"max": np.array([[[0.0, 0.0]], [[1.0, 2.0]], [[1.0, 3.0]]]), "arg": np.array([[[0, 0]], [[2, 3]], [[5, 7]]])}
    np.testing.assert_array_equal(combine_greedy(res, sched), [2, 7])


def test_schedule_validation():
    with pytest.raises(ValueError, match="output-layer"):
        Schedule(("layers", "layers"), 2)
    s = Schedule(("layers", "layers", "output", "output"), 3)
    assert s.ticks == 3 + 3 - 1 and s.source_of(3) == 1 and s.depth_of(3) == 2
