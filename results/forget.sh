#!/usr/bin/env bash
# The forgetting regime: where long-only CPT forgets the short tasks, so restoration has something
# to restore. Long windows (L_long) come from the technical corpus (Python 3.11 and Linux 6.1
# documentation, 10.3M tokens, fetched from Debian by `python data.py setup --tech`), a text
# distribution unlike the short tasks, as in LongReD's setting; every distillation stream (short,
# T_orig, LinearARD's, KD's) reads the general corpus. A higher learning rate than the papers'
# (LR, default 3e-4) stands in for their billion-token budgets.
#
#   python data.py setup --tech                 (once: assets/tokens-tech)
#   bash results/forget.sh OUT [ROW ...]        (rows as in results/table.sh; ROW.sN = seed N)
#   python results/table.py OUT
#
# Each row trains TOKENS (default 16.8M: 64 steps of 262,144) and is evaluated with LIMIT (1000)
# items per short task; CPT also exports its student every EXPORT_EVERY (16) steps for the curve
# (python results/curve.py OUT).
#   SMOKE=1 TOKENS=8192 EXPORT_EVERY=1 bash results/forget.sh OUT original abf cpt
#                                               (CPU: table.sh's toy sizes, 2 steps, the curve)
set -eu
here=$(dirname "$0")
export LONG_DATA=${LONG_DATA:-assets/tokens-tech}
export LR=${LR:-3e-4}
if [ -z "${SMOKE:-}" ]; then  # SMOKE keeps table.sh's toy sizes
  export TOKENS=${TOKENS:-16777216}
  export BATCH=${BATCH:-262144}
  export LIMIT=${LIMIT:-1000}
fi
export EXPORT_EVERY=${EXPORT_EVERY:-16}
exec bash "$here/table.sh" "$@"
