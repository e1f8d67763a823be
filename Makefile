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

# Parity and speed (export/parity.py, export/bench.py; docs/benchmarks.md). parity: the checkpoint
# CKPT (default: make train-tiny's) against its export MODEL_DIR on the synthetic valid split, exit 1
# when a tolerance is broken. bench: the paper-size model (r50_ytvis19) with random weights, exported
# once into ~/.cache/efficientvis/bench; add e.g. BENCH_ARGS="--qdq QDQ_DIR" for INT8.
CKPT ?= work_dirs/tiny/last.pt
MODEL_DIR ?= work_dirs/tiny/onnx
.PHONY: parity bench

$(MODEL_DIR)/manifest.json: $(CKPT) | $(VENV)/.installed
	$(EVIS) export --checkpoint $(CKPT) --out $(MODEL_DIR)

parity: $(MODEL_DIR)/manifest.json data/synth/valid/annotations.json
	$(EVIS) parity --checkpoint $(CKPT) --model $(MODEL_DIR) --data data/synth/valid --videos 10 \
		--json work_dirs/parity.json $(PARITY_ARGS)

bench: $(VENV)/.installed
	$(EVIS) bench --config r50_ytvis19 --random-weights --channels-last --sweep-T 1,3,6,9 \
		--json work_dirs/bench/r50_ytvis19.json --plot work_dirs/bench/r50_ytvis19.png $(BENCH_ARGS)

# The embedded default main job: synthetic video -> committed tiny model -> ONNX -> runtime.
DEMO_CKPT ?= models/tiny/tiny.pt
DEMO_OUT ?= outputs/demo
.PHONY: demo
demo: $(VENV)/.installed
	@test -f $(DEMO_CKPT) || { echo "make demo: $(DEMO_CKPT) is missing: the embedded tiny model is not committed yet; run 'make train-tiny' and pass DEMO_CKPT=work_dirs/tiny/final.pt" >&2; exit 1; }
	$(EVIS) synth --video $(DEMO_OUT)/synth.mp4 --frames 300
	$(EVIS) export --checkpoint $(DEMO_CKPT) --out $(DEMO_OUT)/model
	$(EVIS) run --model $(DEMO_OUT)/model --source $(DEMO_OUT)/synth.mp4 --out $(DEMO_OUT)/run
	@echo "demo outputs: $(DEMO_OUT)/run (overlay.mp4, tracks.jsonl, results.json)"

# Deployment (docs/int8.md): checkpoint -> ONNX (MODEL_DIR) -> TensorRT-readiness check -> INT8
# Q/DQ graphs calibrated on DATA with FP32-vs-INT8 AP on DATA/valid (QDQ_DIR) -> engines
# (ENGINE_DIR/fp16, ENGINE_DIR/int8) where TensorRT and a GPU are present; without them `evis build
# --skip-if-unavailable` says that no engine was built and why, and make export still succeeds.
CHECKPOINT ?= models/tiny/tiny.pt
DATA ?= data/synth
MODEL_DIR ?= outputs/model
QDQ_DIR ?= outputs/model_int8
ENGINE_DIR ?= outputs/engines
CALIB_ARGS ?= --evaluate $(DATA)/valid --eval-videos 10
BUILD_ARGS ?=
.PHONY: export engines

export: $(VENV)/.installed $(if $(filter data/synth,$(DATA)),data/synth/valid/annotations.json)
	@test -f $(CHECKPOINT) || { echo "make export: checkpoint $(CHECKPOINT) not found (make train-tiny, then CHECKPOINT=work_dirs/tiny/last.pt)" >&2; exit 1; }
	$(EVIS) export --checkpoint $(CHECKPOINT) --out $(MODEL_DIR)
	$(EVIS) check $(MODEL_DIR) --quiet
	$(EVIS) calibrate $(MODEL_DIR) --data $(DATA) --out $(QDQ_DIR) $(CALIB_ARGS)
	$(EVIS) check $(QDQ_DIR) --quiet
	$(MAKE) --no-print-directory engines MODEL_DIR=$(MODEL_DIR) QDQ_DIR=$(QDQ_DIR) ENGINE_DIR=$(ENGINE_DIR)

engines: $(VENV)/.installed
	$(EVIS) build $(MODEL_DIR) --out $(ENGINE_DIR)/fp16 --precision fp16 \
		--timing-cache $(ENGINE_DIR)/timing.cache --skip-if-unavailable $(BUILD_ARGS)
	$(EVIS) build $(MODEL_DIR) --out $(ENGINE_DIR)/int8 --precision int8 --qdq $(QDQ_DIR) \
		--timing-cache $(ENGINE_DIR)/timing.cache --skip-if-unavailable $(BUILD_ARGS)
