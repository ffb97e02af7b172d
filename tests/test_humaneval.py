"""HumanEval harness (models.evaluate.humaneval): execution with time limits, pass@k, sampling, end to end."""

import itertools
import math

import jax
import pytest
from hypothesis import given, strategies as st

from models.evaluate import humaneval as HE
from models import llama
from models.config import get_config
from models.train.data import ByteEncoder
from models.generate import Generator

CFG = get_config("tiny")


@pytest.fixture(scope="module")
def problems():
    return HE.load_problems(3)


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    for p in problems:
        assert HE.check(p, p["canonical_solution"]) == "passed", p["task_id"]
        assert HE.check(p, "    return None\n").startswith("failed"), p["task_id"]
        assert HE.check(p, "    return (\n").startswith("failed: SyntaxError"), p["task_id"]


def test_runaway_code_is_killed_within_the_time_limit(problems):
    assert HE.check(problems[0], "    while True:\n        pass\n", timeout_s=1.0) == "timed out"
    # the memory limit turns a huge allocation into a failure, not a machine-wide problem
    assert HE.check(problems[0], "    x = bytearray(8 << 30)\n").startswith("failed: MemoryError")


def _brute_pass_at_k(n, c, k):
    """Fraction of the k-subsets of n samples (c of them correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@given(st.integers(1, 9).flatmap(lambda n: st.tuples(st.just(n), st.integers(0, n), st.integers(1, n))))
def test_pass_at_k_matches_enumeration(nck):
    n, c, k = nck
    assert math.isclose(HE.pass_at_k(n, c, k), _brute_pass_at_k(n, c, k), rel_tol=1e-9, abs_tol=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="pass@k"):
        HE.pass_at_k(3, 4, 1)
    with pytest.raises(ValueError, match="pass@k"):
        HE.pass_at_k(3, 1, 4)


def test_truncate_at_the_first_stop_sequence():
    assert HE.truncate("    return 1\ndef g():\n    pass") == "    return 1"
    assert HE.truncate("    return 1\n\n# note\nclass A: pass") == "    return 1\n"
    assert HE.truncate("    return 1\n    if x:\n") == "    return 1\n    if x:\n"  # indented: not a stop
    assert HE.truncate("    x = 1") == "    x = 1"


@pytest.fixture(scope="module")
def float_params():
    return llama.init_params(CFG, jax.random.key(0))


def test_sampling_is_reproducible_and_tends_to_greedy(float_params):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    greedy = Generator(float_params, CFG, "float", cache_len=32).generate(prompts, 6).tokens
    gen = Generator(float_params, CFG, "float", cache_len=32, temperature=1.0, seed=0)
    hot = []
    for s in (0, 0, 1):
        gen.seed = s
        hot.append(gen.generate(prompts, 6).tokens)
    assert hot[0] == hot[1] and hot[0] != hot[2]  # same seed, same tokens; another seed, others
    cold = Generator(float_params, CFG, "float", cache_len=32, temperature=1e-6, seed=3).generate(prompts, 6).tokens
    assert cold == greedy
    with pytest.raises(llama.ModelInputError, match="temperature"):
        Generator(float_params, CFG, "float", cache_len=32, temperature=-1.0)


# Synthetic problems in HumanEval's format whose outcome does not depend on the completion: the
# completion lands inside a string literal (always passes) or the test fails whatever it is.
SINK = {"task_id": "synthetic/pass", "prompt": "def f(x):\n    return x\n\n_sink = '''", "entry_point": "f",
        "test": "'''\n\ndef check(candidate):\n    assert candidate(2) == 2\n"}
FAIL = {"task_id": "synthetic/fail", "prompt": "def f(x):\n    return x\n\n_sink = '''", "entry_point": "f",
        "test": "'''\n\ndef check(candidate):\n    assert candidate(2) == 3\n"}


def test_end_to_end_pass_at_k_through_the_generator(float_params):
    res = HE.evaluate(float_params, CFG, "float", ByteEncoder(), [SINK, FAIL], samples=2, temperature=1.0, ks=[1, 2],
                      max_new_tokens=4, batch_size=4, timeout_s=10.0)
    assert [o["passed"] for o in res.outcomes] == [2, 0], res.outcomes
    assert res.pass_at_k == {1: 0.5, 2: 0.5}
    assert res.to_json()["pass_at_k"] == {"pass@1": 0.5, "pass@2": 0.5}
    with pytest.raises(ValueError, match="temperature"):
        HE.evaluate(float_params, CFG, "float", ByteEncoder(), [SINK], samples=2, temperature=0.0)
    with pytest.raises(ValueError, match="context"):
        HE.evaluate(float_params, CFG, "float", ByteEncoder(), [dict(SINK, prompt="#" * 200)], max_new_tokens=4)
