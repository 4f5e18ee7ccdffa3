# Sourced by the results scripts (benchmarks/ml1m_results.sh, benchmarks/lineage_results.sh): one
# resumable training run. Needs RUNS (output root) set by the caller; PYTHON overrides the interpreter.
#   run NAME CONFIG [key=value ...]
# A run whose final_metrics.json exists is skipped; an unfinished one resumes from its newest checkpoint
# (run.resume=auto), so a queue can be stopped and started again. Every run logs to RUNS/mlflow.db.
PY=${PYTHON:-python}
NPROC=${NPROC:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

run() {
  local name=$1 config=$2
  shift 2
  if [[ -f $RUNS/$name/final_metrics.json ]]; then return 0; fi
  echo "$(date -u +%FT%TZ) start $name" | tee -a "$RUNS/queue.log"
  if "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m train --config "$config" \
    run.output_dir="$RUNS/$name" tracking.tracking_uri="sqlite:///$RUNS/mlflow.db" "$@" >"$RUNS/$name.log" 2>&1; then
    echo "$(date -u +%FT%TZ) end $name" | tee -a "$RUNS/queue.log"
  else
    echo "$(date -u +%FT%TZ) FAILED $name (see $RUNS/$name.log)" | tee -a "$RUNS/queue.log"
  fi
}
