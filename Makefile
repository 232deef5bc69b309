# Two commands on a fresh machine: `make run` and `make test`. Each sets itself up.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run run-tls test install lint format setup bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

install: $(VENV)/.installed

setup: install
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	$(BIN)/python manage.py ensure_admin

run: setup
	bin/run

# `make run` over HTTPS with a self-signed pair for localhost, made once under var/tls/
# (`make run` with TLS_CERT_FILE and TLS_KEY_FILE set serves a pair of your own).
TLS_DIR = $(or $(BRIDGE_VAR_DIR),var)/tls
run-tls: setup
	$(BIN)/python manage.py make_dev_cert --if-missing
	TLS_CERT_FILE=$(TLS_DIR)/cert.pem TLS_KEY_FILE=$(TLS_DIR)/key.pem bin/run

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/audit_overhead.py

clean:
	rm -rf var/static var/test_bridge_*.sqlite3* var/screenshots
