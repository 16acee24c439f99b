#!/usr/bin/env bash
# The lock's one-command refresh, and the unpinned ("fresh") test run a maintainer does now and then:
#
#   bash requirements/refresh.sh           # newest versions in a throwaway venv; all tests; rewrite lock.txt if green
#   bash requirements/refresh.sh --check   # the same run, lock.txt untouched; prints what moved since the lock
#
# torch is pinned to the CPU build first (a bare `torch` would pull a multi-GB CUDA build); everything else
# comes unpinned through the `fresh` extra. The lock is written only when lint-imports and pytest pass.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-write}"
[[ "$mode" == write || "$mode" == --check ]] || { echo "usage: bash requirements/refresh.sh [--check]" >&2; exit 2; }
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[fresh]"
lint-imports
python -m pytest -q
new="$(mktemp)"
{ sed -n '1,3p' requirements/lock.txt; python -m pip freeze --exclude-editable | grep -v '^-e '; } > "$new"
if [[ "$mode" == --check ]]; then
    diff <(tail -n +4 requirements/lock.txt) <(tail -n +4 "$new") && echo "lock.txt is current" || true
else
    mv "$new" requirements/lock.txt
    echo "requirements/lock.txt refreshed (green with these versions)"
fi
