# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
QWEN3VL := $(VENV)/bin/qwen3vl
# The default model that ships with the project: a synthetic checkpoint made on first use.
DEMO_CHECKPOINT ?= checkpoints/demo-small
MODEL ?= $(DEMO_CHECKPOINT)
ENGINE ?= engines/$(notdir $(abspath $(MODEL)))
PRECISION ?= fp32
BACKEND ?= ort
MAX_CONTEXT ?= 8192
IMAGE ?= assets/sample.png
PROMPT ?= Describe this image.
# pip finds torch==2.13.0 (CPU build) in a local wheel folder where the machine has one.
PIP_LOCAL := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: install engine demo test bench-test checkpoint clean plugins kernels

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIP_LOCAL) -e '.[test]'
	touch $@

install: $(VENV)/.installed

$(DEMO_CHECKPOINT)/config.json: | $(VENV)/.installed
	$(QWEN3VL) synth --preset small --out $(DEMO_CHECKPOINT) --force

checkpoint: $(DEMO_CHECKPOINT)/config.json

# The build step: checkpoint folder (MODEL=, default the demo checkpoint) -> engine folder (ENGINE=).
engine: install $(if $(filter $(MODEL),$(DEMO_CHECKPOINT)),checkpoint)
	$(QWEN3VL) build --checkpoint $(MODEL) --out $(ENGINE) --backend $(BACKEND) --precision $(PRECISION) --max-context $(MAX_CONTEXT) $(if $(KV_DTYPE),--kv-dtype $(KV_DTYPE))

demo: engine
	$(QWEN3VL) run --engine $(ENGINE) --image $(IMAGE) --prompt "$(PROMPT)" --max-new-tokens 32

test: install
	$(PY) -m pytest -q

# Full-size (2B) checks; they need about 20 GB of RAM and several minutes.
bench-test: install
	$(PY) -m pytest -q -m slow -o addopts="-ra"

# TensorRT plugins (libqwen3vl_plugins.so + libqwen3vl_kernels.so in build/plugins): needs a CUDA
# toolkit (12.x for Pascal) and TensorRT headers, TENSORRT_ROOT=/path/to/TensorRT if not in /usr.
plugins:
	cmake -S trt_plugins -B build/plugins -DCMAKE_BUILD_TYPE=Release $(if $(TENSORRT_ROOT),-DTENSORRT_ROOT=$(TENSORRT_ROOT)) && cmake --build build/plugins -j

# The CUDA kernels alone (libqwen3vl_kernels.so in build/kernels): no TensorRT needed.
kernels:
	cmake -S trt_plugins -B build/kernels -DCMAKE_BUILD_TYPE=Release -DQWEN3VL_KERNELS_ONLY=ON && cmake --build build/kernels -j --target qwen3vl_kernels

clean:
	rm -rf $(VENV) checkpoints engines
