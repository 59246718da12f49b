#!/usr/bin/env bash
# Installs the benchmarks' peer frameworks (Dramatiq) into their own venv, .bench-peers/, so
# they are never a dependency of taskyard. Idempotent; `python -m benchmarks core` needs it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.bench-peers
DRAMATIQ="dramatiq[redis]==2.2.1"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import dramatiq, redis" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "$DRAMATIQ" "redis>=5" psutil
"$VENV/bin/python" -c "import dramatiq; print('dramatiq', dramatiq.__version__, 'in $VENV')"
