"""Training (models.train, models.train.data, np-jax train/eval) on the tiny config: learning, QAT,
exact resumption after an interruption (in-process and a real killed process), corrupt checkpoints."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models import llama, train
from models.evaluate.perplexity import evaluate, held_out
from models.io.load import load_model
from models.train.data import ByteEncoder, Corpus, DataConfig, TrainStream, held_out_windows, list_files, split_files

ROOT = Path(__file__).resolve().parent.parent
COMMON = dict(model="tiny", batch_size=8, grad_accum=1, seq_len=64, save_every=1000)
QUIET = dict(progress=False, log=lambda s: None)


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    return [p for p, _ in la] == [p for p, _ in lb] and all(
        np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))
        for (_, x), (_, y) in zip(la, lb))


# --- data ------------------------------------------------------------------------------------------

def _write_corpus(root: Path, n: int) -> None:
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"mod{i}.py").write_text(f"# MARK{i:03d}\n" + "".join(f"v{i}_{j} = {j}\n" for j in range(40)))
    (root / "__pycache__").mkdir(exist_ok=True)
    (root / "__pycache__" / "skipped.py").write_text("ignored\n")


def test_split_by_file_is_deterministic_and_stable(tmp_path):
    _write_corpus(tmp_path, 60)
    files = list_files([tmp_path])
    assert len(files) == 60 and all("__pycache__" not in f.rel for f in files)
    train_a, held_a = split_files(files, 0.25, split_seed=3)
    train_b, held_b = split_files(list(reversed(files)), 0.25, split_seed=3)
    assert [f.rel for f in held_a] == [f.rel for f in held_b]  # independent of listing order
    assert {f.rel for f in train_a} == {f.rel for f in train_b}
    assert not {f.rel for f in train_a} & {f.rel for f in held_a}
    assert len(train_a) + len(held_a) == 60 and 0 < len(held_a) < 30
    # adding files never moves an existing file between the sets
    _write_corpus(tmp_path / "more", 30)
    _, held_c = split_files(list_files([tmp_path]), 0.25, split_seed=3)
    assert {f.rel for f in held_a} <= {f.rel for f in held_c}
    assert [f.rel for f in split_files(files, 0.25, split_seed=4)[1]] != [f.rel for f in held_a]


def test_batches_depend_only_on_seed_and_step(tmp_path):
    _write_corpus(tmp_path, 40)
    corpus = lambda: Corpus(DataConfig((str(tmp_path),), 0.2), ByteEncoder())
    a = TrainStream(corpus(), seq_len=16, batch_size=3, grad_accum=2, seed=7, shuffle_block=8)
    seq = [a.batch(s) for s in range(12)]
    b = TrainStream(corpus(), seq_len=16, batch_size=3, grad_accum=2, seed=7, shuffle_block=8)
    assert seq[0].shape == (2, 3, 17) and seq[0].dtype == np.int32
    np.testing.assert_array_equal(b.batch(11), seq[11])  # straight to step 11, e.g. after a resume
    np.testing.assert_array_equal(b.batch(3), seq[3])
    c = TrainStream(corpus(), seq_len=16, batch_size=3, grad_accum=2, seed=8, shuffle_block=8)
    assert not np.array_equal(c.batch(3), seq[3])
    # the steps cover distinct windows; beyond one epoch the stream continues
    flat = np.concatenate([s.reshape(-1, 17) for s in seq])
    assert len({w.tobytes() for w in flat}) == len(flat)
    text = bytes(np.concatenate([w[:-1] for w in flat]).astype(np.uint8)).decode()
    held = {f.rel for f in corpus().held_out}
    for i in range(40):
        if f"pkg{i % 3}/mod{i}.py" in held:
            assert f"MARK{i:03d}" not in text  # no held-out file in training batches


def test_held_out_windows_come_from_held_out_files(tmp_path):
    _write_corpus(tmp_path, 40)
    c = Corpus(DataConfig((str(tmp_path),), 0.3, split_seed=1), ByteEncoder())
    w = held_out_windows(c, seq_len=32, n_windows=50, tokens_per_file=100)
    assert w.shape[1] == 33 and 1 <= len(w) <= 50
    text = bytes(np.concatenate([x[:-1] for x in w]).astype(np.uint8)).decode()
    marks = {f"MARK{i:03d}" for i in range(40) if f"v{i}_" in text}
    held = {f"MARK{int(f.rel.split('mod')[1][:-3]):03d}" for f in c.held_out}
    assert marks and marks <= held
    np.testing.assert_array_equal(w, held_out_windows(c, 32, 50, 100))
    # training's validation reads them from the last file backwards: with a few files on each side
    # (2 here: 101 tokens a file, 5 windows of 32) the two share none
    assert len(c.held_out) >= 4
    for n in range(1, 6):
        first, last = held_out_windows(c, 32, n, 100), held_out_windows(c, 32, n, 100, from_end=True)
        assert _marks(last) <= held and _marks(first) and not _marks(first) & _marks(last)


def _marks(windows) -> set[str]:
    """The MARK numbers of `_write_corpus`'s files whose lines the windows hold."""
    text = bytes(np.concatenate([x[:-1] for x in windows]).astype(np.uint8)).decode()
    return {f"MARK{int(i):03d}" for i in re.findall(r"\bv(\d+)_", text)}


def test_data_errors(tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        list_files([tmp_path / "missing"])
    with pytest.raises(ValueError, match="no .py files"):
        list_files([tmp_path])
    (tmp_path / "one.py").write_text("a = 1\n")
    with pytest.raises(ValueError, match="both need at least one"):
        Corpus(DataConfig((str(tmp_path),), 0.5), ByteEncoder())
    with pytest.raises(ValueError, match="held-out fraction"):
        DataConfig((), 1.5)


# --- learning ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
    """Tiny model, float training from random init on standard-library bytes."""
    out = tmp_path_factory.mktemp("float")
    tc = train.TrainConfig(out=str(out), precision="float", steps=200, lr=1e-2, **COMMON)
    return tc, train.train(tc, **QUIET)


@pytest.fixture(scope="module")
def held(float_run):
    tc, _ = float_run
    return held_out(load_model("tiny").encoder, tc.data, 64, 32)[0]


def test_float_training_reduces_loss(float_run, held):
    tc, res = float_run
    ce = [m["ce"] for m in res.metrics]
    assert len(ce) == 200 and res.step == 200 and res.tokens == 200 * 8 * 64
    assert np.mean(ce[-20:]) < ce[0] - 2.0 and np.mean(ce[-20:]) < np.mean(ce[:20]) - 0.5
    init = load_model("tiny").params
    before = evaluate(init, res.cfg, "float", held)["nll"]
    after = evaluate(res.params, res.cfg, "float", held)["nll"]
    assert before > 5.0 and after < before - 1.5  # ln 256 = 5.55 for the random model


def test_qat_recovers_most_of_the_ptq_loss(float_run, held, tmp_path):
    tc, res = float_run
    cfg = res.cfg
    f_nll = evaluate(res.params, cfg, "float", held)["nll"]
    stream = TrainStream(Corpus(tc.data, load_model("tiny").encoder), 64, 8, 1, 0)
    ptq = llama.calibrate(res.params, stream.calibration(4), cfg, "w4a4", "lsq")
    ptq_nll = evaluate(ptq, cfg, "w4a4", held)["nll"]
    steps = 20  # measured: QAT ends 0.02 nats below the control (the bound: half the PTQ gap of 0.50 nats)
    # control: the float model trained for the same extra steps (QAT also keeps learning the task)
    ctl = train.train(train.TrainConfig(out=str(tmp_path / "ctl"), init_from=tc.out, precision="float",
                                        steps=steps, lr=1e-3, **COMMON), **QUIET)
    ctl_nll = evaluate(ctl.params, cfg, "float", held)["nll"]
    qtc = train.TrainConfig(out=str(tmp_path / "qat"), init_from=tc.out, precision="w4a4", calibration="lsq",
                            recipe="plain", calib_windows=4, steps=steps, lr=3e-3, act_step_lr_mult=10,
                            act_step_warmup_steps=10, **COMMON)
    q = train.train(qtc, **QUIET)
    q_nll = evaluate(q.params, cfg, "w4a4", held)["nll"]
    assert ptq_nll > f_nll + 0.2, (f_nll, ptq_nll)  # w4a4 PTQ hurts
    assert q_nll - ctl_nll < 0.5 * (ptq_nll - f_nll), (f_nll, ptq_nll, ctl_nll, q_nll)
    # the step sizes learned (not only the weights)
    assert not np.allclose(np.asarray(q.params["layers"]["attn"]["s_x"]), np.asarray(ptq["layers"]["attn"]["s_x"]))
    assert not np.allclose(np.asarray(q.params["layers"]["mlp"]["down"]["s_w"]),
                           np.asarray(ptq["layers"]["mlp"]["down"]["s_w"]))


# --- interruption and resumption ---------------------------------------------------------------------

RESUME = dict(model="tiny", precision="w4a4", recipe="plain", steps=8, batch_size=4, grad_accum=2, seq_len=32, lr=3e-3,
              save_every=2, keep=3, distill=0.5, act_step_warmup_steps=4, act_step_lr_mult=20)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted QAT run (w4a4, distillation, gradient accumulation)."""
    out = tmp_path_factory.mktemp("ref")
    return train.train(train.TrainConfig(out=str(out), **RESUME), **QUIET)


def _opt_target(tc):
    return lambda p: jax.eval_shape(train.make_optimizer(tc).init, p)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The same run stopped right after step 7 (as if killed): checkpoints 2, 4, 6 on disk."""
    out = tmp_path_factory.mktemp("part") / "run"
    res = train.train(train.TrainConfig(out=str(out), **RESUME), stop_after=7, **QUIET)
    assert res.step == 7 and train.checkpoint_steps(out) == [2, 4, 6]
    return out


def _copy(src: Path, dst: Path) -> train.TrainConfig:
    shutil.copytree(src, dst)
    return train.TrainConfig(out=str(dst), **RESUME)


def test_resume_after_interruption_is_bit_identical(reference, interrupted, tmp_path):
    tc = _copy(interrupted, tmp_path / "run")
    # what a save cut short by a forced exit can leave: orbax's temporary folder of a later step
    stray = Path(tc.out) / "7.orbax-checkpoint-tmp" / "params.orbax-checkpoint-tmp"
    stray.mkdir(parents=True)
    (stray / "partial").write_bytes(b"\0" * 16)
    logs = []
    res = train.train(tc, progress=False, log=logs.append)
    assert res.resumed_from == 6 and res.step == 8
    assert not stray.parent.exists()  # removed when the run resumed, not mistaken for a step
    assert any("resuming" in m and "step 6" in m for m in logs)
    assert _leaves_equal(res.params, reference.params)
    ck = train.load_checkpoint(tc.out, opt_target_fn=_opt_target(tc), log=logs.append)
    ref_ck = train.load_checkpoint(reference.checkpoint.parent, opt_target_fn=_opt_target(tc), log=logs.append)
    assert ck.step == 8 and _leaves_equal(ck.opt_state, ref_ck.opt_state)
    assert _leaves_equal(ck.params, reference.params)
    # the loss log is continuous: steps 1..8 once each, equal to the uninterrupted run's
    rows = [json.loads(l) for l in (Path(tc.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["loss"] for r in rows] == [m["loss"] for m in reference.metrics]


def test_killed_process_resumes_bit_identical(reference, tmp_path, capsys):
    """A real process killed with SIGKILL right after step 5 (no handler runs), then the CLI resumes
    it (in this process: the same command, without a second start and compile)."""
    from np_jax.cli import main

    out = tmp_path / "killed"
    kw = dict(RESUME, out=str(out), log_every=1)
    script = textwrap.dedent(f"""
        import os, signal, jax
        jax.config.update("jax_num_cpu_devices", 16)
        from models import train
        def log(msg):
            if msg.startswith("step 5/"):
                os.kill(os.getpid(), signal.SIGKILL)
        train.train(train.TrainConfig(**{kw!r}), progress=False, log=log)
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert train.checkpoint_steps(out) == [2, 4]
    args = ["train", "--out", str(out), "--model", "tiny", "--precision", "w4a4", "--recipe", "plain", "--steps", "8",
            "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32", "--lr", "3e-3", "--save-every", "2", "--keep", "3",
            "--distill", "0.5", "--act-step-warmup-steps", "4", "--act-step-lr-mult", "20", "--json"]
    capsys.readouterr()
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resumed_from"] == 4 and summary["step"] == 8
    ck = train.load_checkpoint(out, log=lambda s: None)
    assert _leaves_equal(ck.params, reference.params)


def _data_file(step_dir: Path) -> Path:
    return max((p for p in (step_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_corrupt_and_incomplete_checkpoints_are_rejected(interrupted, tmp_path):
    out = Path(_copy(interrupted, tmp_path / "run").out)
    f6 = _data_file(out / "6")
    data = bytearray(f6.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte
    f6.write_bytes(bytes(data))
    logs = []
    ck = train.load_checkpoint(out, log=logs.append)
    assert ck.step == 4
    assert any(f"{out / '6'} rejected" in m and "SHA-256 mismatch" in m and f6.name in m for m in logs), logs
    assert any(f"using checkpoint {out / '4'}" in m for m in logs), logs
    f4 = _data_file(out / "4")
    f4.write_bytes(f4.read_bytes()[:-7])  # truncate
    (out / "2" / train.MANIFEST).unlink()  # as if killed while saving step 2
    logs = []
    with pytest.raises(train.NoGoodCheckpoint, match="no checkpoint .* verifies"):
        train.load_checkpoint(out, log=logs.append)
    assert any(f"{out / '4'} rejected" in m and "truncated" in m for m in logs), logs
    assert any(f"{out / '2'} rejected" in m and "incomplete: no manifest" in m for m in logs), logs
    # the same through the CLI: one clear line naming the rejected checkpoints
    p = subprocess.run([sys.executable, "-m", "np_jax", "eval", "--checkpoint", str(out)], cwd=ROOT,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("np-jax eval: error: no checkpoint under")


def test_training_resumes_from_the_previous_good_checkpoint(reference, interrupted, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative --out
    tc = _copy(interrupted, Path("run"))
    out = Path(tc.out)
    f6 = _data_file(out / "6")
    data = bytearray(f6.read_bytes())
    data[-3] ^= 0x01
    f6.write_bytes(bytes(data))
    logs = []
    res = train.train(tc, progress=False, log=logs.append)
    assert res.resumed_from == 4 and res.step == 8
    assert any("rejected" in m and "moved to" in m for m in logs), logs
    assert (out / "rejected" / "6").is_dir()
    assert _leaves_equal(res.params, reference.params)
    assert train.checkpoint_steps(out) == [4, 6, 8]


def test_resume_with_other_settings_is_refused(reference, tmp_path):
    out = str(reference.checkpoint.parent)
    with pytest.raises(ValueError, match="lr: 0.003 .saved. vs 0.001 .now."):
        train.train(train.TrainConfig(**{**RESUME, "out": out, "lr": 1e-3}), **QUIET)
    with pytest.raises(ValueError, match="step_lr_mode: 'absolute' .saved. vs 'relative' .now."):
        train.train(train.TrainConfig(**{**RESUME, "out": out, "step_lr_mode": "relative"}), **QUIET)
    with pytest.raises(ValueError, match="unknown step-lr mode 'log'; choose one of absolute, relative"):
        train.TrainConfig(**{**RESUME, "step_lr_mode": "log"})
    # the recipe makes QAT's starting point: another recipe is another run
    with pytest.raises(ValueError, match="recipe: 'plain' .saved. vs 'rotate-gptq' .now."):
        train.train(train.TrainConfig(**{**RESUME, "out": out, "recipe": "rotate-gptq"}), **QUIET)
    # runs saved before recipes existed read as the plain recipe; for float runs it does not matter
    old = {k: v for k, v in train.TrainConfig(**RESUME).to_json().items() if k not in ("recipe", "calib_windows")}
    assert train.TrainConfig.from_json(old).recipe == "plain"
    fl = train.TrainConfig(precision="float")
    assert not [d for d in fl.differences(dataclasses.replace(fl, recipe="plain", calib_windows=4))]


def test_the_run_setting_step_lr_mode_reaches_the_optimizer():
    """--step-lr-mode relative: one update moves steps 100x apart by the same fraction of themselves
    (absolute: by the same amount); the weights' update is the same in both modes."""
    params = {"w": jnp.ones((2,)), "s_w": jnp.asarray([0.01, 1.0])}
    grads = jax.tree.map(jnp.ones_like, params)
    moved = {}
    for mode in train.TrainConfig.STEP_LR_MODES:
        tc = train.TrainConfig(model="tiny", precision="w4a4", lr=1e-3, step_lr=1e-2, schedule="constant",
                               step_lr_mode=mode, grad_clip=None)
        tx = train.make_optimizer(tc)
        upd, _ = tx.update(grads, tx.init(params), params)
        moved[mode] = (np.asarray(upd["s_w"]), np.asarray(upd["w"]))
    np.testing.assert_allclose(moved["relative"][0] / params["s_w"], -1e-2, rtol=1e-4)
    np.testing.assert_allclose(moved["absolute"][0], -1e-2, rtol=1e-4)
    np.testing.assert_array_equal(moved["relative"][1], moved["absolute"][1])


def test_ctrl_c_during_training_stops_cleanly_and_resumes_bit_identical(reference, tmp_path):
    """A real `np-jax train` sent SIGINT while it saves every step: exit 130 and one line, every
    checkpoint on disk sealed, no temporary file or lock left; the same run then resumes and ends
    bit-identical to the uninterrupted one."""
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--model", "tiny", "--precision", "w4a4", "--recipe", "plain", "--steps", "8",
            "--batch-size", "4", "--grad-accum", "2", "--seq-len", "32", "--lr", "3e-3", "--save-every", "1",
            "--keep", "8", "--distill", "0.5", "--act-step-warmup-steps", "4", "--act-step-lr-mult", "20",
            "--log-every", "1"]
    code = "import sys, jax; jax.config.update('jax_num_cpu_devices', 16); from np_jax.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stderr:
        if line.startswith("step 1/"):  # the numeric work has started; the signal comes as step 1 is saved
            break
    p.send_signal(signal.SIGINT)
    try:
        _, err = p.communicate(timeout=60)  # a hang guard
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    assert p.returncode == 130 and err.splitlines()[-1:] == ["np-jax train: interrupted"], err[-2000:]
    assert not [l for l in err.splitlines() if not l.startswith("step ")][:-1], err[-2000:]  # no traceback, no noise
    steps = train.checkpoint_steps(out)  # none if the signal came before the first save
    assert not steps or steps[-1] < 8
    leftovers = [q.name for q in out.iterdir() if not (q.name.isdigit() or q.name == "metrics.jsonl")]
    assert not leftovers, leftovers  # no *.orbax-checkpoint-tmp*, *.tmp, lock file
    assert all(train.verify_files(out / str(s)) is None for s in steps)  # nothing half-written
    res = train.train(train.TrainConfig(**{**RESUME, "out": str(out), "save_every": 1, "keep": 8}), **QUIET)
    assert res.resumed_from == (steps[-1] if steps else None) and _leaves_equal(res.params, reference.params)


@pytest.fixture
def interrupt_save(monkeypatch):
    """Hooks that raise KeyboardInterrupt inside a checkpoint save: in orbax's write of an item, or
    after orbax has written the step, while the manifest is made."""
    import orbax.checkpoint as ocp

    from models.train import checkpoint

    def raise_(*a, **k):
        raise KeyboardInterrupt

    def install(where):
        if where == "orbax":
            monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "async_save", raise_)
        else:
            monkeypatch.setattr(checkpoint, "tree_sha256", raise_)
    return install


@pytest.mark.parametrize("where", ["orbax", "manifest"])
def test_a_save_interrupted_leaves_no_trace_and_the_run_resumes(reference, interrupted, interrupt_save, tmp_path,
                                                                 monkeypatch, where):
    tc = _copy(interrupted, tmp_path / "run")
    out = Path(tc.out)
    interrupt_save(where)
    with pytest.raises(KeyboardInterrupt):
        train.train(tc, **QUIET)  # resumes at 6, runs steps 7 and 8, is interrupted saving 8
    assert sorted(q.name for q in out.iterdir()) == ["2", "4", "6", "metrics.jsonl"]  # nothing of step 8, no lock
    monkeypatch.undo()
    res = train.train(tc, **QUIET)
    assert res.resumed_from == 6 and res.step == 8 and _leaves_equal(res.params, reference.params)
    assert train.checkpoint_steps(out) == [4, 6, 8]  # keep=3: the oldest removed once 8 is sealed


def test_divergence_stops_with_the_last_good_checkpoint(tmp_path):
    """A learning rate that makes step 2 diverge: one line naming the step and the loss; step 1's
    checkpoint is kept and no checkpoint of non-finite weights is written."""
    tc = train.TrainConfig(out=str(tmp_path / "run"), **{**COMMON, "save_every": 1, "batch_size": 2, "seq_len": 16},
                           steps=4, lr=1e12, schedule="constant")
    with pytest.raises(ValueError, match=r"^step 2: the loss is nan.*the last good checkpoint is .*run/1\)") as e:
        train.train(tc, **QUIET)
    assert "\n" not in str(e.value)
    assert train.checkpoint_steps(tc.out) == [1]
    ck = train.load_checkpoint(tc.out, log=lambda s: None)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ck.params))
    # an update that overflows the weights is caught before the save, whatever the loss
    tc = dataclasses.replace(tc, out=str(tmp_path / "run2"), lr=1e38)
    with pytest.raises(ValueError, match=r"^step 1: the update made parameters non-finite .*none: no step was saved"):
        train.train(tc, **QUIET)
    assert train.checkpoint_steps(tc.out) == []


finite = lambda x: x == x and abs(x) != float("inf")  # noqa: E731 - the oracle, without math.isfinite


@settings(max_examples=50)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10).map(float)))
def test_number_flags_refuse_nan_infinity_and_out_of_range(x):
    import argparse

    from np_jax.cli import fraction, nonnegative_number, positive_number

    for fn, ok in ((positive_number, finite(x) and x > 0), (nonnegative_number, finite(x) and x >= 0),
                   (fraction, finite(x) and 0 <= x <= 1)):
        if ok:
            assert fn(repr(x)) == x
        else:
            with pytest.raises(argparse.ArgumentTypeError):
                fn(repr(x))
    kw = dict(lr=x) if not (finite(x) and x > 0) else dict(weight_decay=-abs(x) - 1)
    with pytest.raises(ValueError, match="must be a finite number"):
        train.TrainConfig(**kw)  # the Python API refuses them too


def test_training_bounds_are_one_line_before_any_work(tmp_path, capsys):
    from np_jax.cli import main

    out = tmp_path / "x"
    base = ["train", "--model", "tiny", "--out", str(out)]
    bad = [(["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
           (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
           (["--step-lr", "nan"], "argument --step-lr: must be a finite number > 0"),
           (["--weight-decay", "nan"], "argument --weight-decay: must be a finite number >= 0"),
           (["--grad-clip", "-1"], "argument --grad-clip: must be a finite number >= 0, got -1"),
           (["--recipe", "gptq"], "argument --recipe: invalid choice: 'gptq' (choose from 'rotate-gptq', "
                                  "'rotate-gptq-sink', 'rotate', 'plain', 'rotate-gptq-recon', 'rotate-gptq-learned')"),
           (["--calibration", "median"], "argument --calibration: invalid choice: 'median'"),
           (["--plot-loss", str(tmp_path)], "is a directory"),
           (["--plot-loss", "/proc/np-jax/loss.png"], "--plot-loss /proc/np-jax/loss.png: cannot write in /proc"),
           (["--plot-loss", str(ROOT / "pyproject.toml" / "loss.png")], "pyproject.toml is not a directory")]
    for extra, msg in bad:
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("np-jax train: error:") and msg in err and "\n" not in err, err
    assert not out.exists()  # nothing was started
    assert main(["eval", "--checkpoint", str(out), "--recipe", "gptq"]) == 2
    assert "invalid choice: 'gptq'" in capsys.readouterr().err
    for opt, msg in (("damp=1", "KEY one of"), ("act_order=maybe", "'maybe' is not a bool"),
                     ("gptq_damp=0", "gptq_damp must be in (0, 10)")):
        assert main(["eval", "--checkpoint", str(out), "--recipe-option", opt]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("np-jax eval: error: argument --recipe-option:") and msg in err and "\n" not in err, err


def test_help_lists_the_choices_and_states_every_default(capsys):
    """train's flags take their defaults from TrainConfig (unset flags are not passed); each help
    must state that default, and the choice lists must be the library's."""
    import re

    from models import recipe
    from models.commands import train as cmd
    from np_jax.cli import main

    assert set(cmd.RECIPES) == set(recipe.RECIPES) and set(cmd.CALIBRATIONS) == set(llama.CALIBRATIONS)
    assert cmd.BEST_BY == train.TrainConfig.BEST_BY and cmd.STEP_LR_MODES == train.TrainConfig.STEP_LR_MODES
    defaults = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}
    for flag, dest, _, choices, help_ in cmd.TRAIN_FLAGS:
        m = re.search(r"\(default: ([^,;)]+)", help_)
        assert m, flag
        want = defaults[dest]
        if want is None:
            continue  # stated in words (the recipe's, --lr, the packaged SmolLM2, ...)
        got = m.group(1).strip()
        assert (float(got) == want) if isinstance(want, (int, float)) else got == str(want), (flag, got, want)
        assert choices is None or want in choices
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())
    assert "float: float training; w4a4, a8c8w4, w8a8," in flat and "policy file" in flat
    assert f"starting point is made from the float model: {', '.join(cmd.RECIPES)} (docs" in flat
    assert "{mse,lsq,max}" in text
    assert main(["eval", "--help"]) == 0
    assert "held-out windows (default: 32)" in " ".join(capsys.readouterr().out.split())


def test_qat_from_a_float_checkpoint_takes_its_context(float_run, tmp_path, capsys):
    """docs/training.md's `train --precision w4a4 --init-from runs/tiny-float`: the default
    --seq-len is clamped to the init checkpoint's model (tiny, 128), as for --model tiny."""
    from models.commands.train import _model_context
    from np_jax.cli import main

    tc, _ = float_run
    assert _model_context({"init_from": tc.out}, "smollm2-135m") == (128, "tiny")
    assert _model_context({"model": "tiny"}, "smollm2-135m") == (128, "tiny")
    assert _model_context({}, "smollm2-135m")[0] >= 256  # no clamp for SmolLM2
    assert _model_context({"init_from": str(tmp_path)}, "smollm2-135m") is None  # no checkpoint: loading says so
    out = tmp_path / "qat"
    png = tmp_path / "plots" / "loss"
    assert main(["train", "--precision", "w4a4", "--recipe", "plain", "--calib-windows", "1", "--init-from", tc.out,
                 "--out", str(out), "--steps", "1", "--grad-accum", "1", "--plot-loss", str(png), "--json"]) == 0
    captured = capsys.readouterr()
    assert "--seq-len 128: the context of tiny" in captured.err
    summary = json.loads(captured.out)
    assert summary["step"] == 1 and summary["plot"] == str(png) + ".png"
    assert sorted(q.name for q in png.parent.iterdir()) == ["loss.png"]  # written whole, no temporary left
    assert sorted(q.name for q in out.iterdir()) == ["1", "metrics.jsonl"]  # the lock file is gone


def test_recipe_options_make_the_start_are_saved_and_evaluated(float_run, tmp_path, capsys):
    """`train --recipe-option KEY=VALUE` sets a field of the recipe that makes QAT's start (here
    GPTQ weights in the plain recipe); the run saves it, a resume with other options is refused,
    and eval's PTQ row for the checkpoint is that start, options included."""
    from np_jax.cli import main

    tc, _ = float_run
    out = tmp_path / "qat"
    args = ["train", "--precision", "w4a4", "--recipe", "plain", "--calib-windows", "1", "--init-from", tc.out,
            "--out", str(out), "--steps", "1", "--grad-accum", "1", "--seq-len", "32"]
    assert main(args + ["--recipe-option", "damp=1"]) == 2  # an unknown field: one line, before any work
    err = capsys.readouterr().err.strip()
    assert err.startswith("np-jax train: error: argument --recipe-option:") and "\n" not in err and not out.exists()
    assert main(args + ["--recipe-option", "weights=gptq"]) == 0
    assert "recipe plain (weights:gptq, activations:mse)" in capsys.readouterr().err  # the start it made
    ck = train.load_checkpoint(out, log=lambda s: None)
    assert ck.train_config.recipe_options == ("weights=gptq",) and ck.train_config.quant_recipe().weights == "gptq"
    assert main(args + ["--steps", "2", "--recipe-option", "weights=rtn"]) == 2
    assert "recipe_options: ['weights=gptq'] (saved) vs ['weights=rtn'] (now)" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(out), "--windows", "1", "--agreement-prompts", "0", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert rows[1]["name"] == "ptq plain [weights=gptq]" and "weights:gptq" in rows[1]["recipe_steps"]


# --- command line --------------------------------------------------------------------------------------

def test_cli_errors_are_one_line(tmp_path, capsys):
    from np_jax.cli import main

    assert main(["train", "--model", "tiny", "--precision", "w3", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("np-jax train: error:") and "unknown precision 'w3'" in err and "\n" not in err
    assert main(["eval", "--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("np-jax eval: error:") and "does not exist" in err and "\n" not in err
    assert main(["train", "--model", "tiny", "--steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err
    # data parallel: the batch must split evenly, the devices must exist
    assert main(["train", "--model", "tiny", "--devices", "2", "--batch-size", "3", "--out", str(tmp_path / "x")]) == 2
    assert "--batch-size 3 must be a multiple of the 2 data-parallel devices" in capsys.readouterr().err
    assert main(["train", "--model", "tiny", "--devices", "999", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert f"this process has {len(jax.devices())} cpu device(s)" in err and "\n" not in err.strip()


def test_first_contact_defaults_fit_the_model(tmp_path, capsys):
    """docs/training.md's first example: the default --seq-len (256) is clamped to tiny's context
    (128) with a note, and eval takes the sequence length and the model from the checkpoint."""
    from np_jax.cli import main

    out = str(tmp_path / "tiny-float")
    assert main(["train", "--model", "tiny", "--steps", "1", "--grad-accum", "1", "--out", out, "--json"]) == 0
    captured = capsys.readouterr()
    assert "--seq-len 128: the context of tiny" in captured.err and json.loads(captured.out)["step"] == 1
    assert main(["eval", "--checkpoint", out, "--windows", "2", "--no-ptq", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["model"] == "tiny" and rep["held_out"]["seq_len"] == 128
    assert [r["name"] for r in rep["rows"]] == ["float", "float-trained"]


def test_cli_eval_table(reference, capsys, tmp_path):
    from np_jax.cli import main

    out = str(reference.checkpoint.parent)
    png = tmp_path / "loss.png"
    assert main(["eval", "--checkpoint", out, "--windows", "4", "--seq-len", "32", "--json", "--plot-loss", str(png)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and rep["plot"] == str(png)
    names = [r["name"] for r in rep["rows"]]
    assert names == ["float", "ptq plain", "qat"] and rep["held_out"]["tokens"] == 4 * 32
    assert [r["recipe"] for r in rep["rows"]] == [None, "plain", "plain"] and [r["qat"] for r in rep["rows"]] == [
        False, False, True]
    assert "top1_agreement" not in rep["rows"][0] and all(0 <= r["top1_agreement"] <= 1 for r in rep["rows"][1:])
    qat = rep["rows"][2]
    assert qat["step"] == 8 and qat["precision"] == "w4a4" and qat["train_tokens"] == 8 * 4 * 2 * 32
    assert rep["rows"][0]["vs_float"] == 1.0 and all(np.isfinite(r["perplexity"]) for r in rep["rows"])
    assert main(["eval", "--checkpoint", out, "--windows", "4", "--seq-len", "32"]) == 0
    text = capsys.readouterr().out
    assert "held-out perplexity of tiny" in text and "ptq plain" in text and "qat" in text


# --- held-out validation and the best step ---------------------------------------------------------

VALIDATED = dict(RESUME, save_every=4, keep=8, eval_every=2, eval_windows=2, keep_best="perplexity")


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    """RESUME's run validated every 2 steps, its lowest held-out perplexity kept in OUT/best."""
    out = tmp_path_factory.mktemp("validated") / "run"
    return out, train.train(train.TrainConfig(out=str(out), **VALIDATED), **QUIET)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_validation_changes_nothing_and_keeps_the_best_step(reference, validated):
    out, res = validated
    assert _leaves_equal(res.params, reference.params)  # the same trajectory as without validation
    rows = _rows(out / train.VALIDATION)
    assert rows == res.validation and [r["step"] for r in rows] == [0, 2, 4, 6, 8]
    windows = held_out_windows(Corpus(DataConfig(), load_model("tiny").encoder), 32, 2, from_end=True)
    assert rows[-1]["perplexity"] == evaluate(res.params, res.cfg, "w4a4", windows)["perplexity"]
    assert all(r["windows"] == 2 and r["tokens"] == 2 * 32 and r["kl"] >= 0 and 0 <= r["top1_agreement"] <= 1
               and r["vs_float"] > 0 for r in rows)
    best = min(rows, key=lambda r: r["perplexity"])
    assert (res.best["step"], res.best["by"], res.best["value"]) == (best["step"], "perplexity", best["perplexity"])
    assert train.checkpoint_steps(out / train.BEST) == [best["step"]]  # only the best is kept
    ck = train.load_checkpoint(out / train.BEST, log=lambda s: None)
    assert ck.meta["validation"] == best
    regular = train.load_checkpoint(out, step=best["step"], log=lambda s: None)  # saved at 4 and 8
    assert _leaves_equal(ck.params, regular.params)


def test_a_float_run_validates_against_its_own_start(tmp_path):
    res = train.train(train.TrainConfig(out=str(tmp_path / "f"), precision="float", steps=2, eval_every=2,
                                        eval_windows=2, **COMMON), **QUIET)
    start, end = res.validation
    assert (start["step"], start["kl"], start["vs_float"], start["top1_agreement"]) == (0, 0.0, 1.0, 1.0)
    assert end["step"] == 2 and end["kl"] > 0 and res.best is None


def test_validation_and_the_best_step_survive_an_interruption(validated, tmp_path):
    """Stopped after step 7: checkpoint 4, validated at 0, 2, 4 and 6, its best kept. Resumed from
    step 4, the steps after it are validated (and the best kept) again, as in the uninterrupted run."""
    _, ref = validated
    out = tmp_path / "run"
    tc = train.TrainConfig(out=str(out), **VALIDATED)
    part = train.train(tc, stop_after=7, **QUIET)
    assert [r["step"] for r in part.validation] == [0, 2, 4, 6] and train.checkpoint_steps(out) == [4]
    assert train.checkpoint_steps(out / train.BEST) == [part.best["step"]]
    assert part.best["step"] > 4  # so the resumed run must remove it and find its best again
    res = train.train(tc, **QUIET)
    assert res.resumed_from == 4 and res.validation == ref.validation == _rows(out / train.VALIDATION)
    assert {k: res.best[k] for k in ("step", "by", "value")} == {k: ref.best[k] for k in ("step", "by", "value")}
    assert train.checkpoint_steps(out / train.BEST) == [ref.best["step"]]
    ck = train.load_checkpoint(out / train.BEST, log=lambda s: None)
    assert _leaves_equal(ck.params, train.load_checkpoint(Path(ref.best["checkpoint"]).parent, log=lambda s: None).params)


def test_eval_reads_the_best_step_and_plots_its_run(validated, capsys, tmp_path):
    from np_jax.cli import main

    out, res = validated
    png = tmp_path / "loss.png"
    assert main(["eval", "--checkpoint", str(out / train.BEST), "--windows", "2", "--seq-len", "32", "--no-ptq",
                 "--agreement-prompts", "0", "--json", "--plot-loss", str(png)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["rows"][-1]["step"] == res.best["step"] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="give --eval-every"):
        train.TrainConfig(keep_best="kl")
    with pytest.raises(ValueError, match="keep-best measure"):
        train.TrainConfig(keep_best="loss", eval_every=1)


# --- training through the appliance pipeline ------------------------------------------------------

def test_training_through_the_appliance_pipeline_matches_sequential(tmp_path):
    """One training step with the forward on a 4-card pipeline (4 devices) vs the sequential model.

    The wiring of the training loop is checked here in float (fast to compile); the w4a4
    pipeline's forward bits and gradients on 16 cards are checked in tests/test_appliance.py.
    """
    kw = dict(COMMON, batch_size=2, seq_len=16, steps=1, precision="float", lr=1e-3)
    seq = train.train(train.TrainConfig(out=str(tmp_path / "seq"), **kw), **QUIET)
    app = train.train(train.TrainConfig(out=str(tmp_path / "app"), appliance_cards=4, **kw), **QUIET)
    mapping, mesh = train.appliance_pipeline(seq.cfg, "float", 4, 2, 16)
    assert mesh.size == 4 and mapping.schedule.roles == ("layers", "layers", "output", "output")
    assert mapping.micro_batches == 2
    assert app.metrics[0]["ce"] == seq.metrics[0]["ce"]  # the forward is bit-identical
    # gradients agree to the fp16 resolution of the activations; Adam's first step moves each
    # parameter by about +-lr, so only a gradient that is ~0 can send one the other way
    far = total = 0
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(app.params)[0], jax.tree.leaves(seq.params)):
        d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        assert d.max() <= 2.5e-3, (jax.tree_util.keystr(path), d.max())
        far, total = far + int((d > 1e-5).sum()), total + d.size
    assert far < 0.02 * total, (far, total)
    with pytest.raises(ValueError, match="cannot be split evenly"):
        train.appliance_pipeline(seq.cfg, "float", 16, 2, 16, devices=3)


def test_run_serves_a_qat_checkpoint(reference, capsys):
    """`np-jax run --checkpoint` generates with the trained weights and step sizes (no calibration)."""
    from models.generate import Generator
    from np_jax.cli import main

    out = str(reference.checkpoint.parent)
    args = ["run", "--model", "tiny", "--checkpoint", out, "--single-device", "--new-tokens", "4", "--prompt", "def f(x):"]
    assert main(args + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["precision"] == "w4a4" and Path(rep["checkpoint"]).resolve() == Path(reference.checkpoint).resolve()
    want = Generator(reference.params, reference.cfg, "w4a4", cache_len=128).generate(
        [[b % 256 for b in b"def f(x):"]], 4).tokens[0]
    assert rep["outputs"] == [ByteEncoder().decode(want)]  # text, not token ids
    assert main(args + ["--precision", "w8a8"]) == 2
    assert "was trained at w4a4; it cannot be served at w8a8" in capsys.readouterr().err
    # bad input: one line each, before any work
    bad = [(["--prompt", "caf\udce9"], "--prompt 2 is not valid UTF-8 (byte 0xe9 at character 3)"),  # a Latin-1 byte from argv
           (["--users", "0"], "argument --users: must be >= 1, got 0"), (["--devices", "0"], "argument --devices"),
           (["--users", "1000000000"], "--users 1000000000 is above the limit of 65,536"),
           (["--layers", "unrolled", "--devices", "2"], "--layers unrolled runs the cards on one device")]
    for extra, msg in bad:
        assert main(args + extra) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err and "loading" not in err, err  # before loading anything
