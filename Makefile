# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test venv clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/ciphertwin demo twin
	$(BIN)/ciphertwin demo contact-tracing --users 5

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/crypto_ops.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
