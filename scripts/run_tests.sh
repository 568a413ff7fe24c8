#!/usr/bin/env bash
# Sets up .venv and runs the linters and the whole test suite (kernels in Triton's
# CPU interpreter). Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
.venv/bin/ruff check lanner tests scripts benchmarks
.venv/bin/ruff format --check lanner tests scripts benchmarks
export TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
