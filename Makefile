# Two commands on a fresh machine: `make demo` and `make test`. Both (re)build .venv from the pinned
# requirements.txt when it is missing or older than requirements.txt.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
WORKDIR ?= runs/demo

# XLA's CPU runtime allocates heavily; glibc's hugetlb tunable (no install needed) and, where the
# Debian package libtcmalloc-minimal4 is installed, the CNN runs with tcmalloc (its large
# temporary buffers are cheaper to allocate).
TCMALLOC := $(firstword $(wildcard /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4))
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1
ifneq ($(TCMALLOC),)
export LD_PRELOAD := $(TCMALLOC)
endif
export PYTHONUNBUFFERED := 1

.PHONY: venv ants test lint demo bench bench-torch mni152 quality clean

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@touch $(STAMP)

# The oneDNN convolution extension (jule3d/onednn.py), compiled into the virtualenv when its source
# changes; a failed build prints one line and conv_impl 'auto' keeps im2col.
BUILD_STAMP := $(VENV)/jule3d-build/.built
$(BUILD_STAMP): $(STAMP) jule3d/csrc/onednn_conv.cc jule3d/onednn.py
	@$(PY) -m jule3d.onednn
	@mkdir -p $(@D) && touch $@

venv: $(STAMP) $(BUILD_STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: venv lint ants
	$(PY) -m pytest -q -p no:cacheprovider

# ANTsPy (the Atropos baseline) in its own virtualenv: its wheels pin an older numpy/scipy. Optional:
# when it cannot be installed the reports skip that baseline with one log line.
ANTS_VENV := .venv-ants
ANTS_STAMP := $(ANTS_VENV)/.ants-installed
$(ANTS_STAMP): requirements-ants.txt
	@test -x $(ANTS_VENV)/bin/python || $(PYTHON) -m venv $(ANTS_VENV)
	$(ANTS_VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-ants.txt
	@touch $(ANTS_STAMP)

ants:
	@$(MAKE) --no-print-directory $(ANTS_STAMP) || echo "antspyx could not be installed: the Atropos baseline will be skipped"

demo: venv ants
	$(PY) launch.py --config=configs/demo.py --workdir=$(WORKDIR) $(ARGS)

MNI_STAMP := $(VENV)/.mni152-installed
$(MNI_STAMP): requirements-mni152.txt $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-mni152.txt
	@touch $(MNI_STAMP)

mni152: $(MNI_STAMP) $(BUILD_STAMP) ants
	$(PY) launch.py --config=configs/mni152.py --workdir=runs/mni152 $(ARGS)

# The segmentation-quality table (bench/quality.py): phantoms and MNI152, three seeds, the ablations.
quality: $(MNI_STAMP) $(BUILD_STAMP) ants
	$(PY) bench/quality.py --write $(ARGS)

# PyTorch only for the comparison benchmark: its own virtualenv, never the project's .venv.
TORCH_VENV := .venv-torch
TORCH_STAMP := $(TORCH_VENV)/.torch-installed
$(TORCH_STAMP):
	@test -x $(TORCH_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 numpy
	@touch $(TORCH_STAMP)

bench-torch: venv $(TORCH_STAMP)
	$(PY) bench/bench_torch.py --layers --write

# Every benchmark, each rewriting its BENCHMARKS.md section and bench/results.json; the pipeline
# benchmark last (its projection reads the others' figures).
bench: venv $(TORCH_STAMP)
	@start=$$(date +%s); set -e; \
	$(PY) bench/bench_graph.py --write; \
	$(PY) bench/bench_cnn.py --bf16 --write; \
	$(PY) bench/bench_sampling.py --write; \
	$(PY) bench/bench_dense.py --write; \
	$(PY) bench/bench_torch.py --layers --write; \
	$(PY) bench/profile_conv.py --write; \
	$(PY) bench/bench_pipeline.py --write; \
	echo "make bench: $$(( $$(date +%s) - start )) s"

clean:
	rm -rf runs .pytest_cache .ruff_cache
