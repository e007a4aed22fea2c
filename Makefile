# One word for each routine task. Everything runs from the repo's .venv.
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install serve test check fmt web

$(BIN)/mqchat: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/mqchat

serve: install
	$(BIN)/mqchat serve

test: install
	$(BIN)/python -m pytest

check: install
	$(BIN)/ruff check mqchat tests
	$(BIN)/ruff format --check mqchat tests
	$(BIN)/mypy

fmt: install
	$(BIN)/ruff format mqchat tests
	$(BIN)/ruff check --fix mqchat tests

# Re-vendor MQTT.js for the browser page (needs npm; the output is committed). docs/clients.md.
web:
	scripts/build-web.sh
