"""The rack planner's choice of micro-batches: never beaten on both throughput and latency by a
candidate it could have chosen (each micro-batch count planned explicitly is the oracle)."""

import pytest
from hypothesis import example, given, settings, strategies as st

from models.config import get_config
from np_jax import cost


def _plan(model, precision, **kw):
    try:
        return cost.plan_instance(get_config(model), precision, **kw)
    except ValueError:
        return None


@settings(max_examples=6)
@given(model=st.sampled_from([("granite-3b-northpole", "w4a4"), ("granite-3b-northpole", "a8c8w4"),
                              ("smollm2-135m", "a8c8w4")]),
       users=st.integers(1, 36), context=st.sampled_from([256, 1024, 2048, 3072]),
       cards=st.sampled_from([16, 40, 288]))
@example(model=("granite-3.3-8b", "a8c8w4"), users=28, context=2048, cards=288)  # docs/performance.md's plan
def test_the_planners_choice_is_never_beaten_on_both_throughput_and_latency(model, users, context, cards):
    kw = dict(users=users, context=context, total_cards=cards)
    chosen = _plan(*model, **kw)
    divisors = [m for m in range(1, users + 1) if users % m == 0]
    others = {m: _plan(*model, micro_batches=m, **kw) for m in divisors}
    if chosen is None:  # nothing fits: no micro-batch count may fit either
        assert all(p is None for p in others.values())
        return
    assert chosen["micro_batches_tried"] == divisors
    assert others[chosen["micro_batches"]]["throughput_tok_s_instance"] == pytest.approx(
        chosen["throughput_tok_s_instance"])
    for m, p in others.items():
        if p is None:
            continue
        better = p["throughput_tok_s_instance"] > chosen["throughput_tok_s_instance"] * (1 + 1e-6)
        faster = p["latency_ms"] < chosen["latency_ms"] * (1 - 1e-6)
        assert not (better and faster), (m, chosen["micro_batches"])


@pytest.mark.parametrize("zero", ["total_cards", "cards_per_server", "prompt_tokens", "gen_tokens", "micro_batches"])
def test_a_zero_count_is_refused_not_taken_for_the_default(zero):
    """0 is a value, not "unset": the planner refuses it instead of silently planning the default."""
    with pytest.raises(ValueError):
        cost.plan_instance(get_config("granite-3b-northpole"), "w4a4", users=28, context=2048, **{zero: 0})
