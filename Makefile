PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
AZURITE := $(VENV)/azurite/node_modules/.bin/azurite-blob

.PHONY: install test lint run bench clean format

install: $(BIN)/pulse-batch

$(BIN)/pulse-batch: pyproject.toml
	@# espeak-ng (Debian) voices the skip-silence benchmark's calls (tests/calls.py espeak_voice)
	@# and remakes the demo's payment clip (jobs/demo/make_clips.py). Without it those
	@# benchmarks are skipped; the clip is committed, so `make run` never needs it.
	@command -v espeak-ng >/dev/null || (apt-get update -qq && apt-get install -y -qq espeak-ng) \
		|| echo "espeak-ng unavailable: skip-silence benchmarks skipped, demo clip not remakable"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[recognizer,dev,s3,gcs,azure,http,delta]'
	@# Azurite, Microsoft's Azure Storage emulator (npm), for the az:// input test
	@# (tests/test_cloud_emulators.py); kept in the virtualenv's folder.
	command -v npm >/dev/null || (apt-get update -qq && apt-get install -y -qq nodejs npm) \
		|| echo "npm unavailable: the az:// emulator test will be skipped"
	test -x $(AZURITE) || npm install --prefix $(VENV)/azurite --no-audit --no-fund --silent \
		azurite@3.35.0 || echo "azurite unavailable: the az:// emulator test will be skipped"
	touch $@

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check batch tests
	$(BIN)/ruff format --check batch tests
	$(BIN)/mypy

format: install
	$(BIN)/ruff format batch tests
	$(BIN)/ruff check --fix batch tests

run: install
	$(BIN)/pulse-batch run jobs/demo.yaml
	$(BIN)/pulse-batch export jobs/out --job demo --format srt
	$(BIN)/pulse-batch export jobs/out --job demo --format vtt
	$(BIN)/pulse-batch score jobs/out --job demo --references jobs/demo/clips.csv
	@echo
	@echo "subtitles:  $(CURDIR)/jobs/out/_exports/demo/srt/ (and vtt/)"
	@echo "WER of the demo clips:  Accuracy section of $(CURDIR)/jobs/out/_reports/demo/latest.md"

bench: install
	@command -v ffmpeg >/dev/null || (apt-get update -qq && apt-get install -y -qq ffmpeg) \
		|| echo "ffmpeg unavailable: the decode benchmark runs without its CLI baseline"
	$(BIN)/pytest -q -m bench -p no:cacheprovider tests/bench -s

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info jobs/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
