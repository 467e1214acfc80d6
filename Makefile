# Two commands for a newcomer (README): `make demo` and `make test`.
# Everything else here is a step of those.

VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint clib clean

$(VENV)/.ready: pyproject.toml scripts/setup.sh
	scripts/setup.sh
	touch $@

setup: $(VENV)/.ready

# Boots three real systemd hosts (root, systemd-nspawn) with sshd, rolls the
# fleet out with `ansible-playbook site.yml` (recap and time printed), ships a
# file from one to another and says where to look. `dlogctl demo` is the same
# flow without systemd.
demo: setup
	$(MAKE) -C clib all test-program
	$(PY) scripts/lab-demo.py

clib:
	$(MAKE) -C clib all test-program

lint: setup
	$(VENV)/bin/ruff check dlogd tests
	$(VENV)/bin/ruff format --check dlogd tests
	cd ansible && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ansible-lint -q --profile production
	cd ansible && PATH="$(CURDIR)/$(VENV)/bin:$$PATH" ansible-playbook --syntax-check site.yml install.yml
	$(VENV)/bin/ruff check ansible/filter_plugins scripts bench
	$(VENV)/bin/ruff format --check ansible/filter_plugins scripts bench
	MYPYPATH=tests/lab $(VENV)/bin/mypy --strict --explicit-package-bases $(wildcard tests/lab/*.py) scripts/lab-demo.py ansible/filter_plugins/dlogd_fleet.py
	$(VENV)/bin/mypy --strict dlogd tests
	MYPYPATH=bench $(VENV)/bin/mypy --strict --explicit-package-bases $(wildcard bench/*.py)

# Unit and process tiers: seconds to a minute.
test-fast: lint clib
	$(VENV)/bin/pytest -q -m "not lab and not slow"

# Everything CI runs: all tiers, the lab included.
test: lint clib
	$(VENV)/bin/pytest -q --durations=25

clean:
	$(MAKE) -C clib clean
	rm -rf $(VENV) build *.egg-info

# The full fault campaign (docs/reliability.md): the same tests as CI's short
# form, with the full counts (220 kill -9 trials, 100 power cuts, 1,000,000+
# fuzzed inputs, 20,000+ live sessions...). Needs root; tens of minutes.
# Figures land in build/campaign/*.json; DLOGD_CAMPAIGN_SEED=<seed> replays one trial.
.PHONY: campaign
campaign: setup
	DLOGD_CAMPAIGN=full DLOGD_CAMPAIGN_REPORT=build/campaign $(VENV)/bin/pytest -q -rxX \
		tests/faults/test_kill_campaign.py tests/faults/test_powercut.py \
		tests/faults/test_restart_storm.py tests/faults/test_network_faults.py \
		tests/faults/test_race_campaign.py tests/faults/test_live_fuzz.py
