#!/usr/bin/env bash
# Run the test suite in .venv (set up by scripts/install.sh --test). Arguments go to pytest.
#
# promtool (Debian's `prometheus` package) validates configs/prometheus.yml. When it is missing and
# this is a root shell with apt-get, it is installed; otherwise tests/test_deploy_files.py falls back
# to a structural check and says so. Never fatal.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv="${VENV:-.venv}"

if ! command -v promtool >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
    echo "test: installing promtool (Debian package prometheus)"
    if ! { apt-get update -qq \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
         } >/tmp/internvl-serve-apt.log 2>&1; then
      echo "test: could not install promtool (see /tmp/internvl-serve-apt.log); using the fallback check"
    fi
  else
    echo "test: promtool not found and cannot apt-get install it here; using the fallback check"
  fi
fi

exec "$venv/bin/python" -m pytest -q "$@"
