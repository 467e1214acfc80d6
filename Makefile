# Two commands for a newcomer (README): `make demo` and `make test`.
# Everything else here is a step of those.

VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint clib clean

$(VENV)/.ready: pyproject.toml scripts/setup.sh
	scripts/setup.sh
	touch $@

setup: $(VENV)/.ready

# Boots three real systemd hosts (root, systemd-nspawn), ships a file from one
# to another and says where to look. `dlogctl demo` is the same flow without systemd.
demo: setup
	$(MAKE) -C clib all test-program
	$(PY) scripts/lab-demo.py

clib:
	$(MAKE) -C clib all test-program

lint: setup
	$(VENV)/bin/ruff check dlogd tests
	$(VENV)/bin/ruff format --check dlogd tests
	$(VENV)/bin/mypy --strict dlogd

# Unit and process tiers: seconds to a minute.
test-fast: lint clib
	$(VENV)/bin/pytest -q -m "not lab and not slow"

# Everything CI runs: all tiers, the lab included.
test: lint clib
	$(VENV)/bin/pytest -q

clean:
	$(MAKE) -C clib clean
	rm -rf $(VENV) build *.egg-info
