#!/usr/bin/env bash
# The same API with curl: a plain request, then a streamed one with an image.
set -euo pipefail
BASE_URL=${BASE_URL:-http://localhost:8000/v1}

curl -s "$BASE_URL/chat/completions" \
  -H "Content-Type: application/json" -H "Authorization: Bearer ${API_KEY:-none}" \
  -d '{"model": "demo", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8, "temperature": 0}' \
  | python3 -c 'import json, sys; r = json.load(sys.stdin); print(r["object"], r["choices"][0]["finish_reason"], r["usage"])'

IMAGE=$(base64 -w0 docs/example.png)
curl -sN "$BASE_URL/chat/completions" \
  -H "Content-Type: application/json" -H "Authorization: Bearer ${API_KEY:-none}" \
  -d '{"model": "demo", "stream": true, "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,'"$IMAGE"'", "detail": "low"}},
        {"type": "text", "text": "What is this?"}]}]}' \
  | cut -c1-100
