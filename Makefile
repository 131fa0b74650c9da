# The two commands the README promises: `make test` and `make demo`.
# Both bootstrap what they need (Debian packages, libvirtd, .venv) first.
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: all bootstrap venv test test-unit lint typecheck shape demo bench format clean

all: test

bootstrap:
	scripts/bootstrap.sh

venv:
	scripts/bootstrap.sh venv

lint: venv
	$(BIN)/ruff check daemon tests bench scripts
	$(BIN)/ruff format --check daemon tests bench scripts
	$(BIN)/python scripts/shape.py

typecheck: venv
	$(BIN)/mypy

# The code's shape (import cycles, layers, module and function sizes):
# docs/architecture.md says what it checks and why.
shape: venv
	$(BIN)/python scripts/shape.py --report

format: venv
	$(BIN)/ruff format daemon tests bench scripts
	$(BIN)/ruff check --fix daemon tests bench scripts

# Everything, integration tests against a real libvirtd and QEMU included.
# The tests without libvirtd run alongside the integration tests
# (scripts/run-tests.sh).
test: bootstrap lint typecheck
	scripts/run-tests.sh $(PYTEST_ARGS)

# The inner loop: pure logic and component tests, no libvirtd needed.
test-unit: venv
	scripts/bootstrap.sh packages venv
	$(BIN)/pytest -m "not integration" $(PYTEST_ARGS)

demo: bootstrap
	scripts/demo.sh

bench: bootstrap
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache var build daemon/*.egg-info
