"""Per-layer precision (a policy giving layers their own widths, np_jax.quant.policy): the model,
its serving form, training and the appliance honor it; the mapping and the cost model charge it.

Oracles: a mixed model's forward is its layers run one by one, each at the uniform preset it
takes its widths from (`llama.layer` with that preset); the pipeline is the sequential model;
uniform policies are unchanged (every other test file)."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models import llama
from models.appliance import build_cards, card_list, card_programs, pipelined_logits
from models.config import get_config
from np_jax import cost
from np_jax.appliance.mapping import map_model
from np_jax.appliance.pipeline import card_mesh, run_pipeline
from np_jax.cli import main
from np_jax.quant import get_policy
from np_jax.quant.policy import load_policy

# the transforms' online products and the sink prefix included, 4 layers
CFG = get_config("tiny").replace(n_layers=4, qk_rotation=True, down_rotation=(4, 32), sink_positions=1)
PRESETS = ("w4a4", "w8a8", "a8c8w4", "w4a4-p8d8")


def policy_file(tmp_path, per_layer, base="w4a4", name="mixed"):
    """A policy file giving layer i the widths of preset per_layer[i]."""
    f = tmp_path / f"{name}.json"
    f.write_text(json.dumps({"name": name, "base": base,
                             "rules": [[f"layers.{i}.*", p] for i, p in enumerate(per_layer)]}))
    return str(f)


@pytest.fixture(scope="module")
def params():
    p = llama.init_params(CFG, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    return p, toks


def _calibrated(params, policy):
    p, toks = params
    return llama.calibrate(p, toks, CFG, policy)


@functools.partial(jax.jit, static_argnums=3)
def _layer(lp, x, pos, preset):
    """The uniform model's own layer at `preset`, compiled alone."""
    return llama.layer(lp, x, pos, None, CFG, llama.resolve(preset, CFG))


def _oracle_forward(p, toks, per_layer, policy):
    """Layer by layer, each at its preset (the uniform model's own layer), the head at `policy`'s."""
    prec = llama.resolve(policy, CFG)
    x = llama.embed(p, toks, prec)
    pos = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
    for i, preset in enumerate(per_layer):
        lp = jax.tree.map(lambda a: a[i], p["layers"])
        y, _ = _layer(lp, x, pos, preset)
        x = y.astype(x.dtype)
    return llama.head(p, x, CFG, prec)


def _check_forward(tmp_path, params, per_layer):
    policy = get_policy(policy_file(tmp_path, per_layer))
    p = _calibrated(params, policy)
    toks = params[1]
    got = llama.forward(p, toks, CFG, policy)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(_oracle_forward(p, toks, per_layer, policy)))
    # the serving form (codes at each layer's width) and the prefill step give the same bits
    serving = llama.prepare_serving(p, CFG, policy)
    B, L = toks.shape
    cache = llama.init_cache(CFG, B, L, policy)
    served, _ = llama.step(serving, toks, jnp.broadcast_to(jnp.arange(L), (B, L)), cache, CFG, policy)
    np.testing.assert_array_equal(np.asarray(served), np.asarray(got))
    return policy, p


def test_a_mixed_forward_is_its_layers_at_their_presets_and_serves_the_same(tmp_path, params):
    policy, p = _check_forward(tmp_path, params, ["w8a8", "w4a4", "w4a4", "w8a8"])
    assert llama.resolve(policy, CFG).groups == ((0, 3), (1, 2))  # one compiled layer per width
    # the widths reached the parameters: layer 0's weight steps are INT8's, layer 1's INT4's
    s = np.asarray(p["layers"]["mlp"]["up"]["s_w"])
    assert np.all(s[0] < s[1])
    # and they matter: the uniform model gives other logits
    assert not np.array_equal(np.asarray(llama.forward(p, params[1], CFG, policy)),
                              np.asarray(llama.forward(p, params[1], CFG, "w4a4")))


@pytest.mark.slow
@settings(max_examples=6, deadline=None)
@given(per_layer=st.lists(st.sampled_from(PRESETS), min_size=CFG.n_layers, max_size=CFG.n_layers))
def test_any_per_layer_assignment_matches_the_oracle(tmp_path_factory, params, per_layer):
    _check_forward(tmp_path_factory.mktemp("p"), params, per_layer)


@pytest.mark.slow
def test_training_gradients_reach_every_layer_at_its_width(tmp_path, params):
    """QAT through the mixed model: the forward is the serving forward (above) and every layer's
    weight step gets a gradient."""
    policy = get_policy(policy_file(tmp_path, ["w8a8", "w4a4", "w4a4", "w8a8"]))
    p = _calibrated(params, policy)
    toks = params[1]
    g = jax.grad(lambda q: jnp.mean(llama.forward(q, toks, CFG, policy) ** 2))(p)
    assert np.all(np.abs(np.asarray(g["layers"]["mlp"]["down"]["s_w"])).sum(-1) > 0)


@pytest.mark.parametrize("forms", [("stacked",), pytest.param(("resident", "training"), marks=pytest.mark.slow)],
                         ids=["stacked", "resident+training"])
def test_the_appliance_runs_a_mixed_policy_as_the_sequential_model(tmp_path, params, forms):
    """Cards holding layers of different widths (prefill through the pipeline with KV caches, the
    card-stacked form over 2 devices; slow: the resident per-card form and the training forward
    through the pipeline, each covered for uniform policies in tests/test_appliance.py), bit for
    bit."""
    policy = get_policy(policy_file(tmp_path, ["w8a8", "w4a4", "a8c8w4", "w4a4"]))
    p = _calibrated(params, policy)
    users, L, S = 4, 6, 8
    mapping = map_model(CFG, policy, users=users, context=S, cards=8, micro_batches=2, output_cards=2, strict=False)
    assert mapping.precision == policy and len(mapping.layer_cards) == CFG.n_layers
    serving = llama.prepare_serving(p, CFG, policy)
    toks = jax.random.randint(jax.random.key(7), (users, L), 0, CFG.vocab_size)
    cache = llama.init_cache(CFG, users, S, policy)
    ref, _ = llama.step(serving, toks, jnp.broadcast_to(jnp.arange(L), (users, L)), cache, CFG, policy)
    layer_fn, head_fn = card_programs(CFG, policy, mapping, result="logits")
    M = mapping.micro_batches
    x = llama.embed(serving, toks, llama.resolve(policy)).reshape(M, users // M, L, -1)
    aux = {"pos": jnp.broadcast_to(jnp.arange(L), (M, users // M, L))}
    runs = {"stacked": lambda: (2, build_cards(serving, CFG, policy, mapping),
                                {k: jnp.zeros((8, 1, users, S, CFG.n_kv_heads, CFG.head_dim), jnp.int8)
                                 for k in ("k", "v")}, 1),
            "resident": lambda: (1, card_list(serving, CFG, policy, mapping),
                                 [llama.init_cache(CFG, users, S, policy, layers=len(c.layers)) if c.role == "layers"
                                  else {} for c in mapping.cards], 1)}
    for devices, cards, state, axis in (runs[f]() for f in forms if f in runs):
        run = jax.jit(lambda c, x, a, s: run_pipeline(mapping.schedule, card_mesh(devices), layer_fn, head_fn, c, x, a,
                                                      s, user_axis=axis))
        res, _ = run(cards, x, aux, state)
        got = jnp.concatenate([res[c] for c in mapping.schedule.output_cards], -1).reshape(users, L, -1)
        np.testing.assert_array_equal(np.asarray(got)[..., :CFG.vocab_size], np.asarray(ref))
    if "training" in forms:  # training form through the pipeline: the sequential forward's logits
        got = pipelined_logits(p, toks, CFG, policy, mapping, card_mesh(2))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(llama.forward(p, toks, CFG, policy)))


G3B = get_config("granite-3b-northpole")
ROLES = ("attn.q.w", "attn.o.w", "mlp.down.w", "mlp.up.w", "attn.x", "mlp.down.x", "attn.kv")


@settings(max_examples=4, deadline=None)
@given(layer=st.integers(0, G3B.n_layers - 1), role=st.sampled_from(ROLES))
def test_widening_one_role_of_one_layer_never_lowers_its_cards_bytes_or_time(tmp_path_factory, layer, role):
    """From uniform w4a4 (the published mapping's counts held fixed), one layer's role at 8 bits:
    its card holds at least as many bytes, and no predicted stage or step is faster."""
    f = tmp_path_factory.mktemp("w") / "wide.json"
    f.write_text(json.dumps({"base": "w4a4", "rules": [[f"layers.{layer}.{role}", {"bits": 8}]]}))
    wide = load_policy(f)
    run = dict(users=28, context=2048, cards=16, micro_batches=1, output_cards=2, layer_cards=14, strict=False)
    a, b = map_model(G3B, "w4a4", **run), map_model(G3B, wide, **run)
    card = next(c for c in a.layer_cards if layer in c.layers).card
    used = lambda m: m.cards[card].memory.used_RxC  # noqa: E731
    assert np.all(used(b) >= used(a)) and used(b).sum() > used(a).sum()
    pa, pb = cost.predict(G3B, "w4a4", mapping=a, users=28), cost.predict(G3B, wide, mapping=b, users=28)
    for k in ("stage_max_ms_decode", "latency_ms", "prompt_time_s"):
        assert pb[k] >= pa[k] * (1 - 1e-6), k
    assert pb["system_throughput_tok_s"] <= pa["system_throughput_tok_s"] * (1 + 1e-6)


def test_a_uniform_policy_file_predicts_as_its_preset(tmp_path):
    """A file that only names a base gives the preset's mapping and figures exactly (Table I)."""
    f = tmp_path / "same.json"
    f.write_text(json.dumps({"name": "same", "base": "w4a4", "rules": []}))
    assert cost.predict(G3B, load_policy(f)) == {**cost.predict(G3B, "w4a4"), "precision": "same"}


def test_a_mixed_policy_charges_each_card_its_own_layers():
    """Granite-3B with its first and last layers at 8 bits on the published mapping: the other
    cards cost what they cost at w4a4, the two wide cards more (their stage time sets the pace)."""
    from np_jax.quant.policy import POLICIES, PrecisionPolicy
    wide = PrecisionPolicy("edges8", (("layers.0.*", POLICIES["w8a8"]), (f"layers.{G3B.n_layers - 1}.*",
                                                                         POLICIES["w8a8"]))
                           + POLICIES["w4a4"].rules)
    run = dict(users=28, context=2048, cards=16, micro_batches=1, output_cards=2, layer_cards=14, strict=False)
    a, b = map_model(G3B, "w4a4", **run), map_model(G3B, wide, **run)
    sa, sb = cost.mapping_structure(a), cost.mapping_structure(b)
    assert len(sb["card_work_groups"]) == 2 and np.array_equal(sb["card_work"], sa["card_work"])
    assert cost.predict(G3B, wide, mapping=b)["stage_max_ms_decode"] > cost.predict(G3B, "w4a4",
                                                                                     mapping=a)["stage_max_ms_decode"]


@pytest.mark.parametrize("content, message", [
    ("{", "not readable JSON"),
    ('{"base": "w5"}', "unknown preset 'w5'"),
    ('{"base": "w4a4", "rules": [["layers.0.*", {"bits": 3}]]}', "bits must be 2, 4, 8"),
    ('{"base": "w4a4", "rules": [["layers.0.*", {"width": 8}]]}', "a width is a preset's name"),
    ('{"rules": "x"}', "rules must be a list"),
    ('{"base": "w4a4", "colour": 1}', "expected an object"),
    ('{}', "no rules and no base"),
])
def test_a_bad_policy_file_is_refused_with_its_name_and_fault(tmp_path, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        load_policy(f)
    assert str(f) in str(e.value)


def test_the_qk_rotation_follows_any_layer_with_a_quantized_cache(tmp_path):
    """The online q/k Hadamard is the model's: on if any layer's KV cache is quantized."""
    from models.recipe import get_recipe
    r = get_recipe("rotate-gptq")
    assert r.qk_rotation_for(policy_file(tmp_path, ["float", "float", "w8a8", "float"], base="float"), CFG.n_layers)
    assert r.qk_rotation_for(policy_file(tmp_path, ["w8a8", "w4a4", "w8a8", "w8a8"]), CFG.n_layers)
    assert not r.qk_rotation_for(policy_file(tmp_path, ["float"] * 4, base="w4a4", name="f"), CFG.n_layers)


def test_layers_may_differ_in_widths_not_in_what_they_hold(tmp_path):
    f = policy_file(tmp_path, ["w4a4", "a8c8w4-dyn", "w4a4", "w4a4"])  # dynamic inputs in layer 1 only
    with pytest.raises(ValueError, match="layer 1's .* dynamic and layer 0's static"):
        llama.resolve(f, CFG)


def test_the_commands_take_a_policy_file(tmp_path, capsys):
    f = tmp_path / "first8.json"  # (a whole layer at w8a8 does not fit a card of the 3B model: `map` says so)
    f.write_text(json.dumps({"name": "first8", "base": "w4a4", "rules": [["layers.0.mlp.down.x", {"bits": 8}]]}))
    f = str(f)
    assert main(["map", "--precision", f, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["precision"] == "first8" and out["fits"]
    assert main(["perf", "--precision", f, "--json"]) == 0
    wide = json.loads(capsys.readouterr().out)
    assert main(["perf", "--json"]) == 0
    narrow = json.loads(capsys.readouterr().out)
    key = next(k for k in ("northpole", "predicted") if k in wide) if any(
        k in wide for k in ("northpole", "predicted")) else None
    w, n = (wide[key], narrow[key]) if key else (wide, narrow)
    assert w["latency_ms"] >= n["latency_ms"]
    assert main(["map", "--precision", str(tmp_path / "missing.json")]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("role", ["attn.probs", "attn.kv", "attn.qk.q"])
def test_float_and_integer_attention_operands_do_not_mix(tmp_path, role):
    f = tmp_path / "mix.json"
    f.write_text(json.dumps({"name": "mix", "base": "w8a8", "rules": [[f"*.{role}", "float"]]}))
    with pytest.raises(ValueError, match=rf"layer 0's {re.escape(role)} float; .* VMM"):
        llama.resolve(load_policy(f), CFG)
    llama.resolve("w8a8", CFG)  # a preset passes


@pytest.mark.parametrize("pattern, role", [("layers.1.attn.q.w", "layer 1's attn.q.w"), ("*.mlp.down.x", "layer 0's mlp.down.x"),
                                           ("*.attn.kv", "layer 0's attn.kv"), ("lm_head.w", "lm_head.w")])
def test_a_float_vmm_operand_is_refused_before_any_work(tmp_path, capsys, pattern, role):
    """A quantized policy that leaves an operand of a VMM product float is refused with one line,
    by the library and by every command, before anything is prepared or planned."""
    from np_jax.cli import main
    f = tmp_path / "f.json"
    f.write_text(json.dumps({"name": "f", "base": "w4a4", "rules": [[pattern, "float"]]}))
    with pytest.raises(ValueError, match=f"{re.escape(role)} float; .* VMM"):
        llama.resolve(load_policy(f), CFG)
    for argv in (["map"], ["perf", "--model", "tiny", "--context", "64"], ["run", "--model", "tiny", "--new-tokens", "1"],
                 ["eval", "--model", "tiny", "--windows", "1"], ["train", "--model", "tiny", "--out", str(tmp_path / "r")]):
        assert main(argv + ["--precision", str(f)]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(f"{re.escape(role)} float; .* VMM", err[0]), (argv, err)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())  # nothing trained or saved
    f.write_text(json.dumps({"name": "f", "base": "w4a4", "rules": [["*.mlp.silu", "float"]]}))
    llama.resolve(load_policy(f), CFG)  # SiLU runs on the activation unit: it may stay float


def test_a_policy_answers_every_role_with_its_first_matching_rule_however_often_asked(tmp_path):
    """The policy remembers each role's width once matched (the planner asks thousands of times):
    the answer is still the first matching rule, in every layer view (`at`), and a policy made
    with other rules (`replace`) does not inherit the remembered answers."""
    import dataclasses
    import fnmatch

    from np_jax.quant import PrecisionPolicy, load_policy

    def first_match(policy, role):  # the rules read directly, nothing remembered
        for pattern, tq in policy.rules:
            if fnmatch.fnmatchcase(role, pattern):
                return first_match(tq, role) if isinstance(tq, PrecisionPolicy) else tq
        raise KeyError(role)

    pol = load_policy(policy_file(tmp_path, ["w4a4", "a8c8w4", "w8a8-pdd", "w4a4-p8d8"], base="w8a8"))
    roles = [f"layers.{i}.{r}" for i in range(5) for r in ("attn.q.w", "attn.x", "attn.kv", "attn.probs", "mlp.down.x",
                                                           "mlp.down.w", "rot.x", "attn.q.x0")] + ["lm_head.w", "lm_head.x"]
    for _ in range(2):  # asked again: the remembered answer
        assert [pol(r) for r in roles] == [first_match(pol, r) for r in roles]
    for i in range(5):
        view = pol.at(i)
        assert view.layer("attn.kv") == first_match(pol, f"layers.{i}.attn.kv") == pol(f"layers.{i}.attn.kv")
    other = dataclasses.replace(pol, rules=(("*", pol("layers.0.attn.q.w")),))
    assert all(other(r) == pol("layers.0.attn.q.w") for r in roles)
    assert [pol(r) for r in roles] == [first_match(pol, r) for r in roles]
