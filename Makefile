# Two commands for a newcomer: `make demo` and `make test`. Each builds its own virtual environment.
PYTHON ?= python3
VENV ?= .venv
PORT ?= 8080
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@echo "supervise is serving examples/app.py on http://127.0.0.1:$(PORT)/"
	@echo "  upgrade it:  kill -HUP \$$(cat $(VENV)/demo.pid)   (watch the log: new generation, ready, promoted, old drained)"
	@echo "  try it:      curl http://127.0.0.1:$(PORT)/      stop: Ctrl-C"
	$(BIN)/supervise --listen 127.0.0.1:$(PORT) --ready notify --watch 2s --pidfile $(VENV)/demo.pid \
		-- $(BIN)/python examples/app.py

# Two workers, each taking whole test files (their fixtures and servers stay together): most tests wait on real
# processes, so two run in the time of one even on a 2-core machine. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -q -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/upgrade_under_load.py --quick
	$(BIN)/python benchmarks/instances.py --upgrades 1

clean:
	rm -rf $(VENV) build *.egg-info
