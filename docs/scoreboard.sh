#!/usr/bin/env bash
# Regenerates docs/scoreboard/: tokenopt against the published methods and the oracle
# on the embedded demo's test split. One command: bash docs/scoreboard.sh
# (about 8 minutes on 2 cores: the demo table is reused when runs/demo/table exists).
set -euo pipefail
cd "$(dirname "$0")/.."
tokenopt demo --out runs/demo
tokenopt eval runs/demo/run --table runs/demo/table --out docs/scoreboard --sweep-dir runs/demo/sweep
