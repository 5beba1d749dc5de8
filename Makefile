# One command each: `make demo` and `make test` do all set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench ui-check down status clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The demo keeps workflow history readable in the UI; everything else encrypts payloads by default.
# The stand-in also plays the OTLP collector, so the remediation's own trace shows next to the incident's.
DEMO_ENV = PAYLOAD_ENCRYPTION=off OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:$${PLATFORM_PORT:-8480}
demo: $(STAMP)
	$(DEMO_ENV) $(BIN)/remediate dev up --services
	$(DEMO_ENV) VERIFY_WINDOW_SECONDS=5 $(BIN)/remediate demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy .

test: $(STAMP) lint
	$(BIN)/pytest -q

# Figures, not assertions: see docs/performance.md. BENCH_ARGS="--usage-rows 10000000" for the big run.
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# Looks at the demo's finished remediation in the real Temporal UI (installs Debian's chromium if missing).
ui-check: $(STAMP)
	@command -v chromium >/dev/null || (apt-get install -y -q chromium || sudo apt-get install -y -q chromium)
	PAYLOAD_ENCRYPTION=off $(BIN)/remediate ui-check --out docs/ui-remediation.png

status: $(STAMP)
	$(BIN)/remediate dev status

down: $(STAMP)
	$(BIN)/remediate dev down

clean: $(STAMP)
	$(BIN)/remediate dev down --purge
