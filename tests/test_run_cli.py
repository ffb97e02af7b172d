"""`np-jax run` as a command: bad input refused before JAX starts or the weights load, the devices
asked for made before JAX's backend starts, a checkpoint served with its own model and tokens, the
echoed prompt never glued to an error, the mapping explained, every default in `--help`."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from np_jax.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["run", "--model", "tiny", "--new-tokens", "3", "--prompt", "def f(x):"]


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load weights or a tokenizer fails the test: the error must come first."""
    import models.io.load as load

    def refuse(*a, **k):
        raise AssertionError("loaded a model before refusing the input")

    monkeypatch.setattr(load, "load_model", refuse)
    monkeypatch.setattr(load, "model_encoder", refuse)


def _one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.startswith("np-jax run: error: ") and "\n" not in err and cap.out == "", cap
    return err


@pytest.mark.parametrize("extra, msg", [
    (["--prompt", ""], "--prompt 1 is empty"),
    (["--prompt", "a", "--prompt", ""], "--prompt 2 is empty"),
    (["--temperature", "inf"], "argument --temperature: must be a finite number >= 0, got inf"),
    (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0, got nan"),
    (["--temperature", "-0.5"], "argument --temperature: must be a finite number >= 0, got -0.5"),
    (["--temperature", "hot"], "argument --temperature: must be a number, got 'hot'"),
    (["--seed", str(2**63)], "argument --seed: must lie in [-2**63, 2**63)"),
    (["--devices", "3"], "--devices 3: 16 cards cannot be split evenly over 3 devices"),
    (["--single-device", "--devices", "2"], "--single-device runs no appliance"),
    (["--checkpoint", "runs/none", "--recipe", "plain"], "a --checkpoint is served as it was trained"),
    (["--checkpoint", "runs/none", "--recipe-option", "calib_windows=64"],
     "--recipe-option makes a model from the float one; a --checkpoint is served as it was trained"),
    (["--recipe-option", "damp=1"], "argument --recipe-option: recipe option 'damp=1' is not KEY=VALUE"),
    (["--recipe-option", "gptq_damp_select=maybe"], "'maybe' is not a bool"),
    (["--recipe-option", "gptq_damp=0"], "gptq_damp must be in (0, 10)"),
])
def test_bad_flags_are_refused_before_anything_starts(capsys, no_loading, extra, msg):
    """The default model (SmolLM2, whose loading takes 20 s) is never touched: these need no file."""
    err = _one_line_error(capsys, ["run", *extra])
    assert msg in err, err


@pytest.mark.parametrize("extra, msg", [
    (["--chat"], "--chat needs a GGUF model's chat template; tiny has none"),
    (["--prompt", "x" * 200], "the longest prompt (200 tokens) + 3 new tokens needs 202 cache positions; the cache "
                              "holds 128"),
    (["--cards", "32", "--devices", "32"], "--devices 32: asked for 32 devices; JAX started with 16 CPU device(s); "
                                           "virtual CPU devices can only be requested"),
])
def test_bad_plans_are_refused_before_loading(capsys, no_loading, extra, msg):
    """Checks that need the model's shape (its context, its tokens, the mapping) come before its weights."""
    err = _one_line_error(capsys, TINY + extra)
    assert msg in err, err


@pytest.fixture(scope="module")
def parser():
    from np_jax.cli import build_parser

    return build_parser()


@settings(max_examples=50)
@given(t=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10, 10).map(float))
def test_temperature_flag_takes_exactly_the_finite_non_negative_numbers(parser, t):
    if math.isfinite(t) and t >= 0:
        assert parser.parse_args(["run", "--temperature", repr(t)]).temperature == t
    else:
        with pytest.raises(SystemExit):
            parser.parse_args(["run", "--temperature", repr(t)])


def test_devices_are_requested_before_jax_starts(capsys):
    """A fresh process: `--devices 4` makes 4 virtual CPU devices (planning starts JAX's backend, so
    they must be asked for first), and the cards on them give the tokens of the same cards on the
    one device this process's run picks."""
    assert main(TINY + ["--cards", "4", "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["jax_devices"] == 1
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" or "device_count" not in v}
    p = subprocess.run([sys.executable, "-m", "np_jax", *TINY, "--cards", "4", "--devices", "4", "--json"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["jax_devices"] == 4 and rep["cards"] == 4 and rep["backend"] == "cpu"
    assert rep["outputs"] == one["outputs"]


def test_an_error_after_the_echoed_prompt_starts_on_a_new_line(capsys, monkeypatch):
    """The prompt is echoed before generation; whatever fails then is reported after a newline."""
    from models.generate import Generator

    def fail(*a, **k):
        raise ValueError("generation failed")

    monkeypatch.setattr(Generator, "generate", fail)
    assert main(TINY + ["--single-device"]) == 2
    cap = capsys.readouterr()
    assert cap.out == "def f(x):\n" and cap.err.endswith("np-jax run: error: generation failed\n")


# --- checkpoints ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A float run of the tiny model and a second one started from it (`--init-from`), one step
    each (both float: the same compiled step, and the checkpoint's record is what matters here)."""
    from models import train

    root = tmp_path_factory.mktemp("runs")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"m{i}.py").write_text("".join(f"def f{i}_{j}(x):\n    return x + {j}\n" for j in range(20)))
    common = dict(precision="float", batch_size=1, grad_accum=1, seq_len=16, steps=1, data_dirs=(str(corpus),),
                  held_out_fraction=0.25)
    quiet = dict(progress=False, log=lambda s: None)
    train.train(train.TrainConfig(out=str(root / "ft"), model="tiny", **common), **quiet)
    train.train(train.TrainConfig(out=str(root / "ft2"), init_from=str(root / "ft"), **common), **quiet)
    return root / "ft2"


def test_a_checkpoint_is_served_with_its_own_model_and_words(tiny_runs, capsys):
    """A run started from another run records the default model in its settings; `run` still serves
    it as the tiny model with byte tokens (SmolLM2's tokenizer gave ids beyond its 256), and says
    that a float run's checkpoint holds trained weights (no step sizes)."""
    from models.generate import Generator
    from models.io.encoders import ByteEncoder
    from models.train.checkpoint import load_checkpoint

    ck = load_checkpoint(tiny_runs, log=lambda s: None)
    assert ck.train_config.model == "smollm2-135m" and ck.cfg.name == "tiny"  # the record this must cope with
    argv = ["run", "--checkpoint", str(tiny_runs), "--new-tokens", "3", "--prompt", "def f(x):", "--single-device"]
    assert main(argv + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    want = Generator(ck.params, ck.cfg, "float", cache_len=128).generate([list(b"def f(x):")], 3).tokens[0]
    assert rep["model"] == "tiny" and rep["precision"] == "float" and rep["outputs"] == [ByteEncoder().decode(want)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "float-trained weights of checkpoint" in err and "step sizes" not in err, err
    for model, msg in (("smollm2-135m", "is of model tiny, whose tokens are bytes"),
                       ("granite-3b-northpole", "is of model tiny, not granite-3b-northpole")):
        assert msg in _one_line_error(capsys, argv + ["--model", model])


def test_a_qat_checkpoint_is_said_to_hold_step_sizes():
    from types import SimpleNamespace

    from models.commands.run import _how_loaded
    from np_jax.quant import get_policy

    ck = SimpleNamespace(path="runs/qat/60")
    assert _how_loaded(ck, get_policy("w4a4")) == "QAT-trained weights and step sizes of checkpoint runs/qat/60"
    assert "step sizes" not in _how_loaded(ck, get_policy("float"))


# --- the mapping, explained -------------------------------------------------------------------------

def _why(capsys, argv) -> tuple[str, dict]:
    assert main(argv + ["--dry-run", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    return rep["mapping_why"], rep["mapping"]


def test_the_mapping_is_explained_in_one_line(capsys):
    """SmolLM2 for one user (docs/appliance.md): every card's role is accounted for. The output
    layer's 49,152 x 576 INT8 weights (27 MiB: 108 KiB per core of 256) fit one card's 768 KiB
    cores, so any further output cards are there for speed."""
    why, m = _why(capsys, ["run"])
    roles = [c["role"] for c in m["cards"]]
    n_l, n_o, idle = roles.count("layers"), roles.count("output"), roles.count("idle")
    assert "\n" not in why
    assert ("all 30 layers on one card" if n_l == 1 else f"30 layers over {n_l} cards") in why, why
    assert "fits on 1 card" in why and (n_o == 1 or f"split over {n_o} cards" in why), why
    assert f"{idle} idle cards hold nothing and do no work" in why, why
    assert m["micro_batches"] == 1 and "one micro-batch" in why  # why one layer card: nothing to overlap
    # counts the flags fix are said to be the flags'
    why, m = _why(capsys, ["run", "--model", "tiny", "--layer-cards", "2", "--output-cards", "3"])
    assert "as --layer-cards asks" in why and "as --output-cards asks" in why
    assert "11 idle cards" in why and "predicted throughput" not in why


COMMANDS = ["run", "train", "eval", "map", "perf", "dse", "plan", "spec", "cache", "sensitivity"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_states_every_default_and_wraps(command, capsys, monkeypatch):
    """Every flag that takes a value states its default (0 included: `map --card`, `dse --seed`),
    and the help fits a 100-column terminal (prose wrapped, not 400-character lines)."""
    monkeypatch.setenv("COLUMNS", "100")
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert max(map(len, text.splitlines())) <= 100, max(text.splitlines(), key=len)
    blocks = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    for b in blocks:
        head = re.split(r"\s{2,}", b.strip(), maxsplit=1)[0]
        if head.startswith("-h") or len(head.split(",")[0].split()) < 2:
            continue  # a switch (store_true) has no default to state
        assert "default" in b, b


def test_the_main_job_is_listed_first(capsys):
    assert main(["--help"]) == 0
    listed = re.findall(r"^    (\w+)\s", capsys.readouterr().out, re.M)
    assert listed[0] == "run" and set(COMMANDS) <= set(listed), listed
