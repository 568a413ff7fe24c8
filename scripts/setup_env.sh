#!/usr/bin/env bash
# Creates .venv (if missing) and installs lanner with its test tools into it.
# Usage: source this file, or run it; afterwards .venv/bin/python has lanner.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
    echo "creating virtual environment in $root/.venv" >&2
    python3 -m venv .venv
fi
stamp=.venv/.lanner-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    # torch first and alone: on these machines `torch==2.13.0` is a CPU build on local disk.
    .venv/bin/python -m pip install -q -c constraints.txt torch
    .venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
    touch "$stamp"
fi
