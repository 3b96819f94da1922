# Stage timing for .ci/run and tests/run (sourced, not run; both use `set -euo pipefail`).
# `stage NAME COMMAND...` runs a command, or a function of the script in a subshell, as a named stage and
# prints its duration when it ends. The outermost script prints the summary when it exits, also on
# failure, so a red run still says where its time went: every stage (the stages of tests/run run by
# .ci/run indented under it), the total, the size of the target directory and the free disk.
stage_depth=${DECKHAND_STAGE_DEPTH:-0}
if [ -z "${DECKHAND_STAGES_LOG:-}" ]; then
  DECKHAND_STAGES_LOG=$(mktemp)
  export DECKHAND_STAGES_LOG
  stages_start=$(date +%s)
  stages_summary() {
    local rc=$? total depth name secs target
    total=$(( $(date +%s) - stages_start ))
    target=${CARGO_TARGET_DIR:-target}
    echo "=== stages (exit $rc)"
    # Recorded as each stage ends; printed in the order they began.
    sort -n -k1,1 "$DECKHAND_STAGES_LOG" | while read -r _ depth name secs; do
      printf '  %*s%-*s %3dm%02ds\n' $((depth * 2)) '' $((20 - depth * 2)) "$name" \
        $((secs / 60)) $((secs % 60))
    done
    printf '  %-20s %3dm%02ds\n' total $((total / 60)) $((total % 60))
    [ -d "$target" ] && echo "  target directory $target: $(du -sh "$target" 2>/dev/null | cut -f1)"
    echo "  free disk: $(df -h --output=avail "$PWD" | tail -1 | tr -d ' ')"
    rm -f "$DECKHAND_STAGES_LOG"
    return "$rc"
  }
  trap stages_summary EXIT
fi

stage() {
  local name=$1 t0 secs rc seq
  shift
  t0=$(date +%s)
  seq=$(date +%s%N)
  echo "=== stage $name: $*"
  # In a subshell with errexit on: a failing command inside a stage function stops it (errexit is
  # ignored in a function called from an `||` list); the stage's status is then recorded.
  set +e
  (export DECKHAND_STAGE_DEPTH=$((stage_depth + 1)); set -e; "$@")
  rc=$?
  set -e
  secs=$(( $(date +%s) - t0 ))
  echo "$seq $stage_depth $name $secs" >> "$DECKHAND_STAGES_LOG"
  printf '=== stage %s: %dm%02ds%s\n' "$name" $((secs / 60)) $((secs % 60)) \
    "$([ "$rc" = 0 ] || echo " (failed, exit $rc)")"
  return "$rc"
}
