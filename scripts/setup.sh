#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine (as root) for Docket: the system packages, then a venv at
# .venv with Docket and its development tools. Safe to run again. Used by .ci/run and
# scripts/demo.sh.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

section() { printf '\n==== %s ====\n' "$*"; }

section "System packages"
packages=(docker.io busybox-static opentracker skopeo docker-registry zstd iproute2 python3 python3-venv ca-certificates postgresql prometheus systemd)
# dockerd needs apparmor_parser where the kernel enforces AppArmor (it is only a Recommends).
if [[ $(cat /sys/module/apparmor/parameters/enabled 2>/dev/null || true) == Y ]]; then
  packages+=(apparmor)
fi
# The TypeScript client (clients/typescript) needs Node.js >= 18.14 and npm: Debian 12 has
# nodejs 18.20 and npm 9.2. A node and npm already on PATH (NodeSource's nodejs bundles npm)
# are kept.
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  packages+=(nodejs npm)
fi
missing=()
for package in "${packages[@]}"; do
  if [[ $(dpkg-query -W -f='${Status}' "$package" 2>/dev/null || true) != "install ok installed" ]]; then
    missing+=("$package")
  fi
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  # Keep package scripts from starting services (the system dockerd among them): the tests
  # start their own. A policy-rc.d that the machine already has is left alone.
  policy=/usr/sbin/policy-rc.d
  added_policy=false
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod 755 "$policy"
    added_policy=true
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" </dev/null
  if $added_policy; then
    rm -f "$policy"
    trap - EXIT
  fi
else
  echo "already installed: ${packages[*]}"
fi
command -v dockerd >/dev/null || PATH="$PATH:/usr/sbin:/sbin"
dockerd --version
test -x /bin/busybox

section "Python environment (.venv)"
PYTHON="${PYTHON:-/usr/bin/python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python --version
.venv/bin/pip install -q -e '.[dev]'

section "TypeScript client (clients/typescript: npm ci)"
if command -v node >/dev/null && command -v npm >/dev/null; then
  echo "node $(node --version), npm $(npm --version)"
  npm ci --prefix clients/typescript --no-audit --no-fund
else
  echo "no node and npm: skipping (the TypeScript client's checks and tests skip, or fail under CI)"
fi
