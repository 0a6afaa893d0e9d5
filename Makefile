# vlp — `make` lists the targets. Everything runs inside .venv, created on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= data/demo
WORKERS ?= 2
DEMO_EVAL = $(DEMO_DIR)/eval/shapes $(DEMO_DIR)/eval/retrieval \
	$(addprefix $(DEMO_DIR)/eval/binding/,swap_attribute swap_position replace_object)

.DEFAULT_GOAL := help
.PHONY: help setup demo test bench studies bench-gpu bench-reliability lint format clean

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-9s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

setup: $(STAMP) ## create .venv and install vlp with its dev tools (idempotent)

demo: $(STAMP) ## build the demo shards, train the demo CLIP, evaluate it, write runs/demo/report/report.md
	$(PY) -m data_tools demo $(DEMO_DIR) --workers $(WORKERS)
	$(VENV)/bin/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no \
		--dynamo_backend no vlp/train.py
	$(PY) -m eval --checkpoint runs/demo --dataset $(DEMO_EVAL) --output runs/demo/eval
	$(PY) -m eval report runs/demo --dataset $(DEMO_EVAL)
	@echo "demo shards: $(DEMO_DIR)/train  eval sets: $(DEMO_DIR)/eval/{shapes,retrieval,binding/*}"
	@echo "demo run:    runs/demo (config.yaml, metrics.jsonl, history.jsonl, checkpoints/, eval/, report/)"
	@echo "report:      runs/demo/report/report.md"

test: $(STAMP) ## run the test suite (CPU only, a few minutes)
	$(PY) -m pytest -q

bench: $(STAMP) ## run the CPU benchmarks against their peers; results in bench/results/
	$(PY) bench/shard_vs_img2dataset.py
	$(PY) bench/train_vs_open_clip.py
	$(PY) bench/eval_vs_clip_benchmark.py
	$(PY) bench/retrieval_scale.py
	$(PY) bench/loss_memory.py
	$(PY) bench/step_costs.py
	$(PY) bench/dreamlip_ablation.py
	$(PY) bench/readme_table.py

STUDIES ?= studies/gap.yaml studies/gap_finetune.yaml studies/dreamlip.yaml studies/protoclip.yaml
STUDY_JOBS ?= 1
studies: $(STAMP) ## method studies and quality vs open_clip (hours on 2 cores; resumable): README tables
	@for study in $(STUDIES); do \
		start=$$(date +%s); \
		$(PY) -m vlp.study $$study --jobs $(STUDY_JOBS) || exit $$?; \
		echo "$$study: $$(( $$(date +%s) - start )) s wall time"; \
	done
	@start=$$(date +%s); $(PY) bench/quality_vs_open_clip.py || exit $$?; \
		echo "bench/quality_vs_open_clip.py: $$(( $$(date +%s) - start )) s wall time"
	$(PY) bench/readme_table.py

GPU_PY ?= python3
GPU_ARGS ?=
bench-gpu: ## bf16 CLIP/CoCa on a GPU vs open_clip: samples/s, MFU, memory; GPU k-means (bench/README.md)
	$(GPU_PY) bench/gpu.py $(GPU_ARGS)
	$(GPU_PY) bench/kmeans_gpu.py

bench-reliability: $(STAMP) ## kill/disk-full/corrupt-data/bad-input trials; bench/results/reliability.json
	$(PY) bench/reliability.py

lint: $(STAMP) ## check style with ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: ## remove generated data, caches and benchmark scratch (keeps .venv; rm -rf .venv for that)
	rm -rf data runs bench/.work .pytest_cache .ruff_cache build *.egg-info
	find . -name __pycache__ -type d -prune -not -path './.venv/*' -exec rm -rf {} +
