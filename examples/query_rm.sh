#!/usr/bin/env bash
# Query a running reward-model service with curl.
#   bash examples/query_rm.sh [URL]          (default http://127.0.0.1:8000)
# With auth on, export RLHF_RAY_SERVE_TOKEN=<the token the service was started with>.
set -euo pipefail
URL=${1:-http://127.0.0.1:8000}
AUTH=()
if [ -n "${RLHF_RAY_SERVE_TOKEN:-}" ]; then AUTH=(-H "Authorization: Bearer ${RLHF_RAY_SERVE_TOKEN}"); fi

curl -sS "$URL/healthz"; echo
curl -sS "${AUTH[@]}" "$URL/version"; echo

# One prompt, K responses -> {"rewards", "probs", "best", "truncated", "model_version"}
curl -sS "${AUTH[@]}" -X POST "$URL/score" -H 'Content-Type: application/json' \
  -d '{"prompt": "Review the film:", "responses": ["A moving, beautifully acted story.", "bad"]}'; echo

# Several prompts -> {"results": [...], "model_version"}
curl -sS "${AUTH[@]}" -X POST "$URL/score_batch" -H 'Content-Type: application/json' \
  -d '{"items": [{"prompt": "Review the film:", "responses": ["Great.", "Terrible."]},
                 {"prompt": "Review the restaurant:", "responses": ["Tasty food."]}]}'; echo

# A bad request: HTTP 422 and a JSON error naming the field.
curl -sS "${AUTH[@]}" -w ' (HTTP %{http_code})\n' -X POST "$URL/score" -H 'Content-Type: application/json' \
  -d '{"prompt": "x", "responses": []}'
