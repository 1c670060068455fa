# Two commands from a fresh machine: `make train` and `make test`. Each creates .venv when missing,
# installs torch==2.13.0 first (the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build),
# then this package with its extras (building the C++ extension), then runs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.logo-installed
EXTRAS ?= test,bench,train,triton,trl,eval,data
PYTEST_ARGS ?=

.PHONY: install train test test-slow bench gpu-wheels gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0 setuptools wheel ninja
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	$(PY) -c "import logo_kernels as lk; print('logo_kernels backends:', lk.available_backends())"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m logo.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow and not gpu" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) bench/bench_linear_logprobs.py --quick
	$(PY) bench/bench_loss.py --quick
	$(PY) bench/bench_step.py --quick
	$(PY) bench/estimate_memory.py

# GPU machines here have no network: fetch the peers' wheels where one exists (carry .gpu-wheels to the machine).
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps -d .gpu-wheels liger-kernel==0.8.5 cut-cross-entropy==25.1.1

# On a GPU machine, with its own python3 (CUDA torch, Triton): installs this package (and the peers' wheels when
# .gpu-wheels is there), runs the gpu-marked tests and the GPU benchmarks -> bench/results/gpu/summary.md.
GPU_PYTHON ?= python3
gpu-check:
	-$(GPU_PYTHON) -m pip install -q --no-deps --no-index --find-links .gpu-wheels liger-kernel cut-cross-entropy
	$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) bench/gpu_check.py --out bench/results/gpu

clean:
	rm -rf build *.egg-info logo_kernels/*.so .pytest_cache
