#!/usr/bin/env bash
# The forgetting regime: where long-only CPT forgets the short tasks, so restoration has something
# to restore. Long windows (L_long) come from the technical corpus (Python 3.11 and Linux 6.1
# documentation, 10.3M tokens, fetched from Debian by `python data.py setup --tech`), a text
# distribution unlike the short tasks, as in LongReD's setting; every distillation stream (short,
# T_orig, LinearARD's, KD's) reads the general corpus. A high constant learning rate (LR 2e-3
# after WARMUP 8 linear steps) stands in for the papers' billion-token budgets: measured on one
# H200 (results/forget-h200, README "The forgetting regime"), CPT lost 3.3 and 5.6 points of the
# short average in two runs of 32 steps; at 1e-3 it lost 1.5 points by step 48, at 3e-4 none.
#
#   python data.py setup --tech                 (once: assets/tokens-tech)
#   bash results/forget.sh OUT [ROW ...]        (rows as in results/table.sh; ROW.sN = seed N)
#   python results/table.py OUT
#   python results/curve.py OUT cpt             (CPT's short average and passkey against steps)
#
# Each row trains TOKENS (default 8.4M: 32 steps of 262,144) and is evaluated with LIMIT (1000)
# items per short task; CPT also exports its student every EXPORT_EVERY (8) steps for the curve.
#   SMOKE=1 TOKENS=8192 EXPORT_EVERY=1 bash results/forget.sh OUT original abf cpt
#                                               (CPU: table.sh's toy sizes, 2 steps, the curve)
set -eu
here=$(dirname "$0")
if [ $# -lt 1 ]; then
  echo "usage: [SMOKE=1] bash results/forget.sh OUT [ROW ...]  (rows: results/table.sh)" >&2
  exit 2
fi
export LONG_DATA=${LONG_DATA:-assets/tokens-tech}
if [ ! -d "$LONG_DATA" ]; then  # before any row runs
  echo "forget.sh: no $LONG_DATA (the long windows' technical text); run \`python data.py setup --tech\` first" >&2
  exit 2
fi
export LR=${LR:-2e-3}
export WARMUP=${WARMUP:-8}
if [ -z "${SMOKE:-}" ]; then  # SMOKE keeps table.sh's toy sizes
  export TOKENS=${TOKENS:-8388608}
  export BATCH=${BATCH:-262144}
  export LIMIT=${LIMIT:-1000}
fi
export EXPORT_EVERY=${EXPORT_EVERY:-8}
exec bash "$here/table.sh" "$@"
