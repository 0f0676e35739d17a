#!/usr/bin/env bash
# Proves that a real chat frontend works with internvl-serve, end to end, and saves a screenshot.
#
#   scripts/frontend_demo.sh
#
# 1. installs what it needs, each outside the project's .venv: Gradio + openai in their own venv
#    ($FRONTEND_VENV), npm playwright-core under scripts/frontend/node_modules (git-ignored), Debian's
#    chromium and a small CJK font (apt-get, as root) when missing; the server's .venv via
#    scripts/install.sh when it has no internvl-serve;
# 2. starts internvl-serve with the demo model (an API key on, answers capped by --default-max-tokens),
#    a logging proxy in front of it (scripts/frontend/proxy.py: the record of what the frontend sent),
#    and Gradio's stock OpenAI-compatible chat, gr.load_chat, pointed at the proxy's /v1;
# 3. drives one chat in headless Chromium (scripts/frontend/drive.mjs): an image upload with no text
#    (Gradio sends it as a user message of its own), then a text question; waits for both streamed
#    answers and saves the page to $SCREENSHOT (default docs/frontend.png);
# 4. checks the record and the server log (scripts/frontend/check_log.py); exits non-zero if the chat
#    failed. Everything started is stopped on exit; the logs stay in the printed work directory.
#
# Not part of the default CI run (it installs a browser and a web framework). Knobs: FRONTEND_VENV
# (default /work/venvs/frontend), SCREENSHOT, VENV (the server's venv, default .venv), PYTHON (creates
# the frontend venv, default python3), QUESTION, STEP_TIMEOUT_MS.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"
here="$root/scripts/frontend"

GRADIO_SPEC="gradio==6.31.0"
OPENAI_SPEC="openai>=1.30"
frontend_venv="${FRONTEND_VENV:-/work/venvs/frontend}"
server_venv="${VENV:-.venv}"
screenshot="${SCREENSHOT:-docs/frontend.png}"
chromium="/usr/bin/chromium"

say() { echo "frontend-demo: $*"; }
die() { echo "frontend-demo: FAILED: $*" >&2; exit 1; }

# --- 1. install ---------------------------------------------------------------------------------
if [[ ! -x "$server_venv/bin/internvl-serve" ]]; then
  say "no internvl-serve in $server_venv: running scripts/install.sh"
  VENV="$server_venv" scripts/install.sh
fi

if ! "$frontend_venv/bin/python" - "$GRADIO_SPEC" <<'EOF' 2>/dev/null; then
import sys
from importlib.metadata import version
import openai  # noqa: F401
sys.exit(version("gradio") != sys.argv[1].split("==")[1])
EOF
  say "installing $GRADIO_SPEC and openai into $frontend_venv"
  [[ -x "$frontend_venv/bin/python" ]] || "${PYTHON:-python3}" -m venv "$frontend_venv"
  "$frontend_venv/bin/python" -m pip install --quiet --disable-pip-version-check "$GRADIO_SPEC" "$OPENAI_SPEC"
fi

apt_install() {
  [[ "$(id -u)" == 0 ]] || die "$* missing; install it (apt-get install -y $*) or run this as root"
  say "apt-get install $*"
  apt-get install -y -qq "$@" >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq "$@" >/dev/null; }
}
[[ -x "$chromium" ]] || apt_install chromium
# The demo model's noise is partly CJK: a small CJK font keeps it from showing as boxes.
[[ -n "$(fc-list :lang=zh 2>/dev/null)" ]] || apt_install fonts-wqy-microhei
command -v npm >/dev/null || apt_install nodejs npm

if [[ ! -f "$here/node_modules/playwright-core/package.json" ]]; then
  say "npm: installing playwright-core into scripts/frontend/node_modules"
  (cd "$here" && npm ci --no-audit --no-fund --loglevel=error)
fi

# --- 2. start -----------------------------------------------------------------------------------
work="$(mktemp -d "${TMPDIR:-/tmp}/frontend-demo.XXXXXX")"
pids=()
cleanup() {
  local rc=$?
  local pid
  # SIGTERM first (the server drains), then whatever is left of each process group.
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  if ((rc != 0)); then
    for f in server proxy gradio; do
      [[ -s "$work/$f.log" ]] && { echo "--- last lines of $work/$f.log" >&2; tail -n 20 "$work/$f.log" >&2; }
    done
  fi
  say "logs in $work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
  "$frontend_venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
# Each in its own process group (setsid), so that the cleanup reaches its children too.
start() {
  local name=$1
  shift
  setsid "$@" >"$work/$name.log" 2>&1 </dev/null &
  pids+=("$!")
}
wait_http() {  # name, url, seconds, pid
  local deadline=$((SECONDS + $3))
  until "$frontend_venv/bin/python" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$2" 2>/dev/null; do
    kill -0 "$4" 2>/dev/null || die "$1 exited before it answered on $2"
    ((SECONDS < deadline)) || die "$1 did not answer on $2 within $3 s"
    sleep 0.5
  done
}

export NO_PROXY="127.0.0.1,localhost${NO_PROXY:+,$NO_PROXY}" no_proxy="127.0.0.1,localhost${no_proxy:+,$no_proxy}"
server_port=$(free_port)
proxy_port=$(free_port)
gradio_port=$(free_port)
api_key="demo-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"

say "starting internvl-serve --model demo on 127.0.0.1:$server_port"
INTERNVL_API_KEY="$api_key" start server "$server_venv/bin/internvl-serve" --model demo \
  --host 127.0.0.1 --port "$server_port" --default-max-tokens 32
server_pid=${pids[-1]}
start proxy "$frontend_venv/bin/python" "$here/proxy.py" --upstream "http://127.0.0.1:$server_port" \
  --port "$proxy_port" --log "$work/exchanges.jsonl"
proxy_pid=${pids[-1]}
say "starting Gradio gr.load_chat on 127.0.0.1:$gradio_port -> http://127.0.0.1:$proxy_port/v1"
mkdir -p "$work/gradio-tmp"
OPENAI_API_KEY="$api_key" GRADIO_ANALYTICS_ENABLED=False GRADIO_TEMP_DIR="$work/gradio-tmp" HF_HUB_OFFLINE=1 \
  start gradio "$frontend_venv/bin/python" "$here/app.py" --base-url "http://127.0.0.1:$proxy_port/v1" \
  --model demo --port "$gradio_port"
gradio_pid=${pids[-1]}

wait_http internvl-serve "http://127.0.0.1:$server_port/health" 180 "$server_pid"
wait_http proxy "http://127.0.0.1:$proxy_port/health" 20 "$proxy_pid"
wait_http gradio "http://127.0.0.1:$gradio_port/" 90 "$gradio_pid"
say "all up"

# --- 3. drive -----------------------------------------------------------------------------------
"$frontend_venv/bin/python" "$here/make_image.py" "$work/test-card.png"
[[ "$screenshot" == /* ]] || screenshot="$root/$screenshot"
mkdir -p "$(dirname "$screenshot")"
GRADIO_URL="http://127.0.0.1:$gradio_port/" IMAGE="$work/test-card.png" SCREENSHOT="$screenshot" \
  EXCHANGES="$work/exchanges.jsonl" CHROMIUM="$chromium" \
  timeout --kill-after=10 240 node "$here/drive.mjs" || die "the browser run failed"

# --- 4. check -----------------------------------------------------------------------------------
"$frontend_venv/bin/python" "$here/check_log.py" "$work/exchanges.jsonl" "$work/server.log" \
  || die "the chat failed (see above)"
say "OK: screenshot at $screenshot"
