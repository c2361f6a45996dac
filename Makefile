# Two commands on a fresh machine:  `make demo`  (the main job)  and  `make test`  (the suite).
# Both create/refresh .venv and install the project into it first.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
SHARED := $(abspath ../shared)
EXTRAS ?= cpu,monitoring,dev

# Machines here have no internet: when the offline backbone file sits beside the repo, use it
# (real users get weights="imagenet" from Keras by default).
ifneq ($(wildcard $(SHARED)/weights/mobilenetv2_1.00_160_no_top.weights.h5),)
export CRACKQ_BACKBONE_WEIGHTS ?= $(SHARED)/weights/mobilenetv2_1.00_160_no_top.weights.h5
endif

.PHONY: venv demo test bench soak clean bench-generalisation

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@touch $(STAMP)

venv: $(STAMP)

## make demo: classify sample images on the embedded default (private Redis + local workers):
## generated samples (patches + a large GPS-tagged photo), plus real photos from ../shared if present.
DEMO_DIR  := demo-out
DEMO_REAL := $(if $(wildcard $(SHARED)/data/concrete),'$(SHARED)/data/concrete/*/001*.jpg')
demo: venv
	$(BIN)/crackq samples $(DEMO_DIR)/samples
	$(BIN)/crackq run $(DEMO_DIR)/samples $(DEMO_REAL) --out $(DEMO_DIR)/results.csv \
		--overlays $(DEMO_DIR)/overlays
	@echo "results: $(DEMO_DIR)/results.csv   crack maps: $(DEMO_DIR)/overlays/"

## make test: the whole suite (real Redis, real workers, real images from ../shared).
test: venv
	$(BIN)/python -m pytest -q -p no:cacheprovider

## make bench: throughput comparison measured in one run (long; not part of the tests).
## Every benchmark runs from the repository root as `python -m benchmarks.NAME`.
bench: venv
	$(BIN)/python -m benchmarks.throughput

## make soak: >= 20,000 images through the embedded service, memory and Redis watched (long).
soak: venv
	$(BIN)/python -m benchmarks.soak

## make bench-generalisation: the shipped model and `crackq run` on labelled folders it never trained on:
## tiles (from masks) of the held-out uav-concrete TEST photos at 224 and 112 px, plus the Özgenel test split;
## then the leave-one-source-out table.  Add folders with GEN_FOLDERS='dir1 dir2'.
GEN_DIR := bench-out/generalisation
UAV     := $(SHARED)/data/uav-concrete
bench-generalisation: venv
	rm -rf $(GEN_DIR) && mkdir -p $(GEN_DIR)
	for s in 224 112; do $(BIN)/crackq tiles from-masks $(UAV)/images $(UAV)/masks --out $(GEN_DIR)/uav-test-$$s \
		--size $$s --photos-list models/uav_split.json --split test; done
	$(BIN)/python -m benchmarks.split_folder models/split.json test $(GEN_DIR)/ozgenel-test
	$(BIN)/python -m benchmarks.generalisation $(GEN_DIR)/ozgenel-test $(GEN_DIR)/uav-test-224 \
		$(GEN_DIR)/uav-test-112 $(GEN_FOLDERS)

clean:
	rm -rf $(DEMO_DIR) .pytest_cache
