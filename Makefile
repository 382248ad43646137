# dpo-noise: every target that needs Python depends on `install` (a local .venv, built once).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DPO    := $(VENV)/bin/dpo
STAMP  := $(VENV)/.installed

# Settings are passed to `dpo` only when given (on the command line or in the environment): every default lives
# in one place, the dataclasses in dpo/core/config.py (`dpo data --help`, `dpo train --help`, `dpo eval --help`).
# `$(call flag,VAR,--var)` is `--var $(VAR)` for a VAR given and non-empty, else nothing.
given = $(and $(filter command line environment environment override,$(origin $(1))),$($(1)))
flag  = $(if $(call given,$(1)),$(2) $($(1)))

# Data settings: NOISE N SEED FORMAT. HELLASWAG_DIR: a folder holding hellaswag_{train,val}.jsonl
# (default: downloaded into data/raw). TRAIN_FROM_VAL=1 draws the training pool from validation items
# outside the evaluation set (for a local copy that has no train split). PAIRS=SRC: your own preference data
# instead of HellaSwag (a JSON, JSONL, CSV or Parquet file, a `datasets` folder, or a dataset on the hub,
# OWNER/NAME[:CONFIG]; `dpo data --help`).
PAIRS ?=
TRAIN_FILE ?=
VAL_FILE ?=
HELLASWAG_DIR ?= $(DPO_HELLASWAG_DIR)
TRAIN_FROM_VAL ?=

# Training / evaluation settings: MODEL LOSS EPS, RUN (the run name); ARGS passes any other flags.
RUN    ?=
ARGS   ?=
GPUS   ?=
GGUF_STAMP := $(VENV)/.installed-gguf
# the offline SmolLM2 alias and .gguf files need the `gguf` extra (gguf, accelerate), installed on demand
MODEL_B ?=
NEEDS_GGUF = $(if $(filter smollm2-135m %.gguf,$(MODEL) $(MODEL_B)),$(GGUF_STAMP))
# PAIRS=OWNER/NAME[:CONFIG] that names no local file or folder: a hub dataset, read with the `datasets` extra
DATASETS_STAMP := $(VENV)/.installed-datasets
HUB_ID = $(shell printf '%s' '$(PAIRS)' | grep -xE '[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?' \
	| grep -viE '\.(json|jsonl|ndjson|csv|parquet|arrow)$$')
NEEDS_DATASETS = $(if $(PAIRS),$(if $(wildcard $(PAIRS)),,$(if $(HUB_ID),$(DATASETS_STAMP))))

DATA_FLAGS = $(if $(TRAIN_FILE),--train-file $(TRAIN_FILE)) $(if $(VAL_FILE),--val-file $(VAL_FILE)) \
             $(if $(HELLASWAG_DIR),--hellaswag-dir $(HELLASWAG_DIR)) \
             $(if $(TRAIN_FROM_VAL),--train-from-val $(TRAIN_FROM_VAL))
PAIR_FLAGS = $(call flag,NOISE,--noise) $(call flag,N,--n) $(call flag,SEED,--seed) $(call flag,FORMAT,--format) \
             $(if $(PAIRS),--pairs $(PAIRS))

.PHONY: install test lint data train eval audit sweep report tensorboard clean-venv

install: $(STAMP)

# `$(call extra,NAME,MODULES)`: install the optional extra NAME unless its modules import already (the dev extra
# brings most of them), then stamp it
extra = $(PY) -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))' \
	$(2) || $(VENV)/bin/pip install --quiet -e '.[$(1)]'; touch $@

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

test: install
	$(VENV)/bin/ruff check dpo tests experiments
	$(PY) -m pytest -q tests experiments/bench

lint: install
	$(VENV)/bin/ruff check dpo tests experiments

# `make data` alone writes the original study's grid; NOISE/N/SEED/FORMAT/PAIRS given on the command line write one
# file (PAIRS: from your data; MODEL: the chat template of conversational rows; ARGS: any other flag).
data: install $(NEEDS_GGUF) $(NEEDS_DATASETS)
ifneq ($(filter command line,$(origin NOISE) $(origin N) $(origin SEED) $(origin FORMAT) $(origin PAIRS)),)
	$(DPO) data $(PAIR_FLAGS) $(call flag,MODEL,--model) $(DATA_FLAGS) $(ARGS)
else
	$(DPO) data --grid $(DATA_FLAGS) $(ARGS)
endif

$(GGUF_STAMP): $(STAMP)
	$(call extra,gguf,gguf accelerate)

$(DATASETS_STAMP): $(STAMP)
	$(call extra,datasets,datasets)

# Creates the data file it needs when missing or made from other data (same NOISE/N/SEED/FORMAT/HELLASWAG_DIR/
# TRAIN_FROM_VAL variables as `make data`). GPUS=K: K data-parallel processes on this machine (torchrun).
TRAIN_CMD = $(if $(GPUS),$(PY) -m torch.distributed.run --standalone --nproc-per-node $(GPUS) -m dpo,$(DPO))
train: install $(NEEDS_GGUF) $(NEEDS_DATASETS)
	$(TRAIN_CMD) train $(call flag,MODEL,--model) $(PAIR_FLAGS) $(call flag,LOSS,--loss) $(call flag,EPS,--eps) \
		$(call flag,RUN,--run-name) $(DATA_FLAGS) $(ARGS)

# How noisy is a preference file? `make audit FILE=data/dpo/x.json MODEL=smollm2-135m [VAL_FILE=clean.json]`
# (dpo audit --help): the reference model's noise-rate estimate and per-pair flip posteriors, into runs/audit/.
FILE ?=
audit: install $(NEEDS_GGUF)
	@test -n "$(FILE)" || { echo "usage: make audit FILE=data/dpo/completion_n1000_noise0.4_seed1.json [MODEL=...] [VAL_FILE=...]"; exit 2; }
	$(DPO) audit $(FILE) $(call flag,MODEL,--model) $(if $(VAL_FILE),--val-file $(VAL_FILE)) $(ARGS)

# Sweeps (see dpo/study/sweep.py and dpo/study/runner.py, experiments/*.toml): `make sweep SWEEP=experiments/noise.toml [GPUS=0,1,2,3]` runs
# every unfinished cell (safe to interrupt and rerun); LAUNCHER=slurm submits them to a Slurm cluster instead;
# `make report SWEEP=...` writes experiments/results/<sweep>/.
SWEEP ?=
LAUNCHER ?=
PLOTS_STAMP := $(VENV)/.installed-plots
# a sweep of the SmolLM2 alias or a .gguf model needs the `gguf` extra
SWEEP_GGUF = $(if $(SWEEP),$(if $(shell grep -lE '^model *= *"(smollm2-135m|[^"]*\.gguf)"' $(SWEEP) 2>/dev/null),$(GGUF_STAMP)))

# a sweep that lists lm-evaluation-harness tasks ([eval] lm_eval_tasks = ["...", ...]) needs the `harness` extra
HARNESS_STAMP := $(VENV)/.installed-harness
SWEEP_HARNESS = $(if $(SWEEP),$(if $(shell grep -lE '^lm_eval_tasks *= *\[ *"' $(SWEEP) 2>/dev/null),$(HARNESS_STAMP)))

$(PLOTS_STAMP): $(STAMP)
	$(call extra,plots,matplotlib)

$(HARNESS_STAMP): $(STAMP)
	$(call extra,harness,lm_eval)

sweep: install $(SWEEP_GGUF) $(SWEEP_HARNESS)
	@test -n "$(SWEEP)" || { echo "usage: make sweep SWEEP=experiments/noise.toml [GPUS=0,1,2,3]"; exit 2; }
	$(DPO) sweep $(SWEEP) $(if $(GPUS),--gpus $(GPUS)) $(if $(LAUNCHER),--launcher $(LAUNCHER)) $(ARGS)

report: install $(PLOTS_STAMP)
	@test -n "$(SWEEP)" || { echo "usage: make report SWEEP=experiments/noise.toml"; exit 2; }
	$(DPO) report $(SWEEP)

# Without MODEL: the newest run under runs/ against its base model. MODEL_B: a paired comparison.
eval: install $(NEEDS_GGUF)
	$(DPO) eval $(call flag,MODEL,--model) $(if $(MODEL_B),--model-b $(MODEL_B)) $(call flag,LIMIT,--limit) \
		$(call flag,SEED,--seed) $(DATA_FLAGS) $(ARGS)

# Every run under runs/ and experiments/runs/ (committed sweep cells get event files rebuilt from metrics.jsonl).
tensorboard: install
	$(PY) -m dpo.train.events runs experiments/runs
	$(VENV)/bin/tensorboard --logdir_spec runs:runs,experiments:experiments/runs

clean-venv:
	rm -rf $(VENV)
