# Two commands a user needs: `make demo` and `make test`. Both create .venv when missing.
#
# CPU machines get the CPU build of torch 2.13.0 (pinned: an unpinned torch would pull a
# multi-GB CUDA build). GPU users install their CUDA torch into .venv first (README); the
# set-up sees an importable torch and leaves it alone.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pm_dist-installed
TORCH_CPU_VERSION ?= 2.13.0
# A local folder of wheels (this project's machines keep the CPU torch there), else the
# PyTorch CPU index.
TORCH_WHEELS ?= /opt/wheels
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
NPROC ?= 2
PYTEST_ARGS ?=
ARGS ?=

.PHONY: demo test install clean bench

install: $(STAMP)

$(STAMP): setup.py setup.cfg Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed: keeping it"; \
	elif ls $(TORCH_WHEELS)/torch-$(TORCH_CPU_VERSION)+cpu-*.whl >/dev/null 2>&1; then \
		$(PY) -m pip install --find-links $(TORCH_WHEELS) "torch==$(TORCH_CPU_VERSION)"; \
	else \
		$(PY) -m pip install --extra-index-url $(TORCH_CPU_INDEX) "torch==$(TORCH_CPU_VERSION)+cpu"; \
	fi
	$(PY) -m pip install -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) -m pm_dist.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -rs $(PYTEST_ARGS)

# CPU-sized benchmarks, results under $(BENCH_OUT)/ (BENCH_ARGS=--full for head_scaling's sizes).
BENCH_OUT ?= bench_out
BENCH_ARGS ?=

bench: $(STAMP)
	@mkdir -p $(BENCH_OUT)
	$(PY) -m benchmarks.head_scaling --out-dir $(BENCH_OUT) $(BENCH_ARGS)
	$(PY) -m benchmarks.head_step --out $(BENCH_OUT)/head_step.json
	$(PY) -m benchmarks.data_throughput --out $(BENCH_OUT)/data_throughput.json
	$(PY) -m benchmarks.train_throughput --out $(BENCH_OUT)/train_throughput.json
	$(PY) -m benchmarks.accuracy grid --identities 1e3 1e4 --seeds 0 1 --jobs $(NPROC) \
		--head-extra full_fc:head.lr_scale=100 partial_fc:head.lr_scale=100 --out-dir $(BENCH_OUT)/accuracy

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
