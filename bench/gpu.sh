#!/usr/bin/env bash
# GPU benchmarks in one go, for the GPU machine (torch 2.11, triton 3.6; no pip installs there).
#
#   cd <repo root> && bash bench/gpu.sh          # results in bench/results/ (and in $OUT if set)
#
# Prints the environment, runs the kernel benchmark (bench/kernels.py, <= 4 min by its own
# budget), then the end-to-end BERT-base benchmark if bench/e2e_gpu.py exists. Every step has a
# timeout: the whole script stays under 8 minutes. Exits non-zero if a step failed or a kernel
# gave a wrong result, after running the others.
set -euo pipefail
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
RESULTS=bench/results
OUT_DIR=${OUT:-$RESULTS}
TOTAL_S=450  # hard stop for all steps together (8 min minus start-up and copying)
mkdir -p "$RESULTS" "$OUT_DIR"
STAMP=$(mktemp)
status=0

left() { echo $((TOTAL_S - SECONDS)); }

echo "== environment"
date -u
nvidia-smi || echo "nvidia-smi failed"
timeout 60 "$PY" - <<'PYEOF' || status=$?
import importlib, platform
print("python", platform.python_version(), platform.machine())
for mod in ("torch", "triton", "onnxruntime", "transformers", "numpy", "matplotlib"):
    try:
        print(f"{mod:13s}", importlib.import_module(mod).__version__)
    except Exception as e:  # noqa: BLE001
        print(f"{mod:13s} missing ({type(e).__name__})")
import torch
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"sm_{p.major}{p.minor}", f"{p.total_memory / 2**30:.0f} GiB",
          p.multi_processor_count, "SMs")
PYEOF

echo "== kernel benchmark (bench/kernels.py)"
timeout --kill-after=15 "$(( $(left) < 300 ? $(left) : 300 ))" \
    "$PY" bench/kernels.py --out "$RESULTS" 2>&1 | tee "$RESULTS/kernels_gpu.log" || status=$?

echo "== attention benchmark (bench/attention.py gpu: Triton linear / block-sparse / hybrid vs SDPA)"
timeout --kill-after=15 "$(( $(left) < 90 ? $(left) : 90 ))" \
    "$PY" bench/attention.py gpu --out "$RESULTS" 2>&1 | tee "$RESULTS/attention_gpu.log" || status=$?

# ---- slot: end-to-end BERT-base benchmark (the lead adds bench/e2e_gpu.py) -----------------
if [ -f bench/e2e_gpu.py ]; then
    echo "== end-to-end benchmark (bench/e2e_gpu.py)"
    if [ "$(left)" -gt 30 ]; then
        timeout --kill-after=15 "$(left)" "$PY" bench/e2e_gpu.py --out "$RESULTS" 2>&1 \
            | tee "$RESULTS/e2e_gpu.log" || status=$?
    else
        echo "no time left for bench/e2e_gpu.py"; status=1
    fi
else
    echo "== end-to-end benchmark: bench/e2e_gpu.py not present, skipped"
fi

if [ "$(cd "$OUT_DIR" && pwd)" != "$(cd "$RESULTS" && pwd)" ]; then  # copy this run's files
    find "$RESULTS" -maxdepth 1 -type f -newer "$STAMP" -exec cp {} "$OUT_DIR"/ \;
    echo "copied to $OUT_DIR: $(ls "$OUT_DIR" | tr '\n' ' ')"
fi
rm -f "$STAMP"
echo "== done in ${SECONDS}s, status $status"
exit "$status"
