"""Test configuration: 16 virtual CPU devices (one per appliance card), hypothesis profiles.

NP_JAX_TEST_PLATFORM=cuda (any JAX platform but cpu) runs the tests on that backend instead, as it
is (no virtual devices): `benchmarks/device_check.py` selects the tests that need one device.
"""

import os
import tempfile

_PLATFORM = os.environ.get("NP_JAX_TEST_PLATFORM", "cpu")
if _PLATFORM == "cpu":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # The suite compiles with LLVM's optimizations off: most of its time is compiling small programs
    # (~25 % less). Integer results are exact at any setting; float results may differ in their last
    # bits from the default compiler's (a float forward of the tiny model: 2e-7 at most), which no
    # test depends on: every comparison is between programs compiled alike. On jaxlib 0.10 the
    # legacy loop emitters compile faster again than the fusion emitters (the four heaviest tests:
    # 119 s -> 92 s, with the same forward and calibration bits); jaxlib 0.12 has only the new ones
    # (its XLA rejects the flag). A caller's XLA_FLAGS win (`XLA_FLAGS= make test` for the defaults).
    from importlib.metadata import version

    _flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    if tuple(int(x) for x in version("jaxlib").split(".")[:2]) < (0, 11):
        _flags += " --xla_cpu_use_fusion_emitters=false"
    os.environ.setdefault("XLA_FLAGS", _flags)
else:
    os.environ["JAX_PLATFORMS"] = _PLATFORM  # the backend's own compiler settings: what serving there runs
import jax  # noqa: E402

if _PLATFORM == "cpu":
    jax.config.update("jax_num_cpu_devices", 16)

# A persistent XLA compilation cache shared by this run's tests and the subprocesses they start
# (killed-and-resumed training, the 2-process mesh). Many tests compile the same programs (a fresh
# jit closure per training run, per generator); the cache makes the suite fit its 10-minute budget
# on 2 cores. It stores compiled executables only, so results are unchanged. Fresh per run.
_OWNED = []  # the folders this process made (the run's first process): removed when the run ends


def _own_tmpdir(prefix: str) -> str:
    _OWNED.append(tempfile.mkdtemp(prefix=prefix))
    return _OWNED[-1]


_cache = os.environ.get("NP_JAX_TEST_COMPILATION_CACHE") or _own_tmpdir("np_jax_xla_cache_")
os.environ["NP_JAX_TEST_COMPILATION_CACHE"] = _cache  # xdist workers and subprocesses share it
os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# The suite never reads or writes the user's np_jax cache (prepared models, file digests): a
# folder of its own, fresh per run and shared by its workers, unless NP_JAX_CACHE is set.
if not os.environ.get("NP_JAX_CACHE"):
    os.environ["NP_JAX_CACHE"] = os.environ.get("NP_JAX_TEST_CACHE") or _own_tmpdir("np_jax_cache_")
    os.environ["NP_JAX_TEST_CACHE"] = os.environ["NP_JAX_CACHE"]
# start the backend now: CLI commands run in-process cannot change the count
assert len(jax.devices()) == 16 or _PLATFORM != "cpu"

from hypothesis import HealthCheck, settings  # noqa: E402


def pytest_unconfigure(config):
    """The run's temporary caches go with it (the xdist workers inherit them from this process)."""
    import shutil
    for d in _OWNED:
        shutil.rmtree(d, ignore_errors=True)


settings.register_profile(
    "default", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", deadline=None, max_examples=25, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "default")
