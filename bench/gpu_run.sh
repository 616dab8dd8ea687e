#!/usr/bin/env bash
# One GPU session for llmlit: install the carried wheels (.whl/, made by ../shared/gpu/gpu-wheels.sh), then run each
# benchmark and full preset under its own time limit. Logs, JSON records and executed notebooks land in $OUT.
# Usage (on the GPU machine, from the repo root): bash bench/gpu_run.sh [step ...]   (default: every step)
# The memorization full preset may take up to 9 minutes, a device call's limit: run it in a call of its own.
set -u
OUT=${OUT:-/tmp/llmlit-gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD JUPYTER_PATH=/tmp/site/share/jupyter PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export LLMLIT_RESULTS=$OUT/results TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

step() {  # step NAME SECONDS CMD...: run CMD with a time limit, keep its log, print its tail
  local name=$1 lim=$2; shift 2
  local t0=$(date +%s)
  timeout "$lim" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  echo "== $name: rc=$rc, $(( $(date +%s) - t0 )) s"; tail -n 25 "$OUT/$name.log"
}

want=${*:-cudatests train specdec memorization safety}
for s in $want; do
  case $s in
    cudatests)    step cuda_tests 45 python3 -m pytest -q -p no:cacheprovider -m cuda tests/test_specdec.py ;;
    train)        step train_bench 150 python3 bench/train_bench.py --steps 100 --out "$OUT/train" ;;
    specdec)      step specdec_bench 170 python3 bench/specdec_bench.py ;;
    memorization|safety|specdec_full|train_full)
      nb=$(ls nbs/[0-9]*_${s%_full}.ipynb | head -1); lim=200; [ "$s" = memorization ] && lim=560
      step "${s%_full}_full" $lim python3 -m papermill "$nb" "$OUT/$(basename "$nb" .ipynb)-full.ipynb" --cwd nbs -k python3 -p preset full --log-output ;;
  esac
done
# Many small files under $OUT may not all come back: pack the records and executed notebooks into one archive as well.
(cd "$OUT" && tar -czf /tmp/llmlit-results.tgz --exclude='*.log' . && mv /tmp/llmlit-results.tgz .)
