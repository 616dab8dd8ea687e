#!/usr/bin/env bash
# Fail if nbdev-export or nbdev-clean changes any file: the package must match the notebooks, and notebooks must be clean.
set -euo pipefail
cd "$(dirname "$0")/.."
sums() { find nbs llmlit -type f \( -name '*.ipynb' -o -name '*.py' \) -not -path '*/.ipynb_checkpoints/*' -not -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha1sum; }
before=$(sums)
.venv/bin/nbdev-export
.venv/bin/nbdev-clean
after=$(sums)
if [ "$before" != "$after" ]; then
  echo "nbdev-export/nbdev-clean changed these files: the package and notebooks were out of sync (commit both):"
  diff <(echo "$before") <(echo "$after") | grep '^[<>]' | awk '{print $3}' | sort -u
  exit 1
fi
echo "sync: package and notebooks agree"
.venv/bin/python scripts/readme.py --check
