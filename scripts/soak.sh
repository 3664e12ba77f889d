#!/usr/bin/env bash
# The long stress runs CI skips: random schedules with faults, many workers, sum-job shapes.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pytest -m soak -q -p no:randomly "$@"
