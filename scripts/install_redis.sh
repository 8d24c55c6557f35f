#!/usr/bin/env bash
# Installs Debian's redis-server for the `redis` test marker. Idempotent: does nothing when the binary is
# already on PATH. The service is not started: tests start their own server on a free port in a tmp dir.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
  echo "redis-server already installed: $(redis-server --version)"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d exit 101 keeps the package's post-install script from starting the service (no systemd in
# containers, and a system-wide server on 6379 is not what the tests use).
POLICY=/usr/sbin/policy-rc.d
ADDED_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$POLICY" >/dev/null
  $SUDO chmod +x "$POLICY"
  ADDED_POLICY=1
fi
cleanup() { if [ "$ADDED_POLICY" = 1 ]; then $SUDO rm -f "$POLICY"; fi; }
trap cleanup EXIT
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
echo "installed: $(redis-server --version)"
