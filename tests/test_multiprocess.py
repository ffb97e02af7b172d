"""The appliance and training on a mesh spanning two processes (8 CPU devices each, loopback coordinator).

The two-process 16-device appliance run must equal the single-process 16-device run bit for
bit; data-parallel training over the 16 devices (with a checkpoint and a resume) must equal
one-device training up to the order of float sums, and its checkpoint must load in one
process. The worker processes and the port are cleaned up whether the test passes or fails.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from np_jax.appliance.distributed import DistributedError, settings_from_env

ROOT = Path(__file__).resolve().parent.parent
CASE = Path(__file__).resolve().parent / "_multiprocess_case.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    for k in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "XLA_FLAGS"):  # the suite's compilation settings (conftest)
        if k in os.environ:
            env[k] = os.environ[k]
    return env


def _run_workers(args_per_proc, timeout):
    procs = [subprocess.Popen([sys.executable, str(CASE), *a], cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for a in args_per_proc]
    outs = []
    try:
        deadline = time.monotonic() + timeout
        for p in procs:
            out, _ = p.communicate(timeout=max(1, deadline - time.monotonic()))
            outs.append((p.returncode, out))
    finally:
        for p in procs:  # never leave a worker behind
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _case():
    sys.path.insert(0, str(CASE.parent))
    try:
        import _multiprocess_case
    finally:
        sys.path.pop(0)
    return _multiprocess_case


def _two_process(tmp_path_factory, cases: str):
    tmp = tmp_path_factory.mktemp("mp")
    port, out, train_dir = _free_port(), tmp / "mp.npz", tmp / "train"
    results = _run_workers([(str(port), str(i), str(out), str(train_dir), cases) for i in (0, 1)], timeout=400)
    for rc, text in results:
        assert rc == 0, text[-3000:]
    return dict(np.load(out)), train_dir


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """The appliance case on the two workers: prefill logits through the runtime."""
    return _two_process(tmp_path_factory, "appliance")[0]


@pytest.fixture(scope="module")
def two_process_generation(tmp_path_factory):
    """The appliance case with generation on the two workers (a launch of its own: only the slow test needs it)."""
    return _two_process(tmp_path_factory, "generate")[0]


@pytest.fixture(scope="module")
def two_process_training(tmp_path_factory):
    """The data-parallel training case on the two workers (a second launch: only the slow test needs it)."""
    return _two_process(tmp_path_factory, "train")


def test_two_process_mesh_equals_single_process(two_process_run):
    """The runtime's pipelined prefill over a mesh spanning two processes: the logits of one process."""
    got = two_process_run
    assert int(got["processes"]) == 2 and int(got["devices"]) == 16 and "tokens" not in got
    # the reference: one process, the 16 cards in order on one device (bit-identical to 16 devices,
    # tests/test_appliance.py), so the comparison costs one cheap run
    ref = _case().compute(devices=1, generate=False)
    assert ref["processes"] == 1
    np.testing.assert_array_equal(got["logits"], ref["logits"])


@pytest.mark.slow
def test_two_process_generation_equals_single_process(two_process_generation):
    """Generation (prefill and decode steps, the KV cache on cards in both processes) over two processes."""
    got = two_process_generation
    ref = _case().compute(devices=1)
    np.testing.assert_array_equal(got["tokens"], ref["tokens"])
    np.testing.assert_array_equal(got["logits"], ref["logits"])


@pytest.mark.slow
def test_two_process_data_parallel_training_equals_one_device(two_process_training, tmp_path):
    from models import train

    got, train_dir = two_process_training
    assert int(got["train:resumed_from"]) == 1  # the second call resumed the multi-process checkpoint
    # one device, one process, no interruption: the reference
    ref = train.train(_case().train_config(str(tmp_path / "ref")), progress=False, log=lambda s: None)
    ref_losses = np.array([m["loss"] for m in ref.metrics])
    np.testing.assert_allclose(got["train:first_losses"], ref_losses, rtol=1e-5)
    np.testing.assert_allclose(got["train:losses"], ref_losses, rtol=1e-5)
    # metrics.jsonl written once per step (only process 0 writes), checkpoint steps 1 and 2
    rows = [json.loads(line) for line in (train_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert train.checkpoint_steps(train_dir) == [1, 2]
    ck = train.load_checkpoint(train_dir, log=lambda s: None)
    assert ck.step == 2
    leaves = jax.tree_util.tree_flatten_with_path(ref.params)[0]
    assert len(leaves) == sum(k.startswith("train:param:") for k in got)
    far = total = 0
    for (path, r), (_, c) in zip(leaves, jax.tree_util.tree_flatten_with_path(ck.params)[0]):
        key = "train:param:" + "/".join(str(k) for k in path)
        np.testing.assert_array_equal(got[key], np.asarray(c))  # the saved checkpoint is what was trained
        d = np.abs(np.asarray(r, np.float64) - got[key])
        assert d.max() <= 2.5e-3, (key, d.max())
        far, total = far + int((d > 1e-5).sum()), total + d.size
    # Adam's first steps move each parameter by about +-lr, so a gradient that is ~0 up to
    # rounding may move it the other way: all elements agree within 2 lr, nearly all tightly
    assert far < 0.01 * total, (far, total)


def test_unreachable_coordinator_fails_fast_with_a_clear_error():
    """A worker whose coordinator never appears gives up with a clear message, not a hang."""
    code = ("import jax; jax.config.update('jax_num_cpu_devices', 2)\n"
            "from np_jax.appliance.distributed import initialize, DistributedError\n"
            "try:\n"
            f"    initialize('127.0.0.1:{_free_port()}', 2, 1, timeout_s=2)\n"
            "except DistributedError as e:\n"
            "    print('CLEAR:', e); raise SystemExit(3)\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "could not join the coordinator" in p.stdout and time.monotonic() - t0 < 90


def test_coordinator_without_peers_ends_in_bounded_time():
    """The coordinator of two processes started alone terminates (non-zero) instead of hanging."""
    code = ("import jax; jax.config.update('jax_num_cpu_devices', 2)\n"
            "from np_jax.appliance.distributed import initialize\n"
            f"initialize('127.0.0.1:{_free_port()}', 2, 0, timeout_s=2)\n"
            "print('JOINED')\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "JOINED" not in p.stdout
    assert time.monotonic() - t0 < 90


def test_settings_validation(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert settings_from_env(None, 1, 0) == (None, 1, 0)
    with pytest.raises(DistributedError, match="coordinator"):
        settings_from_env(None, 2, 0)
    with pytest.raises(DistributedError, match="not in"):
        settings_from_env("127.0.0.1:1", 2, 2)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.5:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    assert settings_from_env() == ("127.0.0.5:1234", 4, 3)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "abc")
    with pytest.raises(DistributedError, match="JAX_NUM_PROCESSES='abc' is not a whole number"):
        settings_from_env()
