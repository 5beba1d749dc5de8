# One command each: `make demo` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install alerting-tools browser-tools demo demo-soak test lint bench ui-check down status clean

# The product (core), the embedded stack and stand-in (embedded/), and what the tests add.
$(STAMP): pyproject.toml embedded/pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]' -e ./embedded
	touch $(STAMP)

install: $(STAMP) alerting-tools

# Prometheus and Alertmanager from Debian's packages (the alerting loop, its tests and the demo use the
# real ones). Installing starts nothing here; on a host with systemd, stop the packaged services or
# keep PROMETHEUS_PORT / ALERTMANAGER_PORT (8490 / 8493) clear of theirs.
ALERTING_PACKAGES = prometheus prometheus-alertmanager
alerting-tools:
	@if ! command -v promtool >/dev/null || ! command -v prometheus-alertmanager >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing $(ALERTING_PACKAGES) (Debian packages)"; \
	  $$SUDO apt-get install -y -q --no-install-recommends $(ALERTING_PACKAGES) >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q --no-install-recommends $(ALERTING_PACKAGES) >/dev/null; } || \
	  { echo "could not install $(ALERTING_PACKAGES): install them (apt-get install -y $(ALERTING_PACKAGES)) and re-run" >&2; exit 1; }; \
	fi

# The demo runs as production does: payloads encrypted (local key made by `dev up`), the UI reading them
# through the local codec server. The stand-in also plays the OTLP collector, so the remediation's own
# trace shows next to the incident's.
DEMO_ENV = OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$${PLATFORM_PORT:-8480}
demo: $(STAMP) alerting-tools
	$(DEMO_ENV) $(BIN)/remediate dev up --services
	$(DEMO_ENV) VERIFY_WINDOW_SECONDS=5 $(BIN)/remediate demo

# Issue 20's proof that the demo never hangs: DEMO_RUNS demos in a row, each bounded, logs kept.
DEMO_RUNS ?= 20
demo-soak: $(STAMP)
	@mkdir -p .remediation/soak
	@start=$$(date +%s); for i in $$(seq 1 $(DEMO_RUNS)); do \
	  t0=$$(date +%s); \
	  if timeout 600 $(MAKE) -s demo > .remediation/soak/run-$$i.log 2>&1; then \
	    echo "demo run $$i/$(DEMO_RUNS): ok in $$(( $$(date +%s) - t0 )) s"; \
	  else rc=$$?; echo "demo run $$i/$(DEMO_RUNS): FAILED (exit $$rc), see .remediation/soak/run-$$i.log"; \
	    tail -25 .remediation/soak/run-$$i.log; exit 1; fi; \
	done; echo "$(DEMO_RUNS) demos in a row, none hung: $$(( $$(date +%s) - start )) s"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy .

# Debian's chromium for the approval page's browser test (Playwright drives it; it never downloads one).
browser-tools:
	@command -v chromium >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing chromium (Debian package)"; \
	  $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	  { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; } || \
	  { echo "could not install chromium: apt-get install -y chromium, then re-run" >&2; exit 1; }; }

test: $(STAMP) alerting-tools browser-tools lint
	$(BIN)/pytest -q

# Figures, not assertions: see docs/performance.md. BENCH_ARGS="--usage-rows 10000000" for the big run.
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# Looks at the demo's finished remediation in the real Temporal UI (installs Debian's chromium if missing).
ui-check: $(STAMP)
	@$(MAKE) -s browser-tools
	$(BIN)/remediate ui-check --out docs/ui-remediation.png

status: $(STAMP)
	$(BIN)/remediate dev status

down: $(STAMP)
	$(BIN)/remediate dev down

clean: $(STAMP)
	$(BIN)/remediate dev down --purge
