# Every target sets up what it needs: a fresh clone needs only `make test` or `make demo`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EVIS := $(VENV)/bin/evis
# Test workers: the suite is sized for 2 cores.
JOBS ?= 2

# What the deployment targets work on (override on the command line).
CHECKPOINT ?= models/tiny/tiny.pt
DATA ?= data/synth
MODEL_DIR ?= outputs/model
QDQ_DIR ?= outputs/model_int8
ENGINE_DIR ?= outputs/engines
CALIB_ARGS ?= --evaluate $(DATA)/valid --eval-videos 10
BUILD_ARGS ?=
PARITY_ARGS ?=
BENCH_ARGS ?=
DEMO_OUT ?= outputs/demo

.PHONY: help venv test demo synth train-tiny export engines parity bench clean

help:
	@echo "make test        create .venv, install, run the test suite"
	@echo "make demo        synthetic video -> committed tiny model -> ONNX -> runtime -> overlay, parity, FPS"
	@echo "make synth       generate the synthetic train/valid splits under data/synth"
	@echo "make train-tiny  train the tiny config on synthetic data (benchmark, ~30 min on 2 cores)"
	@echo "make export      CHECKPOINT -> ONNX (MODEL_DIR) -> INT8 Q/DQ (QDQ_DIR) -> engines (ENGINE_DIR, needs TensorRT)"
	@echo "make engines     FP16 + INT8 TensorRT engines from MODEL_DIR / QDQ_DIR"
	@echo "make parity      CHECKPOINT vs its ONNX export (and QDQ_DIR if present) on DATA/valid; exit 1 on a broken tolerance"
	@echo "make bench       r50_ytvis19-size latency/FPS benchmark (random weights): table, JSON, plot"

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

# Benchmark, not a test: the tiny config from scratch on 2 CPU cores, then the metric.
train-tiny: data/synth/valid/annotations.json
	$(EVIS) train --config tiny --data data/synth --out work_dirs/tiny $(TRAIN_ARGS)

# The embedded default main job (< 5 min on 2 cores): a synthetic video and a small annotated
# valid split -> the committed tiny model -> ONNX -> runtime with query feedback (overlay video,
# results, tracks.jsonl) -> parity PyTorch vs ONNX Runtime -> FPS.
demo: $(VENV)/.installed
	@test -f $(CHECKPOINT) || { echo "make demo: $(CHECKPOINT) not found" >&2; exit 1; }
	$(EVIS) synth --video $(DEMO_OUT)/synth.mp4 --frames 240 --seed 7
	$(EVIS) synth --out $(DEMO_OUT)/data --videos 0 --valid-videos 4 --seed 2
	$(EVIS) export --checkpoint $(CHECKPOINT) --out $(DEMO_OUT)/model
	$(EVIS) run --model $(DEMO_OUT)/model --source $(DEMO_OUT)/synth.mp4 --out $(DEMO_OUT)/run
	$(EVIS) parity --checkpoint $(CHECKPOINT) --model $(DEMO_OUT)/model --data $(DEMO_OUT)/data/valid \
		--videos 4 --clips 2 --json $(DEMO_OUT)/parity.json
	$(EVIS) bench --checkpoint $(CHECKPOINT) --model $(DEMO_OUT)/model --warmup 1 --iters 4 \
		--json $(DEMO_OUT)/bench.json --plot $(DEMO_OUT)/bench.png
	@echo
	@echo "demo outputs in $(DEMO_OUT):"
	@echo "  run/overlay.mp4   tracked masks drawn on the video"
	@echo "  run/results.json  YouTube-VIS results;  run/tracks.jsonl  one line per frame"
	@echo "  parity.json       PyTorch vs ONNX Runtime, per tensor and end to end"
	@echo "  bench.json, bench.png  latency per stage and FPS"

# Deployment: checkpoint -> ONNX (MODEL_DIR) -> TensorRT-readiness check -> INT8 Q/DQ graphs
# calibrated on DATA with FP32-vs-INT8 AP on DATA/valid (QDQ_DIR) -> engines (ENGINE_DIR/fp16,
# ENGINE_DIR/int8) where TensorRT and a GPU are present; without them `evis build
# --skip-if-unavailable` says that no engine was built and why, and make export still succeeds.
export: $(VENV)/.installed $(if $(filter data/synth,$(DATA)),data/synth/valid/annotations.json)
	@test -f $(CHECKPOINT) || { echo "make export: checkpoint $(CHECKPOINT) not found" >&2; exit 1; }
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

# CHECKPOINT against its export MODEL_DIR (exported first if missing) and, when present, the
# Q/DQ graphs QDQ_DIR and engines; exit 1 when a tolerance is broken (usable in CI).
$(MODEL_DIR)/manifest.json: | $(VENV)/.installed
	$(EVIS) export --checkpoint $(CHECKPOINT) --out $(MODEL_DIR)

parity: $(MODEL_DIR)/manifest.json $(if $(filter data/synth,$(DATA)),data/synth/valid/annotations.json)
	$(EVIS) parity --checkpoint $(CHECKPOINT) --model $(MODEL_DIR) --data $(DATA)/valid \
		$(if $(wildcard $(QDQ_DIR)/manifest.json),--qdq $(QDQ_DIR)) \
		--json outputs/parity.json $(PARITY_ARGS)

# The paper-size model (r50_ytvis19) with random weights, exported once into
# ~/.cache/efficientvis/bench; add e.g. BENCH_ARGS="--qdq QDQ_DIR" for INT8.
bench: $(VENV)/.installed
	$(EVIS) bench --config r50_ytvis19 --random-weights --channels-last --sweep-T 1,3,6,9 \
		--json outputs/bench/r50_ytvis19.json --plot outputs/bench/r50_ytvis19.png $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
