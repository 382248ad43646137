#!/usr/bin/env bash
# A virtual environment HERE with the GPU machine's versions of what the suite imports, for a dry run of
# gpu_suite.sh that meets the device's torch and transformers before a device call does.
#
#   PYVER=3.11 WHL=/tmp/whl311 bash experiments/bench/gpu_prepare.sh   # the peers' wheels for this Python
#   WHEELS=/tmp/whl311 bash experiments/bench/device_venv.sh           # -> .venv/device (~6 GB, CUDA libraries)
#   PY=.venv/device/bin/python WHEELS=/tmp/whl311 DRY_RUN=1 bash experiments/bench/gpu_suite.sh /tmp/x
#
# Installed: torch 2.11.0, the device's CUDA build (PyPI has no other for Linux; it imports and runs on the CPU
# without a GPU); the device's transformers, tokenizers, accelerate, huggingface-hub and safetensors versions
# (device_packages.txt); what the project's tests need; and what the peers' wheels in WHEELS need from the device
# image (wheel_deps.py --device-requirements), at the device's version where the list has one. The Python is this
# machine's (3.11; the device has 3.12, and numpy 2.5, the device's, needs 3.12: numpy is left unpinned).
# Everything goes under the venv's own prefix: with packages outside sys.prefix, dill pickles them by value and
# datasets' fingerprinting fails (gpu_suite.sh's header).
#
# Settings (environment): PYTHON (default python3), VENV (default .venv/device), WHEELS (default .whl).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv/device}
WHEELS=${WHEELS:-.whl}
pin() {  # the device's pinned version of a package, from device_packages.txt
  grep -i "^$1==" experiments/bench/device_packages.txt || { echo "error: device_packages.txt pins no $1" >&2; exit 1; }
}
compgen -G "$WHEELS/*.whl" > /dev/null || { echo "error: $WHEELS: no .whl files (gpu_prepare.sh fills it)" >&2; exit 2; }
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet torch==2.11.0
"$VENV/bin/python" -m pip install --quiet "$(pin transformers)" "$(pin tokenizers)" "$(pin accelerate)" \
  "$(pin huggingface-hub)" "$(pin safetensors)" numpy pandas pyarrow tensorboard tqdm pytest pyyaml
pyver=$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
"$VENV/bin/python" experiments/bench/wheel_deps.py "$WHEELS" --python "$pyver" --device-requirements \
  | sed 's/^numpy==.*/numpy/' > "$VENV/peer-requirements.txt"
"$VENV/bin/python" -m pip install --quiet -r "$VENV/peer-requirements.txt"
"$VENV/bin/python" - <<'EOF'
import accelerate, platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"accelerate {accelerate.__version__}")
EOF
