#!/usr/bin/env bash
# Creates .venv with everything slimformer needs for development and tests.
# torch is pinned first: 2.13.0 (CPU build) lies on this machine's disk; an unpinned torch
# would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[dev]'
