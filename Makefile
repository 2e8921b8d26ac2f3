PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# What a user needs to run jobs and the demo: the local recognizer, cloud inputs, Delta outputs.
EXTRAS := recognizer,s3,gcs,azure,http,delta
# Stamps: what only the tests (and lint) or the docs need, installed on first use.
TEST_DEPS := $(VENV)/.test-deps
DOCS_DEPS := $(VENV)/.docs-deps
AZURITE := $(VENV)/azurite/node_modules/.bin/azurite-blob
# Three workers (pytest-xdist) on two cores: many tests wait (pacing, a child process, a
# store), so a third keeps both cores busy; idle workers steal queued tests from busy ones.
# Idle 2-core machine, 723 tests: 122 s with two workers (loadgroup, the whisper tests pinned
# to one), 100 s with three, 106 s with four; 92 s with three stealing work.
PYTEST := $(BIN)/pytest -q --durations=20 -n 3 --dist worksteal

.PHONY: install test test-all lint format docs run screenshot bench clean

install: $(BIN)/pulse-batch

$(BIN)/pulse-batch: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

# The dev extra (pytest, ruff, mypy, readers, emulators, the vendor SDK), and Azurite,
# Microsoft's Azure Storage emulator (npm), for the az:// input test
# (tests/test_cloud_emulators.py), kept in the virtualenv's folder; Debian's Prometheus
# Pushgateway for the metrics push test (tests/test_metrics.py); Debian's Chromium, where
# apt is available, to render the HTML report in a real browser (tests/test_timeline.py
# skips, saying so, where it is not). Any failure fails.
$(TEST_DEPS): $(BIN)/pulse-batch
	$(BIN)/pip install --quiet -e '.[$(EXTRAS),dev]'
	command -v chromium >/dev/null || ! command -v apt-get >/dev/null \
		|| (apt-get update -qq && apt-get install -y -qq chromium)
	command -v prometheus-pushgateway >/dev/null || (apt-get update -qq && apt-get install -y -qq prometheus-pushgateway)
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm)
	test -x $(AZURITE) || npm install --prefix $(VENV)/azurite --no-audit --no-fund --silent \
		azurite@3.35.0
	touch $@

$(DOCS_DEPS): $(BIN)/pulse-batch
	$(BIN)/pip install --quiet -e '.[$(EXTRAS),docs]'
	touch $@

test: $(TEST_DEPS)
	$(PYTEST)

# The default suite plus the long forms marked `slow` (benchmarks stay in `make bench`).
test-all: $(TEST_DEPS)
	$(PYTEST) -m 'not bench'

lint: $(TEST_DEPS)
	$(BIN)/ruff check batch tests
	$(BIN)/ruff format --check batch tests
	$(BIN)/mypy

format: $(TEST_DEPS)
	$(BIN)/ruff format batch tests
	$(BIN)/ruff check --fix batch tests

# The manual in docs/ as a website in site/; a broken link or a missing page fails.
docs: $(DOCS_DEPS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

run: install
	$(BIN)/pulse-batch run jobs/demo.yaml
	$(BIN)/pulse-batch export jobs/out --job demo --format srt
	$(BIN)/pulse-batch export jobs/out --job demo --format vtt
	$(BIN)/pulse-batch score jobs/out --job demo --references jobs/demo/clips.csv
	@echo
	@echo "subtitles:  $(CURDIR)/jobs/out/_exports/demo/srt/ (and vtt/)"
	@echo "WER of the demo clips:  Accuracy section of $(CURDIR)/jobs/out/_reports/demo/latest.md"

# The docs' picture of the demo job's HTML report (docs/img/report.png), drawn by headless
# Chromium (Debian's chromium; the test suite does not need it).
screenshot: install
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/pulse-batch run --force jobs/demo.yaml
	$(BIN)/python docs/tools/screenshot.py jobs/out/_reports/demo/latest.html docs/img/report.png \
		--width 1100 --height 1000

# espeak-ng (Debian) voices the skip-silence benchmark's calls (tests/calls.py espeak_voice)
# and remakes the demo's payment clip (jobs/demo/make_clips.py); ffmpeg is the decode
# benchmark's baseline. The runner itself needs neither.
bench: $(TEST_DEPS)
	command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng)
	command -v ffmpeg >/dev/null || (apt-get update -qq && apt-get install -y -qq ffmpeg)
	$(BIN)/pytest -q -m bench -p no:cacheprovider tests/bench -s

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info jobs/out site
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
