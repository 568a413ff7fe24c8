#!/usr/bin/env bash
# Sets up .venv and runs the main job: lanner completes a Python prompt with the
# embedded demo model and prints a timing summary. Extra arguments go to
# `lanner generate` (e.g. --max-tokens 64 --temperature 0.8).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$root/.venv/bin/lanner" --log-level WARNING generate "def fibonacci(n):" "$@"
