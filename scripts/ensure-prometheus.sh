#!/bin/sh
# promtool for the rules-file test: Debian's prometheus package ships it. Installs only when
# missing; the package's service is not started (the tests need the binary, not a server).
set -eu
if command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-prometheus: promtool missing and apt-get unavailable; install Prometheus' promtool" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
# policy-rc.d 101 keeps the package's postinst from starting a Prometheus server.
POLICY=/usr/sbin/policy-rc.d
CREATED=""
if [ ! -e "$POLICY" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
    $SUDO chmod +x "$POLICY"
    CREATED=1
fi
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus \
    || { $SUDO apt-get update -q && $SUDO env DEBIAN_FRONTEND=noninteractive \
         apt-get install -y --no-install-recommends prometheus; }
if [ -n "$CREATED" ]; then
    $SUDO rm -f "$POLICY"
fi
command -v promtool >/dev/null 2>&1
