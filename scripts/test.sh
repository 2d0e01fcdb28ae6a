#!/usr/bin/env bash
# The test suite in tiers: the fast tier first (no model, no Milvus: seconds), then the slow
# tiers on real components (Milvus Lite and servers, the models, vLLM engines and servers).
#
#   scripts/test.sh          both, the fast tier first; stops if it fails
#   scripts/test.sh fast     the fast tier only
#   scripts/test.sh slow     the slow tiers only
# Extra arguments go to pytest (e.g. scripts/test.sh fast -k config).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
tier=${1:-all}
[ $# -gt 0 ] && shift
fast() { "$python" -m pytest -m "not slow and not llm and not server" "$@"; }
slow() { "$python" -m pytest -m "slow or llm or server" "$@"; }
case "$tier" in
    fast) fast "$@" ;;
    slow) slow "$@" ;;
    all) fast "$@" && slow "$@" ;;
    *) echo "usage: scripts/test.sh [all|fast|slow] [pytest args]" >&2; exit 2 ;;
esac
