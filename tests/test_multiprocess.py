"""The appliance on a mesh spanning two processes (8 CPU devices each, loopback coordinator).

The two-process 16-device run must equal the single-process 16-device run bit for bit. The
worker processes and the port are cleaned up whether the test passes or fails.
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from np_jax.distributed import DistributedError, settings_from_env

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
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"):  # the suite's compilation cache (conftest)
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


@pytest.mark.slow
def test_two_process_mesh_equals_single_process(tmp_path):
    port, out = _free_port(), tmp_path / "mp.npz"
    results = _run_workers([(str(port), str(i), str(out)) for i in (0, 1)], timeout=300)
    for rc, text in results:
        assert rc == 0, text[-3000:]
    got = np.load(out)
    assert int(got["processes"]) == 2 and int(got["devices"]) == 16

    sys.path.insert(0, str(CASE.parent))
    try:
        from _multiprocess_case import compute
    finally:
        sys.path.pop(0)
    ref = compute()
    assert ref["processes"] == 1 and ref["devices"] == 16
    np.testing.assert_array_equal(got["tokens"], ref["tokens"])
    np.testing.assert_array_equal(got["logits"], ref["logits"])


def test_unreachable_coordinator_fails_fast_with_a_clear_error():
    """A worker whose coordinator never appears gives up with a clear message, not a hang."""
    code = ("import jax; jax.config.update('jax_num_cpu_devices', 2)\n"
            "from np_jax.distributed import initialize, DistributedError\n"
            "try:\n"
            f"    initialize('127.0.0.1:{_free_port()}', 2, 1, timeout_s=5)\n"
            "except DistributedError as e:\n"
            "    print('CLEAR:', e); raise SystemExit(3)\n")
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stdout + p.stderr
    assert "could not join the coordinator" in p.stdout and time.monotonic() - t0 < 90


def test_coordinator_without_peers_ends_in_bounded_time():
    """The coordinator of two processes started alone terminates (non-zero) instead of hanging."""
    code = ("import jax; jax.config.update('jax_num_cpu_devices', 2)\n"
            "from np_jax.distributed import initialize\n"
            f"initialize('127.0.0.1:{_free_port()}', 2, 0, timeout_s=5)\n"
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
