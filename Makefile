# Two commands: `make demo` and `make test`. Both create/update .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# `make demo DEMO_MODEL=ViT-B-16 DEMO_PRETRAINED=openai` uses real CLIP (downloads its weights once).
DEMO_DIR ?= demo
DEMO_MODEL ?= test-ViT-tiny
DEMO_PRETRAINED ?= none
DEMO_EPOCHS ?= 8

export PREFECT_SERVER_ANALYTICS_ENABLED = false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 120
export PREFECT_HOME ?= $(CURDIR)/.prefect

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	rm -rf $(DEMO_DIR)
	$(PY) -m pipeline.synthetic $(DEMO_DIR)/scenes --small --scenes 4
	$(PY) -m flows.extract_clip --root $(DEMO_DIR)/scenes --dataset synthetic \
		--store $(DEMO_DIR)/features.zarr --model $(DEMO_MODEL) --pretrained $(DEMO_PRETRAINED)
	$(PY) -m storage.inspect $(DEMO_DIR)/features.zarr
	$(PY) -m model.train --cache $(DEMO_DIR)/features.zarr --out $(DEMO_DIR)/run \
		--epochs $(DEMO_EPOCHS)
	$(PY) -m model.evaluate --cache $(DEMO_DIR)/features.zarr \
		--checkpoint $(DEMO_DIR)/run/checkpoints/last.pt --render
	@echo
	@echo "demo outputs: scenes $(DEMO_DIR)/scenes, store $(DEMO_DIR)/features.zarr,"
	@echo "  run $(DEMO_DIR)/run (checkpoints/, metrics.jsonl, curves.png, tensorboard/,"
	@echo "  predictions/ with a PLY and a PNG per validation scene)"

clean:
	rm -rf $(DEMO_DIR) .prefect
