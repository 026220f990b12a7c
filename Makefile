# Two entry points for a fresh machine: `make bench` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch on hosts without a GPU; on NVIDIA hosts: make TORCH_SPEC=torch ...
TORCH_SPEC ?= torch==2.13.0
OUT ?= results/bench-$(shell date +%Y%m%d-%H%M%S)

.PHONY: bench test env system docker images lint clean

env: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

system:
	bash scripts/setup-system.sh

# Docker engine (installed and started if missing) and the probe images, built from a host wheelhouse.
docker: system
	bash scripts/setup-docker.sh

images: env docker
	PYTHON=$(PY) bash scripts/build-images.sh

bench: env system
	$(VENV)/bin/harness alloc --out $(OUT)

test: env system images
	$(VENV)/bin/ruff check harness tests scripts
	$(VENV)/bin/pytest

lint: env
	$(VENV)/bin/ruff check harness tests scripts

clean:
	rm -rf $(VENV) build *.egg-info
