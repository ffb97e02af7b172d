"""The width search (models.search, np-jax search) on the tiny config.

Oracles: every assignment enumerated (the dynamic program's optimum per count vector, the front);
the policy file read back by np_jax.quant.load_policy; the recipe run on the mixed policy itself
(the splice); the model's own forward of the mixed policy (the layer-by-layer forward and the table).
"""

import dataclasses
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from models import llama, recipe as R, search as S
from models.config import get_config
from models.evaluate.perplexity import token_nll
from np_jax.cli import main
from np_jax.quant.policy import load_policy

CFG = get_config("tiny")
OPTIONS = ("w4a4", "a8c8w4", "w8a8")


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.integers(2, 3), st.integers(0, 2 ** 31 - 1))
def test_count_optimal_is_the_best_assignment_of_each_count_vector(n_layers, n_options, seed):
    delta = np.random.default_rng(seed).normal(size=(n_layers, n_options)).round(2)  # ties happen
    got = S.count_optimal(delta)
    brute: dict = {}
    for a in itertools.product(range(n_options), repeat=n_layers):
        c = tuple(int(v) for v in np.bincount(a, minlength=n_options))
        v = float(sum(delta[i, k] for i, k in enumerate(a)))
        brute[c] = min(brute.get(c, np.inf), v)
    assert set(got) == set(brute)
    for c, (v, a) in got.items():
        assert v == pytest.approx(brute[c], abs=1e-9)
        assert tuple(np.bincount(a, minlength=n_options)) == c  # the assignment has those counts
        assert v == pytest.approx(sum(delta[i, k] for i, k in enumerate(a)), abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=12))
def test_pareto_keeps_exactly_the_undominated_points(pts):
    loss, thr = [p[0] for p in pts], [p[1] for p in pts]
    front = S.pareto(loss, thr)

    def dominated(k):
        return any(loss[j] <= loss[k] and thr[j] >= thr[k] and (loss[j], thr[j]) != (loss[k], thr[k])
                   for j in range(len(pts)))
    assert {pts[k] for k in front} == {p for k, p in enumerate(pts) if not dominated(k)}
    assert len({pts[k] for k in front}) == len(front)  # one index per distinct point
    assert [loss[k] for k in front] == sorted(loss[k] for k in front)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=CFG.n_layers, max_size=CFG.n_layers))
def test_choose_meets_its_constraint_and_nothing_better_does(assign_seed):
    rng = np.random.default_rng(sum(assign_seed) + 7 * assign_seed[0])
    pts = [{"ratio": float(r), "throughput": float(t), "fits": bool(f)}
           for r, t, f in zip(rng.uniform(1, 3, 9), rng.uniform(100, 200, 9), rng.random(9) < 0.8)]
    c = S.choose(pts, max_ratio=2.0)
    ok = [p for p in pts if p["fits"] and p["ratio"] <= 2.0]
    assert (c is None) == (not ok)
    if c is not None:
        assert c in ok and all(p["throughput"] <= c["throughput"] for p in ok)
    c = S.choose(pts, min_throughput=150.0)
    ok = [p for p in pts if p["fits"] and p["throughput"] >= 150.0]
    assert (c is None) == (not ok)
    if c is not None:
        assert c in ok and all(p["ratio"] >= c["ratio"] for p in ok)


def test_policy_file_reads_back_as_the_same_policy(tmp_path):
    assign = [0, 2, 1, 2, 2, 0]
    p = S.write_policy(tmp_path / "p.json", OPTIONS, [OPTIONS[a] for a in assign], "mix", "a test")
    loaded, built = load_policy(p), S.assignment_policy(OPTIONS, assign, "mix")
    assert loaded.key() == built.key()
    for i, a in enumerate(assign):
        for role in ("attn.q.w", "attn.x", "attn.kv", "attn.probs", "mlp.down.x", "mlp.silu", "attn.rot.w"):
            assert loaded(f"layers.{i}.{role}") == built(f"layers.{i}.{role}") == \
                S.POLICIES[OPTIONS[a]](f"layers.{i}.{role}")
    assert loaded.output("w") == S.POLICIES["w8a8"].output("w")
    assert json.loads(p.read_text())["rules"] == [["layers.0.*", "w4a4"], ["layers.2.*", "a8c8w4"],
                                                  ["layers.5.*", "w4a4"]]


@pytest.fixture(scope="module")
def prepared():
    params = llama.init_params(CFG, jax.random.key(0))
    windows = np.asarray(jax.random.randint(jax.random.key(1), (4, 33), 0, CFG.vocab_size), np.int32)
    rec = dataclasses.replace(R.get_recipe("plain"), qk_rotation=False)
    outs = [R.apply(params, CFG, rec, o, windows) for o in OPTIONS]
    return params, windows, rec, outs


def _same(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


def test_splice_is_the_recipe_on_the_mixed_policy(prepared):
    params, windows, rec, outs = prepared
    # options of one weight width: a layer's preparation depends on nothing else, every leaf is exact
    opts, assign = ("w4a4", "a8c8w4"), (0, 1)
    _, mixed = R.apply(params, CFG, rec, S.assignment_policy(opts, assign), windows)
    assert _same(S.splice([outs[0][1], outs[1][1]], assign), mixed)
    # other weight widths: the weights and their steps are exact (the activation steps are calibrated
    # behind the earlier layers' quantized weights; the search's verification measures that)
    assign = (0, 2)
    _, mixed = R.apply(params, CFG, rec, S.assignment_policy(OPTIONS, assign), windows)
    sp = S.splice([p for _, p in outs], assign)
    for lin in ("q", "k", "v", "o"):
        assert _same(sp["layers"]["attn"][lin]["w"], mixed["layers"]["attn"][lin]["w"])
        assert _same(sp["layers"]["attn"][lin]["s_w"], mixed["layers"]["attn"][lin]["s_w"])


def test_layerwise_forward_and_table_are_the_models_forward(prepared):
    params, windows, rec, outs = prepared
    cfg = outs[-1][0]
    lm = S.LayerwiseModel(cfg, OPTIONS, [p for _, p in outs])
    base, table = lm.table(windows, batch_size=3)  # a short last batch
    assert table.shape == (CFG.n_layers, 3) and np.all(table[:, -1] == 0)
    for assign in [(2, 2), (0, 2), (2, 1), (1, 0)]:
        pol = S.assignment_policy(OPTIONS, assign)
        logits = llama.forward(S.splice([p for _, p in outs], assign), jnp.asarray(windows[:, :-1]), cfg, pol)
        want = float(np.asarray(token_nll(logits, jnp.asarray(windows[:, 1:])), np.float64).mean())
        got = lm.nll(assign, windows, batch_size=3)
        assert got == pytest.approx(want, rel=1e-6)
        if sum(a != 2 for a in assign) == 1:  # one layer off the base: the table's entry
            i = next(i for i, a in enumerate(assign) if a != 2)
            assert got - base == pytest.approx(table[i, assign[i]], abs=1e-6)
        if assign == (2, 2):
            assert got == pytest.approx(base, rel=1e-9)


def test_search_command_on_tiny(tmp_path, capsys):
    out = tmp_path / "s"
    # the plain recipe (round to nearest, no transforms): the command's work is the same, its preparations cheap
    rc = main(["search", "--model", "tiny", "--recipe", "plain", "--options", "w4a4,w8a8", "--windows", "1",
               "--batch-size", "1", "--verify", "1", "--eval-windows", "1", "--out-dir", str(out), "--json"])
    r = json.loads(capsys.readouterr().out)
    cands = r["candidates"]
    assert len(cands) == CFG.n_layers + 1  # count vectors of 2 options over the layers
    assert [t["qk_rotation"] for t in r["tables"]] == [False]  # one table; the plain recipe has no rotation
    assert all(np.all(np.asarray(t["delta_nll"])[:, -1] == 0) for t in r["tables"])
    front = [cands[k] for k in r["front"]]
    for c in cands:  # nothing fitting beats a front point on both axes
        assert not any(c["fits"] and c["ratio"] < f["ratio"] and c["throughput"] > f["throughput"] for f in front)
    floor = 0.85 * r["uniform"]["w4a4"]["throughput"]
    ch = r["chosen"]
    assert rc == (0 if ch else 1)
    if ch:
        assert ch["throughput"] >= floor and ch["fits"]
        assert not any(c["fits"] and c["throughput"] >= floor and c["ratio"] < ch["ratio"] for c in cands)
        pol = load_policy(ch["policy_file"])
        for i, o in enumerate(ch["assignment"]):
            assert pol(f"layers.{i}.attn.x") == S.POLICIES[o](f"layers.{i}.attn.x")
    assert r["verified"] and all(v["measured"]["vs_float"] > 0 for v in r["verified"])
    # the measurement decides: the verified point meeting the constraint with the best measured ratio
    ok = [v for v in r["verified"] if v["fits"] and v["throughput"] >= floor]
    vc = r["verified_choice"]
    assert (vc is None) == (not ok)
    if vc:
        assert vc["measured"]["vs_float"] == min(v["measured"]["vs_float"] for v in ok)
    with Image.open(out / "front.png") as im:
        assert im.size[0] >= 1200


def test_one_table_with_the_recipes_rotation_and_every_count_vector_once():
    # the recipe rotates q and k at every quantized cache: one table, every option in it
    assert S.tables_needed("rotate-gptq", OPTIONS, 30) == [(True, (0, 1, 2))]
    fixed = dataclasses.replace(R.get_recipe("rotate-gptq"), qk_rotation=False)
    assert S.tables_needed(fixed, OPTIONS, 30) == [(False, (0, 1, 2))]
    rng = np.random.default_rng(0)
    delta = rng.normal(size=(CFG.n_layers, 3)) * 0.1
    delta[:, -1] = 0
    by_qk = {}
    for qk in (True, False):
        t = S.Table((0, 1, 2), delta, 2.0, qk)
        cands = S.search([t], OPTIONS, float_nll=1.8, shape=CFG, users=4, context=2048, cards=4)
        counts = {tuple(c["counts"].values()) for c in cands}
        assert len(cands) == len(counts) == len(S.count_optimal(delta))  # every count vector, once
        for c in cands:
            assert c["qk_rotation"] == qk
            idx = [OPTIONS.index(o) for o in c["assignment"]]
            d = sum(delta[i, k] for i, k in enumerate(idx))
            assert c["delta_nll"] == pytest.approx(d) and c["ratio"] == pytest.approx(np.exp(2.0 + d - 1.8))
            assert c["delta_nll"] == pytest.approx(min(
                sum(delta[i, k] for i, k in enumerate(a)) for a in itertools.product(range(3), repeat=CFG.n_layers)
                if sorted(a) == sorted(idx)))
        by_qk[qk] = {tuple(c["assignment"]): c for c in cands}
    # each candidate is charged the rotation its table's models run: its phases cost latency
    assert by_qk[True].keys() == by_qk[False].keys()
    for k, c in by_qk[True].items():
        assert c["latency_ms"] > by_qk[False][k]["latency_ms"]
        assert c["throughput"] <= by_qk[False][k]["throughput"]
