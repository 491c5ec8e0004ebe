# The two set-up commands: `make install && make demo`, `make install && make test`.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTHON := $(BIN)/python
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast lint demo train eval sample sweep bench table1 ablation latents assets clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

# ---- workflow targets (ARGS passes Hydra overrides, e.g. make train ARGS="objective=score") ----
demo: install
	$(PYTHON) train.py experiment=demo $(ARGS)

train: install
	$(PYTHON) train.py $(ARGS)

sweep: install
	$(PYTHON) train.py -m experiment=digits objective=diffusion,score,flow $(ARGS)

# CKPT goes to Hydra quoted: checkpoint names contain '=' (step=0010000.ckpt)
eval: install
	$(PYTHON) evaluate.py "ckpt='$(CKPT)'" $(ARGS)

# a sample grid + ADM .npz from a checkpoint or published weights: make sample CKPT=path [ARGS="cfg_scale=4"],
# make sample ARGS="experiment=published_dit_xl" (weights from `make assets ARGS="--published dit_xl"`)
sample: install
	$(PYTHON) sample.py "ckpt='$(CKPT)'" $(ARGS)

# The latent cache, built once before training (docs/DATA.md). LAUNCH runs it on several GPUs:
#   make latents LAUNCH="$(BIN)/torchrun --standalone --nproc_per_node=8 --no-python" ARGS="data.root=..."
#   make latents LAUNCH=srun ARGS="data.root=..."   (inside an sbatch allocation: one task per GPU)
# ARGS may start with --verify (re-check every shard, re-encode damaged ones) or --retry-failed.
latents: install
	$(LAUNCH) $(PYTHON) -m datamodules.latent_imagenet encode $(ARGS)

assets: install
	$(PYTHON) -m datamodules.assets $(ARGS)

bench: install
	$(PYTHON) benchmarks/run_all.py $(ARGS)

# Table 1 and the factorial ablation on digits (hours on 2 cores; ARGS=--quick: the same path at small sizes).
# Each ends by printing where its report is (results/table1[_quick].md, results/ablation[_quick].md).
table1: install
	$(PYTHON) benchmarks/table1.py $(ARGS)

ablation: install
	$(PYTHON) benchmarks/ablation.py $(ARGS)
