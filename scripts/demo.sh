#!/usr/bin/env bash
# The README's first command: set up this machine, then run the demo (scripts/demo.py).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
PATH="$PATH:/usr/sbin:/sbin" exec .venv/bin/python scripts/demo.py
