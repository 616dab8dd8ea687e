# The two commands: `make run` (all methods, quick preset, then the site and the report) and `make test`.
SHELL := /bin/bash
BIN := .venv/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test sync nbtest pytest docs docs-check lab report

setup:
	@bash scripts/setup.sh

run: setup
	@status=0; $(BIN)/llmlit run all --preset quick || status=$$?; \
	$(BIN)/llmlit report >/dev/null; \
	$(MAKE) --no-print-directory docs; \
	echo "Site: $(CURDIR)/_docs/index.html"; \
	$(BIN)/llmlit report --no-write; exit $$status

test: setup
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory sync nbtest pytest docs docs-check && \
	echo "make test: all passed in $$(( $$(date +%s) - start )) s"

sync:
	@bash scripts/check_sync.sh

nbtest:
	OMP_NUM_THREADS=1 $(BIN)/nbdev-test --n-workers 2 --timing  # one torch thread per notebook: two workers on two cores

pytest:
	$(BIN)/python -m pytest -q -m "not slow and not cuda" -p no:cacheprovider

docs: setup
	@$(BIN)/python scripts/build_docs.py

docs-check:
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_docs_site.py

report: setup
	@$(BIN)/llmlit report

lab: setup
	$(BIN)/jupyter lab --notebook-dir=nbs
