#!/usr/bin/env bash
# Every training run behind the lineage tables of docs/sequential_models.md (GRU4Rec, SASRec with the
# binary and the softmax loss, BERT4Rec, HSTU; on Amazon Beauty also HSTU over semantic-ID items and
# the cold-start split; on Yelp SASRec and HSTU with and without our semantic IDs), one after another,
# cheapest first. Resumable like benchmarks/ml1m_results.sh (benchmarks/run_queue.sh): a finished run
# is skipped, an unfinished one resumes.
#
#   python -m data_pipeline prepare --config configs/data/amazon_beauty.yaml   # data/prepared/amazon_beauty
#   python -m data_pipeline prepare --config configs/data/ml1m.yaml            # data/prepared/ml1m
#   bash benchmarks/lineage_results.sh [RUNS_DIR] [BEAUTY_DIR] [ML1M_RUNS_DIR] [ML1M_DIR]
#
# RUNS_DIR (default runs/lineage) gets the Beauty runs and the item-ID tables they need; the ML-1M runs
# go to ML1M_RUNS_DIR (default runs/ml1m_ts, shared with benchmarks/ml1m_results.sh, whose SASRec and
# HSTU runs are the ML-1M table's other rows). Seed 42 everywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-runs/lineage}
BEAUTY=${2:-data/prepared/amazon_beauty}
ML1M_RUNS=${3:-runs/ml1m_ts}
ML1M=${4:-data/prepared/ml1m}
mkdir -p "$RUNS" "$ML1M_RUNS"
source benchmarks/run_queue.sh
BINARY="loss.function=binary loss.negatives=per_position loss.num_negatives=1"  # SASRec's own loss

# --- Amazon Beauty (the TIGER paper's protocol: select on valid, test once)
run_beauty() { run "$@" data.dir="$BEAUTY" run.seed=42; }
run_beauty sasrec_beauty configs/sasrec_beauty.yaml
run_beauty hstu_beauty configs/hstu_beauty.yaml
run_beauty gru4rec_beauty configs/gru4rec_beauty.yaml
run_beauty bert4rec_beauty configs/bert4rec_beauty.yaml
run_beauty sasrec_binary_beauty configs/sasrec_beauty.yaml $BINARY

# Item embeddings composed from codes: published semantic IDs, random codes (the control).
SID_REF=$RUNS/semantic_ids_reference
SID_RANDOM=$RUNS/semantic_ids_random
REF_JSON=../shared/data/amazon-beauty/reference_semantic_ids.json
[[ -f $SID_REF/manifest.json ]] ||
  "$PY" -m data_pipeline semantic-ids-reference --input "$REF_JSON" --output "$SID_REF" --prepared "$BEAUTY"
[[ -f $SID_RANDOM/manifest.json ]] ||
  "$PY" -m data_pipeline semantic-ids-random --prepared "$BEAUTY" --output "$SID_RANDOM" --seed 0
SID="model.item_embedding=semantic_ids model.semantic_ids_dir"
run_beauty hstu_sid_reference_beauty configs/hstu_beauty.yaml $SID="$SID_REF"
run_beauty hstu_sid_random_beauty configs/hstu_beauty.yaml $SID="$SID_RANDOM"

# Cold start: 5% of the items held out of training (test users whose target is one: test/cold/*).
COLD=$RUNS/prepared_beauty_cold
[[ -f $COLD/manifest.json ]] ||
  "$PY" -m data_pipeline prepare --config configs/data/amazon_beauty.yaml output.dir="$COLD" \
    split.cold_items_fraction=0.05
run_cold() { run "$@" data.dir="$COLD" run.seed=42; }
run_cold hstu_cold_beauty configs/hstu_beauty.yaml
run_cold hstu_sid_reference_cold_beauty configs/hstu_beauty.yaml $SID="$SID_REF"
run_cold hstu_sid_random_cold_beauty configs/hstu_beauty.yaml $SID="$SID_RANDOM"

# --- Yelp (S3-Rec's copy, titles and categories as item text, no timestamps): SASRec, HSTU and HSTU
# over our semantic IDs, with the Beauty settings.
YELP=$RUNS/prepared_yelp
[[ -f $YELP/manifest.json ]] ||
  "$PY" -m data_pipeline prepare --config configs/data/yelp.yaml output.dir="$YELP"
run_yelp() { run "$@" data.dir="$YELP" run.seed=42 tracking.experiment=yelp; }
run_yelp sasrec_yelp configs/sasrec_beauty.yaml
run_yelp hstu_yelp configs/hstu_beauty.yaml
SID_YELP=$RUNS/semantic_ids_yelp
[[ -f $SID_YELP/semantic_ids/manifest.json ]] ||
  "$PY" -m data_pipeline semantic-ids --config configs/data/yelp_semantic_ids.yaml \
    data_dir="$YELP" output_dir="$SID_YELP" tracking.tracking_uri="sqlite:///$RUNS/mlflow.db"
run_yelp hstu_sid_ours_yelp configs/hstu_beauty.yaml $SID="$SID_YELP/semantic_ids"

# Our own semantic IDs from the item text (python -m data_pipeline semantic-ids, ~20 CPU-minutes).
SID_OURS=$RUNS/semantic_ids_ours
[[ -f $SID_OURS/semantic_ids/manifest.json ]] ||
  "$PY" -m data_pipeline semantic-ids --config configs/data/beauty_semantic_ids.yaml \
    data_dir="$BEAUTY" output_dir="$SID_OURS" tracking.tracking_uri="sqlite:///$RUNS/mlflow.db"
run_beauty hstu_sid_ours_beauty configs/hstu_beauty.yaml $SID="$SID_OURS/semantic_ids"
run_cold hstu_sid_ours_cold_beauty configs/hstu_beauty.yaml $SID="$SID_OURS/semantic_ids"

# --- ML-1M (the HSTU repository's protocol, timestamped ratings.dat)
RUNS=$ML1M_RUNS
run_ml1m() { run "$@" data.dir="$ML1M" run.seed=42; }
run_ml1m sasrec_s42 configs/sasrec_ml1m.yaml
run_ml1m gru4rec_s42 configs/gru4rec_ml1m.yaml
run_ml1m sasrec_binary_s42 configs/sasrec_ml1m.yaml $BINARY
run_ml1m bert4rec_s42 configs/bert4rec_ml1m.yaml
