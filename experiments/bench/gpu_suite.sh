#!/usr/bin/env bash
# The GPU benchmark: every GPU figure of BENCHMARKS.md, in one run of ~6 minutes on one H100-class GPU.
#
#   pip install -e . trl lm_eval                          # the peers are optional: a part whose package is
#   bash experiments/bench/gpu_suite.sh OUT_DIR           # missing is skipped (eval then runs dpo eval alone)
#   DRY_RUN=1 bash experiments/bench/gpu_suite.sh /tmp/x  # on the CPU: the same parts, small (a 2-layer GPT-2,
#                                                         # 32 pairs, 2 steps, 40 items): the control flow, no figures
#
# Parts, in this order (the most needed figures first), each under its own timeout and all within BUDGET seconds; a
# part that fails is recorded (with the tail of its output) and the rest still run:
#   env             device name, versions, date (suite_report.py env)
#   data            320 mc pairs from HellaSwag with `dpo data` (DPO_HELLASWAG_DIR, else downloaded)
#   model           random-weight GPT-2 Large with TOKENIZER's tokenizer (random_gpt2.py; speed needs the shape,
#                   not the weights)
#   cuda_tests      pytest -k cuda (the tests that need a GPU; they skip without one)
#   train_default   dpo train with its GPU defaults (one 16-pair micro-batch, bf16, compiled), 20 steps on the
#                   320 pairs (gpu_throughput.py)
#   train_seed      the same with the seed's 4 x 4 micro-batches + gradient checkpointing
#   trl_precompute  TRL's DPOTrainer, 4 x 4 + gradient checkpointing + bf16 (autocast), precompute_ref_log_probs=True,
#                   20 steps on the same pairs (trl_dpo.py)
#   eval            dpo eval (completion metric) vs lm-evaluation-harness on 1000 items, bf16, batch 16, the
#                   harness's request phase timed apart from its model load (eval_speed.py --device cuda)
#   profile         torch.profiler over 3 steps of the GPU default after 3 unprofiled ones (profile_step.py, the
#                   cached reference of train_default): the top CUDA kernels and the share of the step the GPU was
#                   busy, so that a run that misses a target also says where the time went
#   trl             TRL as in trl_precompute, with its frozen reference copy instead (its default)
# After every part, suite_report.py rewrites OUT_DIR/gpu_suite.json (every figure, the ratios, versions, each part's
# status), so what finished is there even if the run is cut short. Also written: OUT_DIR/gpu_suite.log (all output)
# and OUT_DIR/gpu_suite_runs.tar.gz (the parts' small files: metrics.jsonl, summaries, results, the profile's
# operator table).
#
# Settings (environment): PY (default python3; DRY_RUN: .venv/bin/python when there is one), DPO_HELLASWAG_DIR (a
# folder with hellaswag_val.jsonl, and hellaswag_train.jsonl unless DPO_TRAIN_FROM_VAL=1), TOKENIZER (a hub id or a
# folder; default gpt2), BUDGET (seconds; 360, DRY_RUN 1500), WORK (a temporary folder, removed at the end unless
# KEEP_WORK=1).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false TQDM_MININTERVAL=10
OUT_DIR=${1:?usage: gpu_suite.sh OUT_DIR}
mkdir -p "$OUT_DIR" && OUT_DIR=$(cd "$OUT_DIR" && pwd)
# folders given relative to where the suite was started, made absolute before it moves to the repo root
if [ -n "${DPO_HELLASWAG_DIR:-}" ]; then
  DPO_HELLASWAG_DIR=$(cd "$DPO_HELLASWAG_DIR" && pwd) || exit 2
  export DPO_HELLASWAG_DIR
fi
if [ -d "${TOKENIZER:-}" ]; then TOKENIZER=$(cd "$TOKENIZER" && pwd); fi
cd "$(dirname "$0")/../.."
REPO=$PWD
DRY_RUN=${DRY_RUN:-0}
TOKENIZER=${TOKENIZER:-gpt2}
WORK=${WORK:-$(mktemp -d /tmp/gpu_suite.XXXXXX)}
mkdir -p "$WORK/logs"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # this repo's dpo package

if [ "$DRY_RUN" = 1 ]; then
  PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  BUDGET=${BUDGET:-1500}
  DEVICE=cpu MODEL_SHAPE=(--n-layer 2 --n-embd 64 --n-head 2) N_PAIRS=32 STEPS=2 STEADY_FROM=2 ITEMS=40
  MAX_LENGTH=256 TRL_PRECISION=()  # TRL's bf16 autocast runs ~10x slower than fp32 on this CPU
  CAP_SCALE=4  # a 2-core CPU needs longer than the GPU for some parts, even at this size
else
  PY=${PY:-python3}
  BUDGET=${BUDGET:-360}
  DEVICE=cuda MODEL_SHAPE=() N_PAIRS=320 STEPS=20 STEADY_FROM=6 ITEMS=1000 MAX_LENGTH=1024 TRL_PRECISION=(--bf16)
  CAP_SCALE=1
fi
MODEL=$WORK/model
PAIRS=$WORK/data/mc_n${N_PAIRS}_noise0_seed1.json
HELLASWAG_VAL=${DPO_HELLASWAG_DIR:-$WORK/raw}/hellaswag_val.jsonl  # dpo data downloads into $WORK/raw without it
LOG=$OUT_DIR/gpu_suite.log
: > "$LOG"

say() { echo "$*" | tee -a "$LOG"; }

record() {  # record NAME STATUS RC SECONDS NOTE: one line of the ledger, then the report rewritten
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >> "$WORK/parts.tsv"
  "$PY" experiments/bench/suite_report.py report "$WORK" "$OUT_DIR/gpu_suite.json" >> "$LOG" 2>&1 \
    || say "   (suite_report.py failed: see the log)"
}

part() {  # part NAME CAP_SECONDS CMD...: run CMD under min(CAP, what is left of BUDGET) seconds
  local name=$1 cap=$2 left t0 rc status note=""
  shift 2
  cap=$((cap * CAP_SCALE)) left=$((BUDGET - SECONDS))
  if [ "$left" -lt 15 ]; then
    say "-- $name: skipped (${BUDGET}s budget spent)"
    record "$name" skipped "" 0 "budget spent"
    return
  fi
  [ "$cap" -lt "$left" ] || cap=$left
  say "-- $name (timeout ${cap}s): $*"
  t0=$SECONDS
  timeout -k 10 "$cap" "$@" > "$WORK/logs/$name.log" 2>&1
  rc=$?
  { echo "---- $name output"; cat "$WORK/logs/$name.log"; } >> "$LOG"
  case $rc in
    0) status=ok ;;
    124|137) status=timeout note="killed after ${cap}s" ;;
    *) status=failed note=$(tail -n 1 "$WORK/logs/$name.log" | cut -c1-300) ;;
  esac
  say "   $name: $status in $((SECONDS - t0))s${note:+ ($note)}"
  [ "$status" = ok ] || tail -n 15 "$WORK/logs/$name.log" | sed 's/^/   | /'
  record "$name" "$status" "$rc" "$((SECONDS - t0))" "$note"
}

skip() {  # skip NAME REASON
  say "-- $1: skipped ($2)"
  record "$1" skipped "" 0 "$2"
}

installed() {  # installed MODULE: true when PY finds it, without importing it
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)"
}

say "gpu_suite: DRY_RUN=$DRY_RUN PY=$PY WORK=$WORK budget ${BUDGET}s, $(date -u +%FT%TZ)"
printf 'dry_run\t%s\nbudget_s\t%s\nsteps\t%s\nsteady_from\t%s\nn_pairs\t%s\nitems\t%s\nmax_length\t%s\n' \
  "$DRY_RUN" "$BUDGET" "$STEPS" "$STEADY_FROM" "$N_PAIRS" "$ITEMS" "$MAX_LENGTH" > "$WORK/settings.tsv"

train() {  # train PRESET: one `dpo train` run through gpu_throughput.py
  part "train_$1" 120 "$PY" experiments/bench/gpu_throughput.py --model "$MODEL" --pairs "$PAIRS" --presets "$1" \
    --steps "$STEPS" --steady-from "$STEADY_FROM" --work "$WORK/train" --out "$WORK/train_$1.json" \
    -- --device "$DEVICE" --max-length "$MAX_LENGTH"
  rm -rf "$WORK/train/$1/checkpoints" "$WORK/train/$1/final"  # GPT-2 Large: ~12 GB of weights and optimizer state
}

trl() {  # trl NAME [--precompute-ref]: TRL's DPOTrainer through trl_dpo.py, skipped when trl is not installed
  if installed trl; then
    part "$1" 75 "$PY" experiments/bench/trl_dpo.py --model "$MODEL" --pairs "$PAIRS" --n-pairs "$N_PAIRS" \
      --max-steps "$STEPS" --steady-from "$STEADY_FROM" --micro-batch 4 --grad-accum 4 --max-length "$MAX_LENGTH" \
      --gradient-checkpointing --beta 0.1 --lr 5e-7 --device "$DEVICE" "${TRL_PRECISION[@]}" "${@:2}" \
      --out "$WORK/$1.json"
  else
    skip "$1" "trl is not installed for $PY"
  fi
}

eval_both() {  # dpo eval vs the harness (dpo eval alone when lm_eval is not installed)
  local args=(--device "$DEVICE" --model "$MODEL" --data "$HELLASWAG_VAL" --limit "$ITEMS" --batch-size 16
              --out "$WORK/eval.json")
  if installed lm_eval; then
    part eval 120 "$PY" experiments/bench/eval_speed.py "${args[@]}" --harness-python "$PY"
  else
    say "   (lm_eval is not installed for $PY: dpo eval alone)"
    part eval 120 "$PY" experiments/bench/eval_speed.py "${args[@]}" --no-harness
  fi
}

# In order of what the figures need most, should the budget run out: the GPU default's MFU, the seed config
# against TRL at its fastest, the evaluation ratio, then TRL with its reference copy.
part env 30 "$PY" experiments/bench/suite_report.py env "$WORK/env.json"
part data 120 "$PY" -m dpo data --format mc --n "$N_PAIRS" --raw-dir "$WORK/raw" --out-dir "$WORK/data"
part model 60 "$PY" experiments/bench/random_gpt2.py "$MODEL" --tokenizer "$TOKENIZER" "${MODEL_SHAPE[@]}"
part cuda_tests 90 "$PY" -m pytest -q -p no:cacheprovider tests -k cuda --junitxml="$WORK/cuda_tests.xml"
train default
train seed
trl trl_precompute --precompute-ref
eval_both
part profile 90 "$PY" experiments/bench/profile_step.py --out-dir "$WORK/profile" --warmup 3 --steps 3 \
  --model "$MODEL" --train-data-path "$PAIRS" --cache-dir "$WORK/train/cache-default" --learning-rate 5e-7 \
  --device "$DEVICE" --max-length "$MAX_LENGTH"
trl trl

(cd "$WORK" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.tsv' -o -name '*.xml' \
   -o -name '*.log' -o -name '*.txt' \) -size -4M -not -path './raw/*' -not -path './model/*' -not -path '*/final/*' \
   -not -path '*/checkpoints/*' -print0 | tar czf "$OUT_DIR/gpu_suite_runs.tar.gz" --null -T -)
"$PY" experiments/bench/suite_report.py report "$WORK" "$OUT_DIR/gpu_suite.json" --table 2>> "$LOG" | tee -a "$LOG"
say "gpu_suite: done in ${SECONDS}s: $OUT_DIR/gpu_suite.json, gpu_suite.log, gpu_suite_runs.tar.gz"
[ "${KEEP_WORK:-0}" = 1 ] || rm -rf "$WORK"
