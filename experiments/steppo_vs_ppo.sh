#!/usr/bin/env bash
# StePPO vs PPO (global reward, Search-R1) vs GRPO: 3 seeds each, one shared warm-start, same budget,
# on a synthetic world of 2–4-hop questions; then `stepsearch compare` writes the table and the PNG.
#
#   bash experiments/steppo_vs_ppo.sh [OUT]        # OUT defaults to runs/steppo_vs_ppo
#
# Environment: ITERATIONS (20), VAL_EVERY (10), SEEDS ("0 1 2"), ALGORITHMS ("steppo ppo grpo"),
# PARALLEL (2 runs at once, 1 thread each), EXPERIMENT (steppo_vs_ppo), PYTHON (python),
# MLFLOW_TRACKING_URI (default sqlite:///OUT/mlflow.db). The code is copied to OUT/src first, so
# editing the working tree while the experiment runs does not change it.
set -euo pipefail
OUT=${1:-runs/steppo_vs_ppo}
ITERATIONS=${ITERATIONS:-20}
VAL_EVERY=${VAL_EVERY:-10}
SEEDS=${SEEDS:-"0 1 2"}
ALGORITHMS=${ALGORITHMS:-"steppo ppo grpo"}
PARALLEL=${PARALLEL:-2}
EXPERIMENT=${EXPERIMENT:-steppo_vs_ppo}
PYTHON=${PYTHON:-python}
CONFIG=experiments/steppo_vs_ppo.yaml

mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ -z "${KEEP_SRC:-}" ] || [ ! -d "$OUT/src" ]; then  # KEEP_SRC=1: reuse the snapshot already there
  rm -rf "$OUT/src" && cp -r src "$OUT/src"
fi
cp "$CONFIG" "$OUT/config.yaml"
export PYTHONPATH="$OUT/src${PYTHONPATH:+:$PYTHONPATH}"

paths=(--config "$OUT/config.yaml" --data.world_dir "$OUT/world" --model.model.name_or_path "$OUT/sft"
       --model.bootstrap.tiny.out_dir "$OUT/tiny"
       --model.bootstrap.tiny.corpus_files "[$OUT/world/corpus.jsonl,$OUT/world/train.jsonl]"
       --model.bootstrap.warm_start.data "[$OUT/world/train.jsonl]"
       --trainer.logger.init_args.experiment_name "$EXPERIMENT")
start=$(date +%s)

# 1. The shared bootstrap: world, BM25 index, tiny model, warm-start (a 1-iteration fit in its own
#    MLflow experiment; its PPO iteration is thrown away).
if [ ! -f "$OUT/sft/warm_start.json" ]; then
  echo "[$(date +%T)] bootstrap (world, index, tiny model, warm-start) -> $OUT/logs/bootstrap.log"
  $PYTHON -m stepsearch fit "${paths[@]}" --trainer.max_steps 1 --trainer.limit_val_batches 0 \
    --trainer.default_root_dir "$OUT/bootstrap" --trainer.logger.init_args.experiment_name "$EXPERIMENT-bootstrap" \
    > "$OUT/logs/bootstrap.log" 2>&1
fi
# 2. PPO trains on the 2–4-hop questions only (the 1-hop ones were for the warm-start).
$PYTHON - "$OUT/world/train.jsonl" "$OUT/world/train_2to4.jsonl" <<'PY'
import sys
from stepsearch.data.sources import load_examples, write_examples
examples = [ex for ex in load_examples(sys.argv[1]) if ex.num_hops >= 2]
write_examples(examples, sys.argv[2])
print(f"PPO training set: {len(examples)} questions of 2-4 hops")
PY

# 3. The runs, PARALLEL at a time.
run_one() {
  local algorithm=$1 seed=$2 extra=()
  [ "$algorithm" = grpo ] && extra=(--data.batch_size 8)   # × grpo_group_size 4 = 32 trajectories
  local name="$algorithm-seed$seed"
  echo "[$(date +%T)] start $name"
  if $PYTHON -m stepsearch fit "${paths[@]}" --model.bootstrap null --data.world null \
      --data.train "$OUT/world/train_2to4.jsonl" --data.val "$OUT/world/val.jsonl" \
      --data.retriever.index "$OUT/world/index_bm25" \
      --model.ppo.algorithm "$algorithm" --seed_everything "$seed" --model.seed "$seed" --data.seed "$seed" \
      --trainer.max_steps "$ITERATIONS" --trainer.val_check_interval "$VAL_EVERY" \
      --trainer.default_root_dir "$OUT/$name" "${extra[@]}" > "$OUT/logs/$name.log" 2>&1; then
    echo "[$(date +%T)] done  $name"
  else
    echo "[$(date +%T)] FAILED $name (see $OUT/logs/$name.log)"
  fi
}
jobs=()
for seed in $SEEDS; do for algorithm in $ALGORITHMS; do jobs+=("$algorithm $seed"); done; done
running=0
for job in "${jobs[@]}"; do
  run_one $job &
  running=$((running + 1))
  if [ "$running" -ge "$PARALLEL" ]; then wait -n; running=$((running - 1)); fi
done
wait
echo "[$(date +%T)] runs finished in $(( ($(date +%s) - start) / 60 )) min"

# 4. The comparison (live code: compare may be newer than the snapshot).
unset PYTHONPATH
$PYTHON -m stepsearch compare --experiment "$EXPERIMENT" --group-by tag.algorithm --out "$OUT/compare" \
  | tee "$OUT/logs/compare.log"
