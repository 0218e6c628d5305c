# VL-Atlas: `make demo` starts the app on the demo lake, `make test` runs the whole suite.
# Both create .venv and install what they need on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# The CPU wheel of torch (a plain `torch` requirement would pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0
LAKE   ?= demo_lake
PORT   ?= 8501

.PHONY: install demo lake test browser java bench bench-extract bench-pages bench-intervene clean

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.test-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# Builds the demo lake when it is missing (about 1,000 held-out scenes), then serves the app.
demo: install
	$(BIN)/vlatlas demo --lake $(LAKE) --port $(PORT)

lake: install
	$(BIN)/vlatlas demo --lake $(LAKE) --no-app

# The browser test drives Debian's chromium with Playwright (never a downloaded browser).
browser:
	@test -x /usr/bin/chromium || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "note: install Debian's chromium (/usr/bin/chromium) to run the browser test"; fi; }

# tests/lake/test_engines.py reads the lake with PySpark, which needs a Java runtime (Debian's, headless).
java:
	@command -v java >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing a Java runtime for the Spark tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null; \
	  else echo "note: install Debian's default-jre-headless (java) to run the Spark tests"; fi; }

test: $(VENV)/.test-installed browser java
	$(BIN)/python -m pytest

# Times the app's queries on a synthetic ViLT-B-shaped lake under /tmp (about 10 minutes; see the script).
bench: install
	nice -n 10 $(BIN)/python bench/bench_queries.py

# Extraction (whole process) vs the plain loop a user would write and a bare forward, per family,
# base-sized random models, with the issue's targets (see the script; e.g. ARGS="--families vilt --n 8",
# ARGS="--device cuda --dtype bfloat16", ARGS="--lake-size").
bench-extract: $(VENV)/.test-installed
	nice -n 10 $(BIN)/python bench/bench_extract.py $(ARGS)

# Each page's seconds to interactive on the demo lake in headless Chromium, and the docs' screenshots.
bench-pages: $(VENV)/.test-installed
	$(BIN)/python bench/bench_pages.py --lake $(LAKE) --screenshots docs/screenshots $(ARGS)

# Heads ablated per second on the demo model, batched (a head a row of one forward) against a loop of single
# hooked forwards, and how well attribution patching ranks heads against exact ablation (see the script;
# e.g. ARGS="--n 128", ARGS="--device cuda").
bench-intervene: install
	nice -n 10 $(BIN)/python bench/bench_intervene.py $(ARGS)

clean:
	rm -rf $(VENV) $(LAKE) .pytest_cache
