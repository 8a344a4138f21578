# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Shared data and tokenizer files: ../shared beside the checkout, else /work/shared.
SHARED ?= $(firstword $(wildcard ../shared /work/shared))
export FILTERD_SHARED := $(abspath $(SHARED))
export TIKTOKEN_CACHE_DIR ?= $(FILTERD_SHARED)/tiktoken

.PHONY: install services test test-quick demo clean

install: $(VENV)/.installed services

# Real services for the tests and the demo (Debian packages): redis-server, promtool from prometheus,
# postfix (installed unconfigured: the tests run private instances, never the one on port 25), and
# chromium (headless, for the web console's browser tests), dovecot's imap and sieve (the imapsieve recipe is compiled and run by the tests; the service is never started),
# and rspamd (a private instance: filterd's peer in bench/doors.py; rspamc drives the HTTP door's tests) and spamc.
services:
	@command -v redis-server >/dev/null && command -v promtool >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q redis-server prometheus >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q redis-server prometheus >/dev/null; }; }
	@test -x /usr/sbin/postfix || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	  apt-get install -y -q postfix >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q postfix >/dev/null; }; }
	@command -v chromium >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }; }
	@command -v sievec >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends dovecot-imapd dovecot-sieve >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends dovecot-imapd dovecot-sieve >/dev/null; }; }
	@command -v rspamd >/dev/null && command -v rspamc >/dev/null && command -v spamc >/dev/null || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends rspamd spamc >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends rspamd spamc >/dev/null; }; }

# The CPU torch pin goes in first: an unpinned torch would pull gigabytes of CUDA packages.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# The whole suite (what CI runs), after the import-boundary contracts in pyproject.toml.
test: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The edit loop: no real daemons, Postfix, browsers or model fits (tests/conftest.py marks those slow).
test-quick: install
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider

demo: install
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

clean:
	rm -rf $(VENV) work build *.egg-info
