#!/usr/bin/env bash
# Install the headless browser the dashboard tests drive: Debian's chromium and its driver.
# Safe to run repeatedly; does nothing when /usr/bin/chromium exists. Needs root (CI runs as
# root) and the Debian package mirror; never downloads browsers from anywhere else (no
# `playwright install`).
set -euo pipefail

CHROMIUM=/usr/bin/chromium
if [ -x "$CHROMIUM" ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    exec sudo -n "$0" "$@"
  fi
  echo "ensure-browser: $CHROMIUM is missing and installing it needs root:" >&2
  echo "  apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium chromium-driver fonts-dejavu-core >/dev/null
"$CHROMIUM" --version
