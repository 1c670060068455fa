# Two commands from a fresh machine: `make train` and `make test`. Each creates .venv when missing,
# installs torch first (the local CPU wheel; an unpinned torch would pull a multi-GB CUDA build), then this
# package with its extras (building the C++ extension), then runs. Every version comes from constraints.txt
# (pyproject.toml declares ranges; CI pins one tested point inside them).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.logo-installed
EXTRAS ?= test,bench,train,triton,trl,eval,data
PYTEST_ARGS ?=

PIN    := -c constraints.txt

# $(call freeze,PYTHON,FILE): rewrites FILE as its two header lines + PYTHON's exact versions (not this package,
# editable or seen through verl's .pth; the CPU wheel's +cpu suffix dropped)
freeze = { head -2 $(2); $(1) -m pip freeze --exclude-editable | grep -v -e '@ file' -e '^logo-kernels==' | \
           sed 's/+cpu$$//'; } > $(2).tmp && mv $(2).tmp $(2)

.PHONY: install train test test-slow test-slow-ci lint wheel-check ci bench constraints gpu-wheels gpu-check clean \
        verl-env test-verl verl-constraints bench-verl

install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PIN) torch setuptools wheel ninja
	$(PIP) install -q $(PIN) --no-build-isolation -e ".[$(EXTRAS)]"
	$(PY) -c "import logo_kernels as lk; print('logo_kernels backends:', lk.available_backends())"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m logo.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m "slow and not gpu" $(PYTEST_ARGS)

# The slow tests CI runs on every landing (inside its 90 minutes): the embedded default's NIAH bar and the
# N·V > 2^31 case; the thorough hypothesis profile and the all-candidates compile stay in `make test-slow`.
CI_SLOW := more_than_2_pow_31 or embedded_default
test-slow-ci: $(STAMP)
	$(PY) -m pytest -q -m "slow and not gpu" -k "$(CI_SLOW)" --durations=5 $(PYTEST_ARGS)

# ruff, configured in pyproject.toml; and every local link of the README and docs/ resolves.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) tests/check_links.py README.md CHANGELOG.md docs

# The sdist and the wheel as a user gets them, the wheel installed (not editable) into a clean venv beside the
# pinned torch, and a smoke test run from outside the source tree.
WHEEL_VENV ?= build/wheel-venv
wheel-check: $(STAMP)
	rm -rf dist $(WHEEL_VENV)
	$(PY) -m build --sdist --no-isolation --outdir dist .
	$(PIP) wheel -q $(PIN) --no-build-isolation --no-deps -w dist .
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/python -m pip install -q $(PIN) torch
	$(WHEEL_VENV)/bin/python -m pip install -q $(PIN) dist/logo_kernels-*.whl
	cd /tmp && $(abspath $(WHEEL_VENV))/bin/python $(abspath tests/wheel_smoke.py) $(CURDIR)

# verl (0.9.1) pins transformers<5.11, below what the main environment needs (>=5.17): it gets its own venv, pinned by
# constraints-verl.txt, that sees this checkout (and the C++ extension `make install` built in it, for the same
# torch) through a .pth file. `make test-verl` runs tests/with_verl/ there: the real verl, op, model and engine level.
VERL_VENV  ?= .venv-verl
VERL_PY    := $(VERL_VENV)/bin/python
VERL_STAMP := $(VERL_VENV)/.verl-installed
VERL_PIN   := -c constraints-verl.txt

verl-env: $(VERL_STAMP)

$(VERL_STAMP): constraints-verl.txt $(STAMP)
	test -x $(VERL_PY) || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_PY) -m pip install -q --upgrade pip
	$(VERL_PY) -m pip install -q $(VERL_PIN) torch
	$(VERL_PY) -m pip install -q $(VERL_PIN) verl tqdm pytest hypothesis psutil matplotlib liger-kernel triton
	echo "$(CURDIR)" > "$$($(VERL_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/logo-kernels-checkout.pth"
	$(VERL_PY) -c "import verl, logo_kernels as lk; print('verl', verl.__version__, '| logo_kernels backends:', lk.available_backends())"
	touch $@

test-verl: $(VERL_STAMP)
	$(VERL_PY) -m pytest -q tests/with_verl $(PYTEST_ARGS)

bench-verl: $(VERL_STAMP)
	$(VERL_PY) bench/bench_verl.py $(ARGS)

verl-constraints: $(VERL_STAMP)
	$(call freeze,$(VERL_PY),constraints-verl.txt)

# What .ci/run runs: the suite, the lint and link check, the installed-wheel smoke test, verl's tests in its own
# environment, the CI slow stage.
ci: test lint wheel-check test-verl test-slow-ci

# Regenerates constraints.txt from the current environment (after changing a version on purpose).
constraints: $(STAMP)
	$(call freeze,$(PY),constraints.txt)

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
# GPU_CHECK=quick: the tests and the op benchmark at N = 16K (<= 4 min); default: everything (<= 8 min).
GPU_PYTHON ?= python3
GPU_CHECK ?= full
gpu-check:
	-$(GPU_PYTHON) -m pip install -q --no-deps --no-index --find-links .gpu-wheels liger-kernel cut-cross-entropy
	$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) bench/gpu_check.py --out bench/results/gpu $(if $(filter quick,$(GPU_CHECK)),--quick)

clean:
	rm -rf build *.egg-info logo_kernels/*.so .pytest_cache $(VERL_VENV)
