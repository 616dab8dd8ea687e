#!/usr/bin/env bash
# One GPU session for llmlit: install the carried wheels (.whl/, made by ../shared/gpu/gpu-wheels.sh), then run each
# benchmark and full preset under its own time limit. Logs, JSON records and executed notebooks land in $OUT.
# Usage (on the GPU machine, from the repo root): bash bench/gpu_run.sh [step ...]   (default: every step)
# The memorization full preset may take up to 9 minutes, a device call's limit: run it in a call of its own.
# The commit the records name: the tree on the GPU machine is a copy without .git, so the commit comes in from outside,
# first found of: $LLMLIT_GIT_COMMIT; the file bench/.commit, written from the checkout before the tree is copied
# (`git rev-parse HEAD > bench/.commit`; if .commit is git-ignored, carry it with the tree); `git rev-parse HEAD` where
# this is a checkout. Anything but 40 hex digits, or nothing: the records say null. Run a committed tree only: edits
# not in that commit would make the record name the wrong code.
set -u
OUT=${OUT:-/tmp/llmlit-gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD JUPYTER_PATH=/tmp/site/share/jupyter PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export LLMLIT_RESULTS=$OUT/results TOKENIZERS_PARALLELISM=false
commit=${LLMLIT_GIT_COMMIT:-$( (cat bench/.commit 2>/dev/null || git rev-parse HEAD 2>/dev/null) | tr -d '[:space:]')}
if [[ $commit =~ ^[0-9a-f]{40}$ ]]; then export LLMLIT_GIT_COMMIT=$commit; echo "records name commit $commit"
else unset LLMLIT_GIT_COMMIT; echo "records name no commit (null): set LLMLIT_GIT_COMMIT or write bench/.commit"; fi
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
