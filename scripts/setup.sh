#!/usr/bin/env bash
# Installs AFD and its test tools into the current python3. torch is pinned first so that the
# torch range in pyproject.toml is already satisfied (any other torch request pulls CUDA wheels).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0
python3 -m pip install -q -e ".[test]"
