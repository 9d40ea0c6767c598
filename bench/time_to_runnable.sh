#!/usr/bin/env bash
# Issue 14's whole time-to-runnable matrix in one invocation (as root, on this machine about
# 45 minutes; `rollout_bench.py --matrix --estimate` prints the estimate):
#   N = 2, 4, 8 at 100 Mbit/s x {64 MiB one layer, 256 MiB one layer, 64 MiB in 8 layers}
#   x {prefetch, loaded}; the 1 MiB control to 8 hosts, loaded; N = 4 at 1 Gbit/s, 256 MiB,
#   prefetch and loaded. Docket medians of 3; the central registry's too, but 1 run for the
#   256 MiB and 8-layer rows at 100 Mbit/s (say --matrix-central-runs 3 for 3: ~75 minutes).
# Writes OUT/ttr.md (the tables), OUT/ttr.json (everything) and OUT/logs/; extra arguments
# go to rollout_bench.py (e.g. --compare-agent-args=--load-after-download, which doubles the
# Docket part).
#
#   bash bench/time_to_runnable.sh [OUT] [rollout_bench.py options...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
out="${1:-$root/ttr-$(date +%Y%m%d-%H%M%S)}"
shift || true
mkdir -p "$out"
export PATH="$PATH:/usr/sbin:/sbin"
python="$root/.venv/bin/python"
"$python" "$here/rollout_bench.py" --matrix --estimate "$@"
"$python" "$here/rollout_bench.py" --matrix --json "$out/ttr.json" --logs "$out/logs" "$@" \
    | tee "$out/ttr.md"
echo "tables: $out/ttr.md, results: $out/ttr.json, logs: $out/logs"
