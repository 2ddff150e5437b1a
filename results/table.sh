#!/usr/bin/env bash
# The results table (issue 6): SmolLM2-135M (native 8K, theta 1e5) extended to 32K, one row per
# method, each trained here and evaluated with the same suite; then `python results/table.py OUT`.
#
#   bash results/table.sh OUT [ROW ...]           (a GPU; ROW default: all, in this order)
#   SMOKE=1 bash results/table.sh OUT [ROW ...]   (CPU, 37 min on 2 busy cores: SmolLM2 told
#                          its window is 256, extended to 1024; the same commands at toy sizes)
#
# Rows: original pi_x4 abf (untrained), cpt mix-cpt longred-u longred-c (same token budget),
# linearard (its paper's recipe: 144 steps x 16,384 tokens), linearard+cpt (that, then the CPT
# budget), kd (SDLC phases, same budget as CPT); also yarn (untrained), cpt-general (CPT without
# LONG_DATA), longred-c+rel and longred-c+kd (combined recipes), and LinearARD diagnosed:
# linearard-query (its code's normalisation), linearard-abf and linearard-yarn (another student's
# RoPE), linearard-long (4x its steps, a curve; python results/curve.py OUT linearard-long pi_x4),
# linearard@LR (its recipe at another learning rate, the recipe's warm-up kept).
# ROW@LR trains ROW's method at peak learning rate LR instead of 2e-5 (e.g. longred-c@1e-4).
# Trained students go to OUT/runs/ROW/final, evaluations to OUT/eval/ROW/.
set -eu
if [ $# -lt 1 ]; then
  echo "usage: [SMOKE=1] bash results/table.sh OUT [ROW ...]  (rows and settings: the comment at the top)" >&2
  exit 2
fi
out=$1; shift
rows=${*:-original pi_x4 abf cpt mix-cpt longred-u longred-c linearard linearard+cpt kd}
base=${BASE:-assets/smollm2-135m}
if [ -n "${SMOKE:-}" ]; then
  orig=256; target=1024; tokens=4096; batch=4096; rel=4096; limit=4; samples=1
  lengths=256,1024; toy=(--orig 256 --micro-tokens 1024 --short-len 64)
  lard=(--tokens 1024 --batch-tokens 1024); lard_steps=1; rel_batch=(--rel-batch-tokens 1024)
else
  orig=8192; target=32768; tokens=4194304; batch=262144; rel=2359296; limit=500; samples=3
  lengths=8192,16384,32768; toy=(); lard=(); lard_steps=144; rel_batch=()
fi
# A regime (results/forget.sh) may set: TOKENS, BATCH, LIMIT (items per short task), LR (every
# trained row's peak learning rate), WARMUP (linear warm-up steps with that LR), LONG_DATA (token
# shards of the long windows alone), EXPORT_EVERY (CPT rows: the student every N steps, for the
# curve). LinearARD's relation stage keeps its own recipe's learning rate and warm-up.
tokens=${TOKENS:-$tokens}; batch=${BATCH:-$batch}; limit=${LIMIT:-$limit}
long_data=()  # the long windows' text; row cpt-general keeps --data's
[ -n "${LONG_DATA:-}" ] && long_data=(--long-data "$LONG_DATA")
warmup=()
[ -n "${WARMUP:-}" ] && warmup=(--warmup "$WARMUP")
regime_lr=("${warmup[@]}")  # LinearARD keeps its own recipe's
[ -n "${LR:-}" ] && regime_lr=(--lr "$LR" "${warmup[@]}")

train() {  # ROW, then train.py arguments
  local row=$1; shift
  [ -f "$out/runs/$row/final/config.json" ] && return  # done
  local resume=()  # stopped (SIGTERM, e.g. `timeout`): rerunning the script continues the run
  [ -d "$out/runs/$row/ckpt" ] && resume=(--resume)
  python train.py --init "$base" --target $target "${toy[@]}" "${row_long_data[@]}" \
    --out "$out/runs/$row" "$@" "${resume[@]}"
}

evaluate() {  # ROW, then the model arguments of eval.py
  local row=$1; shift
  [ -f "$out/eval/$row/row.md" ] && return  # written once every suite has finished
  local ref=(--reference "$out/eval/original/results.json")
  [ "$row" = original ] && ref=()
  python eval.py "$@" --teacher "$base" --tokenizer "$base" --t-orig $orig --suite short,long,drift --limit $limit \
    --samples $samples --lengths $lengths "${ref[@]}" --name "$row" --out "$out/eval/$row"
}

curve() {  # ROW: evaluate its students exported along the way (EXPORT_EVERY), short and long
  local row=$1
  for step in "$out/runs/$row"/step-*; do
    [ -d "$step" ] || continue
    local dest="$out/curve/$row/$(basename "$step")"
    [ -f "$dest/row.md" ] && continue  # written once every suite has finished
    python eval.py --model "$step" --teacher "$base" --tokenizer "$base" --t-orig $orig \
      --suite short,long --limit $limit --samples $samples --lengths $lengths \
      --reference "$out/eval/original/results.json" --name "$row $(basename "$step")" \
      --out "$dest"
  done
}

for row in $rows; do
  lr=("${regime_lr[@]}")  # ROW@LR: that peak learning rate; ROW.sN: seed N
  row_long_data=("${long_data[@]}")
  name=${row%@*}
  [ "$name" = "$row" ] || lr=(--lr "${row#*@}" "${warmup[@]}")
  seed=()
  [ "${name%.s*}" = "$name" ] || seed=(--seed "${name##*.s}")
  name=${name%.s*}
  curve=()
  [ -n "${EXPORT_EVERY:-}" ] && [ "$name" = cpt ] && curve=(--export-every "$EXPORT_EVERY")
  case $name in
    original) evaluate $row --model "$base" --rope none --target $target; continue ;;
    pi_x4) evaluate $row --model "$base" --rope pi --target $target; continue ;;
    abf) evaluate $row --model "$base" --rope abf --target $target; continue ;;
    yarn) evaluate $row --model "$base" --rope yarn --target $target; continue ;;
    cpt-general)  # CPT whose long windows read the general corpus (--data), not LONG_DATA: in
                  # the forgetting regime it separates the long text's effect from the lr's
      row_long_data=()
      train $row --method cpt --tokens $tokens --batch-tokens $batch "${lr[@]}" "${seed[@]}" ;;
    cpt|mix-cpt|longred-u|longred-c|kd)
      train $row --method $name --tokens $tokens --batch-tokens $batch "${lr[@]}" "${seed[@]}" \
        "${curve[@]}" ;;
    longred-c+rel)  # combined: LongReD-C's three terms plus LinearARD's relation KL
      train $row --method longred-c --loss L_long=1,L_short=5,L_s2l=10,L_rel=1 \
        --mix long=4,short=3,orig=1,rel=1 --tokens $tokens --batch-tokens $batch "${lr[@]}" \
        "${seed[@]}" ;;
    longred-c+kd)  # combined: LongReD-C's three terms plus SDLC's logit KD
      train $row --method longred-c --loss L_long=1,L_short=5,L_s2l=10,L_kd=1 \
        --mix long=4,short=3,orig=1,kd=1 --tokens $tokens --batch-tokens $batch "${lr[@]}" \
        "${seed[@]}" ;;
    linearard|linearard-query|linearard-abf|linearard-yarn|linearard-long)
      lr=()  # the recipe's learning rate and warm-up; ROW@LR changes the rate alone
      [ "${row%@*}" = "$row" ] || lr=(--lr "${row#*@}")
      variant=()  # LinearARD diagnosed: one change to its recipe per row
      case $name in
        linearard-query) variant=(--rel-norm query) ;;  # K/K and V/V by the query heads, as its code
        linearard-abf) variant=(--rope abf) ;;          # the recipe on another scaling's student
        linearard-yarn) variant=(--rope yarn) ;;
        linearard-long)  # 4x the recipe's steps; the student exported after each recipe's worth
          variant=(--steps $((4 * lard_steps)) --export-every $lard_steps)
          curve=(--export-every $lard_steps) ;;
      esac
      train $row --method linearard "${lard[@]}" "${lr[@]}" "${seed[@]}" "${variant[@]}" ;;
    linearard+cpt)  # the relation stage runs LinearARD's recipe, then CPT's budget and batch
      train $row --method linearard+cpt --rel-tokens $rel "${rel_batch[@]}" --tokens $tokens \
        --batch-tokens $batch "${lr[@]}" "${seed[@]}" ;;
    *) echo "unknown row $row" >&2; exit 2 ;;
  esac
  evaluate $row --model "$out/runs/$row/final"
  [ ${#curve[@]} -eq 0 ] || curve $row
done
