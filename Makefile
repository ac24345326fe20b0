# Two entry points: `make demo` and `make test`. Each bootstraps .venv from nothing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch 2.13.0 is pinned so a CPU-only machine takes the CPU build; GPU machines can override TORCH_SPEC.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench-prepare clean protos redis

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[train,serve,dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/recsys demo --out runs/demo

# The shared-state tests run a real redis-server (Debian package; these machines run as root).
redis:
	command -v redis-server >/dev/null || (apt-get update && apt-get install -y redis-server)

test: $(STAMP) redis
	$(PY) -m pytest -q

test-all: $(STAMP) redis
	$(PY) -m pytest -q -m "not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check recsys training tests bench
	$(VENV)/bin/mypy recsys training

# Regenerate the checked-in gRPC stubs (recsys/serving/proto/) from protos/.
protos: $(STAMP)
	$(PY) -m recsys.serving.protogen

clean:
	rm -rf $(VENV) runs .pytest_cache
