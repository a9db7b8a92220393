# passtd: set-up, run, test. `make setup` is idempotent and installs only what is missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
# Debian packages the tests drive as real components (guest clients, namespaces, captures).
DEB_PKGS := iproute2 nftables socat iperf3 isc-dhcp-client busybox-static tcpdump ndisc6 procps iputils-ping \
	qemu-system-x86 systemd gcc libc6-dev python3-dev
# NATIVE=0 runs the data path interpreted: no C compiler needed, about half the connection rate.
NATIVE ?= 1
ARGS ?= passt --foreground

.PHONY: setup deb venv native run test lint typecheck unit clean bench install lock soak

setup: deb venv native

deb:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@# qemu 7.2 (bookworm) segfaults on a vhost-user NIC under TCG; bookworm-backports has qemu 10, which works.
	@# The source line is added only when no apt source names bookworm-backports yet (one-line or deb822 form),
	@# on the mirror the machine already uses for bookworm.
	@if ! dpkg-query -W -f='$${Version}' qemu-system-x86 2>/dev/null | grep -q '~bpo12'; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then \
	    mirror=$$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | \
	      awk '/^$$/{u=""} /^URIs:/{u=$$2} /^Suites:(.* )?bookworm( |$$)/{if (u) {print u; exit}}'); \
	    [ -n "$$mirror" ] || mirror=$$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | \
	      awk '$$1=="deb" && $$3=="bookworm" {print $$2; exit}'); \
	    if [ -z "$$mirror" ]; then echo "no apt source for bookworm to add bookworm-backports beside" >&2; exit 1; fi; \
	    echo "adding the bookworm-backports apt source ($$mirror)"; \
	    echo "deb $$mirror bookworm-backports main" | \
	      $$SUDO tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null; \
	  fi; \
	  echo "installing qemu-system-x86 from bookworm-backports"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends -t bookworm-backports qemu-system-x86 >/dev/null; \
	fi

venv: $(VENV)/.installed

# requirements.lock pins every Python package with its hashes, so a fresh clone installs what the last `make lock`
# chose whatever PyPI has released since (grpcio-tools generates passtd/control/pb and gen_proto.py --check
# compares against its output); passtd itself goes in editable, without touching the pins.
$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	set -o pipefail; $(PY) -m pip install -q --require-hashes -r requirements.lock 2>&1 | { grep -v "^WARNING: Location" || true; }
	set -o pipefail; $(PY) -m pip install -qq --no-deps --no-build-isolation -e . 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -c "import passtd, grpc, uvloop, pyroute2, dpkt, structlog, pytest, hypothesis"
	touch $@

# Re-resolve requirements.lock from pyproject.toml (newest versions that fit it), with pip-tools in a throw-away
# virtualenv; then run `make test` and commit both files together.
lock:
	rm -rf .lock-venv && python3 -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q pip-tools 2>&1 | grep -v "^WARNING: Location" || true
	.lock-venv/bin/pip-compile -q --upgrade --generate-hashes --allow-unsafe --extra dev --strip-extras \
	  --no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml 2>&1 | grep -v "^WARNING: Location" || true
	rm -rf .lock-venv

# The data path's modules compiled with mypyc, next to their sources (scripts/build_native.py; it does nothing
# when the build matches the sources, and passtd falls back to the sources when it does not).
native: venv
ifeq ($(NATIVE),1)
	$(PY) scripts/build_native.py
else
	$(PY) scripts/build_native.py --clean
endif

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
	@echo "the in-process tests again, interpreted (the fallback when nothing is compiled):"
	PASSTD_NATIVE=0 $(PY) -bb -m pytest -q -p no:cacheprovider tests/core tests/packets tests/io

clean:
	test ! -x $(PY) || $(PY) scripts/build_native.py --clean
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis

# `make install [PREFIX=/usr/local] [DESTDIR=] [SYSCONFDIR=/etc] [COMPAT=0] [INSTALL_PYTHON=1]`
# passtd goes into its own virtualenv under $(PREFIX)/lib/passtd (Debian's python refuses system-wide pip,
# PEP 668), its commands are linked into $(PREFIX)/bin, the units into $(UNITDIR) with ExecStart= pointing at
# $(PREFIX)/bin, examples into $(PREFIX)/share/doc/passtd/examples and $(SYSCONFDIR)/passtd (kept if present).
# Runtime packages are held to the versions in requirements.lock.
# COMPAT=1 also links `passt`, `pasta` and `pesto` (they then shadow a packaged passt in /usr/bin).
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
LIBDIR := $(PREFIX)/lib/passtd
DOCDIR := $(PREFIX)/share/doc/passtd
PYTHON3 ?= python3
COMPAT ?= 0
INSTALL_PYTHON ?= 1

install:
	@set -e; \
	commands="passtd passtctl"; [ "$(COMPAT)" = 1 ] && commands="$$commands passt pasta pesto"; \
	if [ "$(INSTALL_PYTHON)" = 1 ]; then \
	  $(PYTHON3) -m venv "$(DESTDIR)$(LIBDIR)"; \
	  pins="$$(mktemp)"; sed -n 's/^\([A-Za-z0-9_.-]*==[^ ]*\).*/\1/p' requirements.lock > "$$pins"; \
	  "$(DESTDIR)$(LIBDIR)/bin/python" -m pip install -q -c "$$pins" .; rm -f "$$pins"; \
	  if [ -n "$(DESTDIR)" ]; then \
	    grep -rlI -- "$(DESTDIR)" "$(DESTDIR)$(LIBDIR)/bin" | xargs -r sed -i "s#$(DESTDIR)##g"; \
	  fi; \
	  install -d "$(DESTDIR)$(PREFIX)/bin"; \
	  for c in $$commands; do ln -sfn "$(LIBDIR)/bin/$$c" "$(DESTDIR)$(PREFIX)/bin/$$c"; done; \
	fi; \
	install -d "$(DESTDIR)$(UNITDIR)" "$(DESTDIR)$(DOCDIR)/examples" "$(DESTDIR)$(SYSCONFDIR)/passtd"; \
	for unit in systemd/*.service; do \
	  sed "s#/usr/local/bin/passtd#$(PREFIX)/bin/passtd#g; s#/usr/local/share/doc/passtd#$(DOCDIR)#g" \
	    "$$unit" > "$(DESTDIR)$(UNITDIR)/$$(basename "$$unit")"; \
	  chmod 0644 "$(DESTDIR)$(UNITDIR)/$$(basename "$$unit")"; \
	done; \
	install -m 0644 examples/*.toml "$(DESTDIR)$(DOCDIR)/examples/"; \
	install -m 0644 README.md "$(DESTDIR)$(DOCDIR)/"; \
	for ex in examples/*.toml; do \
	  target="$(DESTDIR)$(SYSCONFDIR)/passtd/$$(basename "$$ex").example"; \
	  [ -e "$$target" ] || install -m 0644 "$$ex" "$$target"; \
	done; \
	echo "installed: units in $(UNITDIR), examples in $(SYSCONFDIR)/passtd; then: systemctl daemon-reload"

# Side-by-side benchmark against pasta and slirp4netns (not part of `make test`): see bench/README.md.
bench: setup
	@missing=""; for p in passt slirp4netns iperf3; do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	$(PY) bench/run.py $(BENCH_ARGS)

# Abuse under load (not part of `make test`; root; about 5 minutes): a million mutated frames through both
# back-ends, floods while a transfer runs, descriptor exhaustion; prints figures. See soak/run.py.
soak: setup
	$(PY) soak/run.py $(SOAK_ARGS)
