#!/usr/bin/env bash
# Regenerates docs/scoreboard/: tokenopt against the published methods and the oracle
# on the embedded demo's test split, with one price-conditioned policy for the whole
# sweep beside the per-weight policies. One command: bash docs/scoreboard.sh
# (about 6 minutes on 2 cores when runs/demo/table exists: the demo table is reused).
set -euo pipefail
cd "$(dirname "$0")/.."
tokenopt demo --out runs/demo
[ -f runs/demo/priced/policy/policy.json ] ||
    tokenopt train --table runs/demo/table --out runs/demo/priced --cost-weight-range 0.0025:0.16 --seed 0
tokenopt eval runs/demo/run --table runs/demo/table --out docs/scoreboard --sweep-dir runs/demo/sweep \
    --conditioned runs/demo/priced
