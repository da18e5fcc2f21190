# The two commands of the README: `make demo` and `make test`. Both set everything up first.
# The newest JAX needs Python 3.12 or newer; 3.11 still runs dinb, with jax 0.10. The first
# interpreter that starts wins (pyenv's shims only start the versions it has enabled, so its
# installed versions are tried by path too).
PYTHON ?= $(shell for p in python3.12 $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) \
	python3.13 python3.11 python3; do $$p -c 'import sys; assert sys.version_info >= (3, 11)' \
	2>/dev/null && { command -v $$p; break; }; done)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dinb demo

# the browser test drives Debian's chromium; install it when it is missing
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check dinb tests benchmarks tools
	$(BIN)/python -m pytest tests
	$(BIN)/python -m pytest --nbval-lax notebooks

bench: $(STAMP)
	$(BIN)/python benchmarks/predict_overhead.py
	$(BIN)/python benchmarks/reshard.py
	$(BIN)/python benchmarks/notebook_predict.py
	$(BIN)/python benchmarks/explorer.py

clean:
	rm -rf $(VENV) build *.egg-info
