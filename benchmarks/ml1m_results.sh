#!/usr/bin/env bash
# Every training run behind docs/ml1m_results.md (timestamped ML-1M, ratings.dat), one after another,
# most informative first. A run whose final_metrics.json exists is skipped; an unfinished one resumes
# from its newest checkpoint (run.resume=auto), so the script can be stopped and started again.
#
#   python -m data_pipeline prepare --config configs/data/ml1m.yaml          # data/prepared/ml1m
#   bash benchmarks/ml1m_results.sh [RUNS_DIR] [DATA_DIR]                    # default runs/ml1m_ts
#   python benchmarks/ml1m_quality.py --report-only --models \
#       --run hstu=RUNS_DIR/tuned_target_s42 --run hstu_large=RUNS_DIR/large1h_target_s42 ...
#
# Rows: HSTU tuned and HSTU-large (1-hour schedule) with both time protocols (model.time_gap_from=
# target, the reference's, and input), three seeds; one-at-a-time ablations of HSTU-large (sampled
# softmax as the paper, no older windows, the paper's constant lr, no time bias); the paper configs
# and SASRec. On a 2-core CPU the whole list takes about 20 hours.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/ml1m_ts}
DATA=${2:-data/prepared/ml1m}
mkdir -p "$RUNS"
source benchmarks/run_queue.sh
# Every run reads the timestamped ML-1M prepared by configs/data/ml1m.yaml.
run_ml1m() { run "$@" data.dir="$DATA"; }

TUNED=configs/hstu_ml1m_tuned.yaml
LARGE=configs/hstu_large_ml1m_1h.yaml
# Both time protocols, first seed.
run_ml1m tuned_target_s42 $TUNED run.seed=42
run_ml1m tuned_input_s42 $TUNED run.seed=42 model.time_gap_from=input
run_ml1m large1h_target_s42 $LARGE run.seed=42
run_ml1m large1h_input_s42 $LARGE run.seed=42 model.time_gap_from=input
# Two more seeds of each.
for seed in 7 1; do
  run_ml1m tuned_target_s$seed $TUNED run.seed=$seed
  run_ml1m large1h_target_s$seed $LARGE run.seed=$seed
done
for seed in 7 1; do
  run_ml1m tuned_input_s$seed $TUNED run.seed=$seed model.time_gap_from=input
  run_ml1m large1h_input_s$seed $LARGE run.seed=$seed model.time_gap_from=input
done
# HSTU-large ablations: one change each from the 1-hour config, seed 42.
run_ml1m large1h_sampled_s42 $LARGE run.seed=42 loss.negatives=per_position loss.num_negatives=128
run_ml1m large1h_no_older_s42 $LARGE run.seed=42 data.older_windows=false
run_ml1m large1h_const_lr_s42 $LARGE run.seed=42 optim.lr=0.001 embeddings.lr=0.001 optim.decay=constant
run_ml1m large1h_no_time_s42 $LARGE run.seed=42 model.use_time_bias=false
# The paper configs and SASRec.
run_ml1m hstu_paper_s42 configs/hstu_ml1m.yaml run.seed=42
run_ml1m sasrec_s42 configs/sasrec_ml1m.yaml run.seed=42
run_ml1m large_paper_s42 configs/hstu_large_ml1m.yaml run.seed=42
