# passtd: set-up, run, test. `make setup` is idempotent and installs only what is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the tests drive as real components (guest clients, namespaces, captures).
DEB_PKGS := iproute2 nftables socat iperf3 isc-dhcp-client busybox-static tcpdump ndisc6 procps iputils-ping qemu-system-x86
ARGS ?= passt --foreground

.PHONY: setup deb venv run test lint typecheck unit clean

setup: deb venv

deb:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q -e '.[dev]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c "import passtd, grpc, uvloop, pyroute2, dpkt, structlog, pytest, hypothesis"
	touch $@

run: setup
	$(VENV)/bin/passtd $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy passtd passtctl

test: setup lint typecheck
	$(PY) scripts/gen_proto.py --check
	GRPC_VERBOSITY=ERROR $(PY) -bb -m pytest -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
