"""The one mapping: execution, the memory report, the cost model and the planner read the same
`Mapping`; the mapper's choices (micro-batches, output-layer cards, layer cards) are sound."""

import json

import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models import llama
from models.appliance import build_cards, card_precision
from models.config import get_config
from np_jax import cost
from np_jax.appliance.mapping import (LAYER_PHASES, default_micro_batches, layer_phase_bytes, map_model,
                                      scratch_core_bytes)
from np_jax.cli import main
from np_jax.spec import APPLIANCE

G3B = get_config("granite-3b-northpole")
SMOL = get_config("smollm2-135m")
TINY = get_config("tiny")


def test_execution_uses_the_mappings_own_tiling_objects():
    params = llama.init_params(TINY, jax.random.key(0))
    mapping = map_model(TINY, "w4a4", users=4, context=16, cards=6, micro_batches=2, output_cards=2)
    serving = llama.prepare_serving(params, TINY, "w4a4", tilings=mapping.tilings)
    for name, t in mapping.tilings.items():
        blk, lin = name.split(".")
        assert serving["layers"][blk][lin]["tw"].tiling is t, name  # the object itself, not a re-derived equal one
    cards = build_cards(serving, TINY, "w4a4", mapping)
    assert cards["layers"]["attn"]["q"]["tw"].tiling is mapping.tilings["attn.q"]
    assert cards["output"]["tw"].tiling is mapping.output_tiling
    # training's integer forward tiles its weights with the same objects
    prec = card_precision(TINY, "w4a4", mapping)
    assert all(prec.tiling(n) is t for n, t in mapping.tilings.items())
    assert prec.tiling("lm_head") is mapping.output_tiling


def test_map_run_and_perf_report_the_same_bytes_per_core(capsys):
    assert main(["map", "--json"]) == 0
    mapped = [c["fullest_core_bytes"] for c in json.loads(capsys.readouterr().out)["cards"]]
    assert main(["perf", "--json"]) == 0
    perf = json.loads(capsys.readouterr().out)["card_core_bytes"]
    assert main(["run", "--model", "granite-3b-northpole", "--users", "28", "--cache-len", "2048", "--new-tokens",
                 "1024", "--dry-run", "--json"]) == 0
    run = json.loads(capsys.readouterr().out)["card_core_bytes"]
    assert mapped == perf == run and len(mapped) == 16 and max(mapped) <= 768 * 1024
    published = map_model(G3B, "w4a4", users=28, context=2048, micro_batches=14)
    assert mapped == published.card_bytes()  # the search chooses HPEC24's mapping for the published run


def test_default_micro_batches_follow_the_rule_with_two_output_cards():
    m = map_model(G3B, "w4a4", users=28, context=2048, cards=15, strict=False)
    assert len(m.output_cards) == 2 and len(m.layer_cards) == 13
    assert m.micro_batches == default_micro_batches(28, 13) == 7
    assert not m.fits  # 14 layers on 13 cards: one card holds two
    chosen = cost.predict(G3B, "w4a4", cards=15)
    assert not chosen["fits"] and 0 < chosen["bytes_over"] <= m.bytes_over()


def test_candidate_structures_are_what_the_ledgers_give():
    structs = cost.candidate_structures(SMOL, "w4a4", users=12, context=512, cards=8)
    assert len(structs) > 20
    for s in structs[:: max(1, len(structs) // 12)]:
        m = map_model(SMOL, "w4a4", users=12, context=512, cards=8, micro_batches=s["micro_batches"],
                      output_cards=s["output_cards"], layer_cards=s["layer_cards"], strict=False)
        got = cost.mapping_structure(m)
        assert m.fits == s["fits"] and got["free"] == s["free"] and m.bytes_over() == s["bytes_over"], s
        for k in ("n_stages", "layers_max", "output_cards", "out_cols"):
            assert got[k] == s[k], (k, s)
        np.testing.assert_array_equal(got["card_work"], s["card_work"])


@settings(max_examples=12)
@given(model=st.sampled_from(["granite-3b-northpole", "smollm2-135m"]), m=st.sampled_from([1, 2, 7, 14]),
       cards=st.integers(3, 18))
def test_more_cards_are_never_predicted_slower(model, m, cards):
    cfg = get_config(model)
    a = cost.predict(cfg, "w4a4", users=28, micro_batches=m, cards=cards)
    b = cost.predict(cfg, "w4a4", users=28, micro_batches=m, cards=cards + 1)
    if a["fits"] and b["fits"]:
        assert b["system_throughput_tok_s"] >= a["system_throughput_tok_s"] * (1 - 1e-6), (a["mapping"], b["mapping"])
    assert b["bytes_over"] <= a["bytes_over"]  # a card more never overflows more, nor stops a model fitting
    assert b["fits"] or not a["fits"]


@settings(max_examples=12)
@given(users=st.integers(1, 60), more=st.integers(1, 8))
def test_more_users_never_lower_the_latency(users, more):
    a = cost.predict(SMOL, "w4a4", users=users, micro_batches=1)
    b = cost.predict(SMOL, "w4a4", users=users + more, micro_batches=1)
    assert a["fits"] and b["fits"]
    assert b["latency_ms"] >= a["latency_ms"] * (1 - 1e-6), (a["mapping"], b["mapping"])


@settings(max_examples=10)
@given(m=st.sampled_from([1, 2]), users=st.integers(1, 20), more=st.integers(1, 6))
def test_more_users_never_predict_a_faster_step_fitting_or_not(m, users, more):
    """granite-3b at w4a4 on 16 cards stops fitting between 28 and 30 users per micro-batch: the
    step and the per-user speed must not improve across that boundary either."""
    a = cost.predict(G3B, "w4a4", users=users * m + 18, micro_batches=m)
    b = cost.predict(G3B, "w4a4", users=(users + more) * m + 18, micro_batches=m)
    assert b["inter_token_ms"] >= a["inter_token_ms"] * (1 - 1e-6), (a["mapping"], b["mapping"])
    assert b["latency_ms"] >= a["latency_ms"] * (1 - 1e-6), (a["mapping"], b["mapping"])
    assert b["bytes_over"] >= a["bytes_over"] and (a["fits"] or not b["fits"])


@pytest.mark.parametrize("users, micro_batches, cards", [(30, 1, 16), (28, None, 8)])
def test_when_nothing_fits_the_least_overflowing_mapping_is_returned(users, micro_batches, cards):
    """Against brute force: every (output cards, layer cards) mapped with its ledgers; the result
    overflows by the least any of them does, and says it does not fit."""
    p = cost.predict(G3B, "w4a4", users=users, micro_batches=micro_batches, cards=cards)
    assert not p["fits"] and "over by" in p["error"] and "DOES NOT FIT" in p["mapping"]
    ms = [micro_batches] if micro_batches else [d for d in range(1, users + 1) if users % d == 0]
    least = min(map_model(G3B, "w4a4", users=users, context=2048, cards=cards, micro_batches=mb, output_cards=h,
                          layer_cards=n, strict=False).bytes_over()
                for mb in ms for h in range(1, cards) for n in range(1, min(cards - h, G3B.n_layers) + 1))
    assert least > 0 and p["bytes_over"] == least


def test_the_chosen_mapping_is_the_best_of_every_fitting_mapping():
    """Against brute force: every (micro-batches, output cards, layer cards) mapped and evaluated."""
    kw = dict(users=12, context=512, cards=6)
    run = dict(users=12, context=512, prompt_tokens=256, gen_tokens=256)
    best = cost.predict(SMOL, "w4a4", cards=6, **run)["system_throughput_tok_s"]
    seen = 0
    for m in (1, 2, 3, 4, 6, 12):
        for h in range(1, 6):
            for n_lc in range(1, 7 - h):
                mp = map_model(SMOL, "w4a4", micro_batches=m, output_cards=h, layer_cards=n_lc, strict=False, **kw)
                if mp.fits:
                    seen += 1
                    t = cost.predict(SMOL, "w4a4", mapping=mp, **run)["system_throughput_tok_s"]
                    assert t <= best * (1 + 1e-6), mp.one_line()
    assert seen > 10


@settings(max_examples=8)
@given(model=st.sampled_from(["granite-3b-northpole", "granite-3.3-8b", "llama-70b"]), users=st.integers(1, 40),
       context=st.sampled_from([512, 2048, 4096]), per_layer=st.integers(2, 4))
def test_a_split_layer_is_spread_evenly_over_its_cards(model, users, context, per_layer):
    """Each card of a split layer holds an equal share of the layer's bytes (up to one column block
    of a split matrix at each end), so every card keeps the same room for prefill scratch; a
    first card packed full would leave the prefill one token per pass."""
    cfg = get_config(model)
    m = map_model(cfg, "a8c8w4", users=users, context=context, cards=cfg.n_layers * 8 + 8, micro_batches=users,
                  layer_cards=cfg.n_layers * per_layer, strict=False)
    layer = sum(layer_phase_bytes(cfg, "a8c8w4", users, context))
    scratch = scratch_core_bytes(cfg, "a8c8w4", 1)
    assert m.cards_per_layer >= per_layer and len(m.layer_cards) == cfg.n_layers * m.cards_per_layer
    column = max(t.kb for t in m.tilings.values()) + 4  # a block column at <= 8 bits, its ceil, an FP16 bias
    share = layer / m.cards_per_layer + scratch
    for c in m.layer_cards:
        assert c.memory.fullest_core()[1] <= share + 2 * column, (c.card, c.parts)
    if m.cards_per_layer > per_layer:  # more cards than asked only where the asked ones cannot hold it
        assert layer / (m.cards_per_layer - 1) + scratch > APPLIANCE.chip.core_sram_bytes - 2 * column


def test_rack_planner_reads_a_mapping_that_splits_layers():
    r = cost.plan_instance(get_config("granite-3.3-8b"), "a8c8w4")
    assert r["cards_per_layer"] == 2 and "2 per layer" in r["mapping"]
    m = map_model(get_config("granite-3.3-8b"), "a8c8w4", users=28, context=2048, cards=r["cards_per_instance"],
                  micro_batches=r["micro_batches"], output_cards=r["output_cards"], layer_cards=r["layer_cards"])
    assert m.fits and not m.executable and sum(c.parts[-1][0] == len(LAYER_PHASES) - 1 for c in m.layer_cards) == 40
    with pytest.raises(ValueError, match="whole layers per card"):
        from models.appliance import schedule_of

        schedule_of(m)
