#!/usr/bin/env bash
# Checks, on this CPU machine, the code that only the GPU machine runs, against the versions the
# GPU machine has (triton 3.6, onnxruntime 1.30; its torch 2.11 has no CPU wheel here, so torch
# stays 2.13). Run before a session that gets a GPU, after changing a kernel:
#
#   bash scripts/check_gpu_stack.sh            # after scripts/setup.sh
#
# 1. every Triton kernel builds for an H100 (sm_90) with triton 3.6 (tests/kernels/_compile_sm90.py);
# 2. the kernel, cuda-target and ONNX tests pass under triton 3.6's interpreter and ORT 1.30.
# Makes .venv-gpu-stack: .venv's packages, with triton, onnxruntime and numpy (triton 3.6's
# interpreter needs numpy < 2.3) installed over them.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "run scripts/setup.sh first" >&2; exit 2; }
ENV=.venv-gpu-stack
if [ ! -x "$ENV/bin/python" ]; then
  python3 -m venv "$ENV"
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  own=$("$ENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$site" > "$own/zz_dev_venv.pth"  # read after the env's own packages, which win
  "$ENV/bin/python" -m pip install -q --no-deps triton==3.6.0 onnxruntime==1.30.0 'numpy==2.2.*'
fi
"$ENV/bin/python" -c "import triton, onnxruntime, torch; print('triton', triton.__version__, \
'onnxruntime', onnxruntime.__version__, 'torch', torch.__version__)"
env -u TRITON_INTERPRET PYTHONPATH="$PWD" "$ENV/bin/python" tests/kernels/_compile_sm90.py \
  > "$ENV/sm90.jsonl"
echo "sm_90 builds: $(grep -c '^{' "$ENV/sm90.jsonl") kernels"
"$ENV/bin/python" -m pytest -q -p no:cacheprovider tests/kernels tests/compiler/test_cuda_targets.py \
  tests/compiler/test_gpu_rewrites.py tests/compiler/test_cuda_graphs.py \
  tests/compiler/test_lower_onnx.py tests/compiler/test_cpu_int4.py -W ignore::DeprecationWarning
