# Every target sets up what it needs: a fresh clone needs only `make test` or `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EVIS := $(VENV)/bin/evis
# Test workers: the suite is sized for 2 cores.
JOBS ?= 2

.PHONY: help venv test demo synth train-tiny clean

help:
	@echo "make test        create .venv, install, run the test suite"
	@echo "make demo        synthetic video -> tiny model -> ONNX -> runtime -> overlay + parity + FPS"
	@echo "make synth       generate the synthetic train/valid splits under data/synth"
	@echo "make train-tiny  train the tiny config on synthetic data (benchmark, ~30 min on 2 cores)"

# torch==2.13.0 first, so that nothing later pulls a CUDA build on CPU machines.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile tests

# 200 training videos (seed 1) and a valid split drawn with another seed (2).
data/synth/valid/annotations.json: | $(VENV)/.installed
	$(EVIS) synth --out data/synth --videos 200 --seed 1
	$(EVIS) synth --out data/synth --videos 0 --valid-videos 50 --seed 2

synth: data/synth/valid/annotations.json

# Benchmark, not a test: the tiny config from scratch on 2 CPU cores (<= 30 min), then the metric.
train-tiny: data/synth/valid/annotations.json
	$(EVIS) train --config tiny --data data/synth --out work_dirs/tiny $(TRAIN_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
