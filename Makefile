# Two commands set everything up on a fresh machine (see README.md):
#   make demo    the main job: the end-to-end K-Forcing demo
#   make test    the test suite (what .ci/run runs)
# Other targets: install, bench, microbench (pytest-benchmark, kernels vs references), test-all (slow tests too),
# gpu-check (on a GPU machine), clean.
PYTHON ?= python
TORCH_SPEC ?= torch
STAMP := build/.installed
NATIVE_SOURCES := $(shell find csrc -type f) setup.py pyproject.toml CMakeLists.txt

.PHONY: install test test-all demo bench microbench gpu-check clean

install: $(STAMP)

# Rebuilt only when the C++/CUDA sources or the build description change; Python edits need no reinstall.
$(STAMP): $(NATIVE_SOURCES)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "$(TORCH_SPEC)"
	$(PYTHON) -m pip install --no-build-isolation -e ".[test,hf]"
	@mkdir -p build && touch $@

test: install
	$(PYTHON) -m pytest -q -m "not slow" tests

test-all: install
	$(PYTHON) -m pytest -q tests

demo: install
	$(PYTHON) -m kforcing.cli demo

bench: install
	$(PYTHON) bench/bench_sampling.py
	$(PYTHON) bench/bench_attention.py
	$(PYTHON) bench/bench_embedding.py
	$(PYTHON) bench/bench_decode.py

microbench: install
	$(PYTHON) -m pytest bench/ --benchmark-only

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build kforcing_ops/_C*.so kforcing_ops/_build_info.json *.egg-info
