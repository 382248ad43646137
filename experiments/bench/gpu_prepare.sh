#!/usr/bin/env bash
# Prepare the one-call GPU benchmark (gpu_suite.sh) HERE, where PyPI is reachable; the device machine has no network.
#
#   bash experiments/bench/gpu_prepare.sh
#
# Fills two ignored folders of the repo root, which the device call carries (carry: [".whl", ".gpu"]):
#   .whl/  wheels of what the suite needs and the device image lacks (TRL, datasets, lm-evaluation-harness and their
#          missing requirements; pure-Python sdists built into wheels), for CPython $PYVER on x86-64 Linux, checked
#          by wheel_deps.py against device_packages.txt (every requirement met, one wheel per project)
#   .gpu/  tokenizer/ (SmolLM2-135M's tokenizer files, ~3.4 MB), pairs.json (the first 320 pairs of the seed's
#          dpo_000-1.json), hellaswag_val.jsonl (its first 1000 lines)
# Then prints the size of everything that travels (the repo's files + both folders; the limit is 64 MiB).
#
# Settings (environment): PY (the project's python, for `python -m dpo.models`; default .venv/bin/python, else
# python3), HELLASWAG (default ../shared/hellaswag), PYVER (default 3.12, the device's), WHL (default .whl),
# GPU_DATA (default .gpu). The dry run of the suite on a CPython 3.11 here uses PYVER=3.11 WHL=<another folder>.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
HELLASWAG=${HELLASWAG:-../shared/hellaswag}
PYVER=${PYVER:-3.12}
WHL=${WHL:-.whl}
GPU_DATA=${GPU_DATA:-.gpu}

# Not on the device (its package list: experiments/bench/device_packages.txt); one version of each.
WHEELS=(
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19                      # TRL + datasets
  lm_eval==0.4.13 evaluate==0.4.6 more-itertools==11.2.1 nltk==3.10.4 defusedxml==0.7.1  # the harness
  pytablewriter==1.2.1 dataproperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 tabledata==1.3.5
  tcolorpy==0.1.7 typepy==1.3.5 chardet==5.2.0 pytz==2026.6
)
SDISTS=(rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1)  # no wheels on PyPI: built here (pure Python)

echo "== wheels for CPython $PYVER -> $WHL/"
rm -rf "$WHL" && mkdir -p "$WHL"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$WHL" "${WHEELS[@]}"
python3 -m pip wheel --quiet --no-deps -w "$WHL" "${SDISTS[@]}"
"$PY" experiments/bench/wheel_deps.py "$WHL" --python "$PYVER"

echo "== data -> $GPU_DATA/"
tok=$("$PY" -m dpo.models smollm2-135m)  # downloads and converts once (needs the gguf extra), then a cache folder
rm -rf "$GPU_DATA" && mkdir -p "$GPU_DATA/tokenizer"
for f in tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja; do
  if [ -f "$tok/$f" ]; then cp "$tok/$f" "$GPU_DATA/tokenizer/"; fi
done
"$PY" - "$HELLASWAG/seed/dpo_000-1.json" "$GPU_DATA/pairs.json" <<'EOF'
import json, sys
pairs = json.load(open(sys.argv[1]))[:320]
assert len(pairs) == 320, f"{sys.argv[1]}: {len(pairs)} pairs, expected at least 320"
json.dump(pairs, open(sys.argv[2], "w"))
EOF
head -n 1000 "$HELLASWAG/hellaswag_val.jsonl" > "$GPU_DATA/hellaswag_val.jsonl"
[ "$(wc -l < "$GPU_DATA/hellaswag_val.jsonl")" -eq 1000 ] || { echo "error: $HELLASWAG/hellaswag_val.jsonl: fewer than 1000 lines"; exit 1; }

echo "== what travels"
du -sh "$WHL" "$GPU_DATA"
total=$( { git ls-files -z --cached --others --exclude-standard; find "$WHL" "$GPU_DATA" -type f -print0; } \
         | du -cb --files0-from=- | tail -1 | cut -f1 )
echo "total: $((total / 1024 / 1024)) MiB of the 64 MiB limit (repo files + $WHL + $GPU_DATA)"
[ "$total" -lt $((48 * 1024 * 1024)) ] || { echo "error: over 48 MiB: too close to the limit"; exit 1; }
echo "carry: [\"$WHL\", \"$GPU_DATA\"]"
