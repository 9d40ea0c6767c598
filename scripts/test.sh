#!/usr/bin/env bash
# The README's test command: set up this machine (as root), run the static checks and the
# whole test suite. Safe to run again. .ci/run is this script with CI=true.
#
#   1-2. scripts/setup.sh: system packages (docker.io for dockerd/containerd/runc,
#      busybox-static for test images, opentracker for the BitTorrent tests, skopeo and
#      docker-registry for the benchmark smoke, postgresql and prometheus for the operations
#      tests, systemd for systemd-analyze), then .venv at
#      the repo root with the system python3 and `pip install -e '.[dev]'`
#   3. scripts/check.sh (lint, types, generated code), if present
#   4. the test suite: .venv/bin/pytest -q
#
# No system Docker service is started or needed: the tests start private dockerds of their
# own (tests/support/dockerd.py).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PYTHONUNBUFFERED=1

section() { printf '\n==== %s ====\n' "$*"; }
started=$SECONDS

bash scripts/setup.sh
PATH="$PATH:/usr/sbin:/sbin"

if [[ -f scripts/check.sh ]]; then
  section "Checks (scripts/check.sh)"
  bash scripts/check.sh
fi

section "Tests (.venv/bin/pytest -q --durations=30)"
.venv/bin/pytest -q --durations=30  # the slowest, to keep the run short

section "Done in $((SECONDS - started))s"
