#!/usr/bin/env bash
# Usage: peer_venv.sh NAME PACKAGE...   -> prints the python of a separate venv with torch==2.13.0 + PACKAGEs.
# Peers (TRL, lm-evaluation-harness) are measured side by side with dpo-noise but are never its dependencies:
# they live in their own virtual environments under ${DPO_CACHE:-~/.cache/dpo-noise}/venvs/NAME.
set -euo pipefail
name=$1; shift
venv="${DPO_CACHE:-$HOME/.cache/dpo-noise}/venvs/$name"
if [ ! -f "$venv/.installed" ]; then
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --upgrade pip >&2
  "$venv/bin/pip" install --quiet torch==2.13.0 >&2
  "$venv/bin/pip" install --quiet "$@" >&2
  touch "$venv/.installed"
fi
echo "$venv/bin/python"
