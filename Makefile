# The README's two commands:
#   make serve   set up .venv and serve the demo model on http://127.0.0.1:8000
#   make test    set up .venv with the test extra and run the whole suite
#   make examples  (beside a running `make serve`) install what examples/ import and run them
# Set TORCH_SPEC for a GPU torch (see scripts/install.sh); MODEL, HOST and PORT for `make serve`.

SHELL := bash
VENV ?= .venv
MODEL ?= demo
HOST ?= 127.0.0.1
PORT ?= 8000
export VENV

.PHONY: serve test examples install install-test install-examples FORCE

serve: $(VENV)/.installed
	exec $(VENV)/bin/internvl-serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test
	bash scripts/test.sh

# BASE_URL (default http://localhost:8000/v1) and API_KEY reach the examples.
examples: $(VENV)/.installed-examples
	@for script in examples/chat_image.py examples/chat_stream.py examples/chat_video.py; do \
	  echo "== $$script"; $(VENV)/bin/python $$script || exit 1; done

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-examples: $(VENV)/.installed-examples

# Stamps make a second run skip pip entirely until pyproject.toml or the installer changes;
# a TORCH_SPEC on the command line always reaches pip.
STAMP_DEPS := pyproject.toml scripts/install.sh $(if $(TORCH_SPEC),FORCE)

$(VENV)/.installed: $(STAMP_DEPS)
	bash scripts/install.sh
	touch $@

$(VENV)/.installed-test: $(STAMP_DEPS)
	bash scripts/install.sh --test
	touch $@ $(VENV)/.installed

$(VENV)/.installed-examples: $(STAMP_DEPS)
	bash scripts/install.sh --examples
	touch $@ $(VENV)/.installed

FORCE:
