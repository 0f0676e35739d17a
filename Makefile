# The README's two commands:
#   make serve   set up .venv and serve the demo model on http://127.0.0.1:8000
#   make test    set up .venv with the test extra and run the whole suite
# Set TORCH_SPEC for a GPU torch (see scripts/install.sh); MODEL, HOST and PORT for `make serve`.

SHELL := bash
VENV ?= .venv
MODEL ?= demo
HOST ?= 127.0.0.1
PORT ?= 8000
export VENV

.PHONY: serve test install install-test FORCE

serve: $(VENV)/.installed
	exec $(VENV)/bin/internvl-serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: $(VENV)/.installed-test
	bash scripts/test.sh

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Stamps make a second run skip pip entirely until pyproject.toml or the installer changes;
# a TORCH_SPEC on the command line always reaches pip.
STAMP_DEPS := pyproject.toml scripts/install.sh $(if $(TORCH_SPEC),FORCE)

$(VENV)/.installed: $(STAMP_DEPS)
	bash scripts/install.sh
	touch $@

$(VENV)/.installed-test: $(STAMP_DEPS)
	bash scripts/install.sh --test
	touch $@ $(VENV)/.installed

FORCE:
