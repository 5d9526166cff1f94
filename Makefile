# layerfuse: the README's commands are the contract.
#   make extract   phase one on the embedded default (creates .venv and installs on first use)
#   make train     phase two on it: stage 1, stage 2, then per-category accuracy on the val split
#   make test      the test suite
#   make default-tower  pretrain the shipped default vision tower again (~9 min) and compare it with the shipped files
#   make lock      rewrite constraints.txt from the venv (after a deliberate upgrade; README "Installation")
#
# Installation knobs (see README "Installation"):
#   TORCH_SPEC   what to install when the venv has no torch yet. Default torch==2.13.0 (a CPU wheel where
#                one is provided locally; PyPI's CUDA build elsewhere). Pin your own, e.g.
#                TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   VENV_FLAGS   e.g. --system-site-packages to reuse a container's torch (NGC images): a torch that is
#                already importable is always kept, never replaced.
#   EXTRAS       extra pip extras, e.g. EXTRAS=dev,s3; EXTRAS=dev,eval adds lmms-eval (CI's .ci/run does), so that
#                tests/pipeline/harness/test_lmms.py runs against it instead of skipping
#   LOCK         the pip constraints file the install follows, default constraints.txt: the exact version of
#                every dependency but torch, as tested and measured. LOCK= opts out (the newest versions
#                pyproject allows).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
EXTRAS ?= dev
PIP_FLAGS ?= -q
LOCK ?= constraints.txt
BIN := $(VENV)/bin
PY := $(BIN)/python
STAMP := $(VENV)/.layerfuse-installed

# Embedded default run: built-in synthetic data, tiny CLIP pretrained in code on built-in renders, MiniLM embeddings.
RUN ?= runs/default
N ?= 6000
SEED ?= 0
EXTRACT_ARGS ?=
PYTEST_ARGS ?=
# Phase two on the embedded default (README "Quick start"): stage 1 on the captions, stage 2 on everything.
FUSER ?= concat
LAYERS ?= 3-18-23
STAGE1_STEPS ?= 100
STAGE2_STEPS ?= 1200
STAGE2_LR ?= 1e-3
TRAIN_ARGS ?=
QUESTIONS := colour,shape,count,position,glyph,detail

.PHONY: help install lock extract train test default-tower bench kernel clean clean-train

help:
	@sed -n '/^[^#]/q;2,$$p' Makefile

# pip is held to the torch installed (torch-kept.txt): a requirement such as torchvision== never replaces it. PyPI's
# torchvision (lmms-eval, the eval extra, requires it) is a CUDA build: next to a CPU torch it does not load, and
# transformers, which imports an installed torchvision, then fails to import; such a torchvision is removed (lmms-eval
# runs the layerfuse model without it; its other models want the torchvision build that matches your torch).
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	   echo "layerfuse: keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	 else echo "layerfuse: installing $(TORCH_SPEC)"; $(BIN)/pip install $(PIP_FLAGS) $(TORCH_SPEC); fi
	@$(PY) -W ignore -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/torch-kept.txt
	$(BIN)/pip install $(PIP_FLAGS) $(if $(LOCK),-c $(LOCK)) -c $(VENV)/torch-kept.txt -e ".[$(EXTRAS)]"
	@if $(BIN)/pip show -q torchvision 2>/dev/null && ! $(PY) -c "import torchvision" 2>/dev/null; then \
	   echo "layerfuse: removing torchvision $$($(BIN)/pip show torchvision 2>/dev/null | sed -n 's/^Version: //p'), which does not load with torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	   $(BIN)/pip uninstall -q -y torchvision; fi
	@touch $@

install: $(STAMP)

# constraints.txt from this venv (issue #13: pin the versions behind quoted numbers): every installed distribution
# but layerfuse itself, pip, setuptools/wheel, and torch with the wheels that follow its build (torchvision, nvidia-*,
# triton): TORCH_SPEC, or the torch already installed, governs those (make install holds pip to the installed torch:
# $(VENV)/torch-kept.txt). Moving the lock: rm -rf .venv && make install
# LOCK= && make lock, then re-run what the README quotes.
LOCK_OUT := $(or $(LOCK),constraints.txt)
lock:
	@test -x $(PY) || { echo "make lock: no $(VENV) to lock; run make install first" >&2; exit 1; }
	@{ echo "# pip constraints (make install: pip install -c $(LOCK_OUT)), written by make lock from $(VENV) on"; \
	   $(PY) -c "import platform, torch; print(f'# Python {platform.python_version()}, {platform.system()} {platform.machine()}, ' \
	     f'torch {torch.__version__} (not pinned here: TORCH_SPEC or the installed torch governs it)')"; \
	   $(BIN)/pip list --format=freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
	     | grep -viE '^(layerfuse|pip|setuptools|wheel|torch|torchvision|triton|nvidia-[^=]*)=='; \
	 } > $(LOCK_OUT).tmp && mv $(LOCK_OUT).tmp $(LOCK_OUT)
	@echo "make lock: $$(grep -vc '^#' $(LOCK_OUT)) pins in $(LOCK_OUT)"

extract: $(STAMP)
	$(BIN)/layerfuse extract --run-dir $(RUN) --builtin $(N) --seed $(SEED) $(EXTRACT_ARGS)
	$(BIN)/layerfuse cache verify $(RUN)/cache

# --resume: a fresh run starts, a finished one is left alone, a killed one continues where it stopped.
# The default LLM starts from random weights, so stage 2 trains it at a from-scratch learning rate.
train: $(STAMP)
	@test -f $(RUN)/cache/zarr.json || { echo "make train: no cache at $(RUN)/cache; run make extract first" >&2; exit 1; }
	$(BIN)/layerfuse train --cache $(RUN)/cache --stage 1 --categories caption --fuser $(FUSER) --layers $(LAYERS) \
	  --max-steps $(STAGE1_STEPS) --llm-default-dir $(RUN)/llm --out $(RUN)/stage1 --resume $(TRAIN_ARGS)
	$(BIN)/layerfuse train --cache $(RUN)/cache --stage 2 --fuser $(FUSER) --init-from $(RUN)/stage1 \
	  --max-steps $(STAGE2_STEPS) --lr-fuser $(STAGE2_LR) --lr-projector $(STAGE2_LR) --lr-llm $(STAGE2_LR) \
	  --out $(RUN)/stage2 --resume $(TRAIN_ARGS)
	$(BIN)/layerfuse eval --run $(RUN)/stage2 --split val --categories $(QUESTIONS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

# make extract installs the pretrained default tower the package ships (pipeline/models/default_tower/) instead of
# pretraining it. This pretrains it again from its recipe with this code (~9 min on 2 idle cores) into a temporary
# folder and prints every file whose sha256 differs from the shipped one (exit 1 then). TOWER_ARGS=--record makes
# the rebuilt tower the shipped one.
TOWER_ARGS ?=
default-tower: $(STAMP)
	$(BIN)/layerfuse tower rebuild $(TOWER_ARGS)

bench: $(STAMP)
	$(PY) bench/extract.py --out BENCHMARKS.md
	$(PY) bench/derive.py --out BENCHMARKS.md
	$(PY) bench/wds.py --out BENCHMARKS.md
	$(PY) bench/compression.py --out BENCHMARKS.md
	$(PY) bench/quantize.py --out BENCHMARKS.md
	$(PY) bench/codec.py --out BENCHMARKS.md
	$(PY) bench/storage.py --out BENCHMARKS.md
	$(PY) bench/msda.py --out BENCHMARKS.md
	$(PY) bench/export.py --out BENCHMARKS.md
	$(PY) bench/train.py --out BENCHMARKS.md
	$(PY) bench/ablate.py --out BENCHMARKS.md
	@if $(PY) -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then \
	   $(PY) -m layerfuse.plugins_trt.gpu_check --out BENCHMARKS.md; \
	 else echo "bench: no CUDA device, skipping plugins_trt/gpu_check.py (the MSDeformAttn kernel)"; fi

# MSDeformAttn CUDA kernel, its CPU build and (when TENSORRT_ROOT or the system has TensorRT headers) the TensorRT
# plugin, into plugins_trt/build/ (CMake tree in plugins_trt/build/cmake): plugins_trt/build.py drives
# plugins_trt/CMakeLists.txt with the cmake and ninja PyPI packages (the dev and kernel extras), as the tests and
# kernel.register() do. CUDA_ARCHS="80;90" picks the architectures (default: LAYERFUSE_CUDA_ARCHS, else those the
# build folder was configured with, else 80;90).
CUDA_ARCHS ?=
kernel: $(STAMP)
	$(PY) -m layerfuse.plugins_trt.build $(if $(CUDA_ARCHS),--archs "$(CUDA_ARCHS)")

# GPU evidence in one go (README "GPU check"): `make gpu-check` on a GPU machine (H100/H200: at most 8 minutes)
# measures the MSDeformAttn kernel, extraction at ViT-L/14-336, mmfuser training with a 0.5B-shaped LLM and the ONNX
# front end on onnxruntime CUDA into BENCHMARKS.md (and $$OUT). It needs only the machine's python with torch: the
# wheels of `make gpu-wheels` (downloaded here for GPU_PYTHONS) and the kernel of `make gpu-kernel` (built here with
# nvcc for GPU_ARCH) are carried in .gpu-wheels/. GPU_ARGS e.g. --budget 300 --parts kernel,extract.
GPU_WHEELS ?= .gpu-wheels
GPU_PYTHONS ?= 3.11 3.12
GPU_ARCH ?= 90
GPU_ARGS ?=
.PHONY: gpu-check gpu-wheels gpu-kernel
gpu-check:
	$(PYTHON) bench/gpu.py --wheels $(GPU_WHEELS) $(GPU_ARGS)

gpu-wheels: $(STAMP)
	$(PY) bench/gpu_env.py download --dest $(GPU_WHEELS) --pythons "$(GPU_PYTHONS)"

gpu-kernel: $(STAMP)
	$(PY) -m layerfuse.plugins_trt.build --build-dir .gpu-kernel --archs "$(GPU_ARCH)" --no-host --plugin off -q
	@mkdir -p $(GPU_WHEELS)/kernel && cp .gpu-kernel/libmsda_kernel.so $(GPU_WHEELS)/kernel/libmsda_kernel.so
	@echo "gpu-kernel: $(GPU_WHEELS)/kernel/libmsda_kernel.so (sm_$(GPU_ARCH), CUDA $$(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'))"

clean:
	rm -rf $(RUN) .pytest_cache

clean-train:
	rm -rf $(RUN)/stage1 $(RUN)/stage2 $(RUN)/llm
