#!/usr/bin/env bash
# Does StePPO teach a real LM to search? SmolLM2-135M-Instruct (configs/smollm2_musique.yaml): StePPO
# and the global-reward PPO baseline with the same budget from the same warm-start (side by side by
# default); then `compare` and `evaluate` (direct / rag / agent on HotpotQA, Bamboogle and NQ samples,
# before and after training); curves: experiments/smollm2_curves.py. Results: docs/experiments.md.
#
#   bash experiments/smollm2_steppo_vs_ppo.sh [OUT]      # OUT defaults to runs/smollm2_exp
#
# Environment: ITERATIONS (2) of BATCH (4) questions, VAL (10 HotpotQA questions at step 0 and at the
# end), SAMPLE (10 questions per benchmark in the table), PARALLEL (1: the two runs side by side, one thread each; 0:
# one after the other), PYTHON (.venv/bin/python), STAGES ("fit compare evaluate").
# The code is copied to OUT/src first, so editing the working tree meanwhile does not change the runs.
set -euo pipefail
OUT=${1:-runs/smollm2_exp}
ITERATIONS=${ITERATIONS:-2}
VAL=${VAL:-10}
BATCH=${BATCH:-4}
PARALLEL=${PARALLEL:-1}
SAMPLE=${SAMPLE:-10}
PYTHON=${PYTHON:-.venv/bin/python}
STAGES=${STAGES:-"fit compare evaluate"}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 STEPSEARCH_PROGRESS_EVERY=60
[ -d "$OUT/src" ] || cp -r src "$OUT/src"
export PYTHONPATH="$OUT/src${PYTHONPATH:+:$PYTHONPATH}"
MODEL=runs/models/smollm2-135m-instruct
if [ ! -f "$MODEL/config.json" ]; then  # the conversion the config's header names (once, ~3 min)
  "$PYTHON" -c "from stepsearch.models.pretrained import convert_gguf, smollm2_gguf; convert_gguf(smollm2_gguf(), '$MODEL')"
fi
common=(--config configs/smollm2_musique.yaml --trainer.max_steps "$ITERATIONS" --trainer.val_check_interval "$ITERATIONS"
        --data.max_val_examples "$VAL" --data.batch_size "$BATCH" --model.ppo.mini_batch_size "$BATCH"
        --trainer.default_root_dir "$OUT")
if [[ " $STAGES " == *" fit "* ]]; then
  # Create the store's tables once: two runs creating a new sqlite store at the same time race on its migration.
  "$PYTHON" -c "import mlflow; mlflow.MlflowClient('$MLFLOW_TRACKING_URI').search_experiments()" > /dev/null 2>&1
  for algorithm in steppo ppo; do  # side by side (PARALLEL=1, default) or one after the other (PARALLEL=0)
    (start=$(date +%s)
     "$PYTHON" -m stepsearch fit "${common[@]}" --model.ppo.algorithm "$algorithm" > "$OUT/logs/fit-$algorithm.log" 2>&1
     echo "fit $algorithm: $(( $(date +%s) - start )) s" | tee -a "$OUT/logs/times.txt") &
    [ "$PARALLEL" = 1 ] || wait
  done
  wait
fi
if [[ " $STAGES " == *" compare "* ]]; then
  "$PYTHON" -m stepsearch compare --experiment smollm2-musique --out "$OUT/compare" > "$OUT/logs/compare.log" 2>&1 || true
fi
if [[ " $STAGES " == *" evaluate "* ]]; then
  policies=$(ls -d "$OUT"/*/policy 2>/dev/null | tr '\n' ' ')
  models="smollm2: $MODEL, sft: runs/smollm2/seed0/sft"
  for p in $policies; do models="$models, $(basename "$(dirname "$p")"): $p"; done
  cat > "$OUT/suite.yaml" <<EOF
benchmarks:
  hotpotqa: /work/shared/data/raw/hotpot_dev_distractor_sample.json
  bamboogle: /work/shared/data/raw/bamboogle_test.jsonl
  nq: /work/shared/data/raw/nq_test_sample.jsonl
index: runs/smollm2/index_bm25
models: {$models}
methods: [direct, rag, agent]
sample: $SAMPLE
seed: 630
batch_size: 30
output_dir: $OUT/eval
experiment: smollm2-eval
rollout: {template: think, max_turns: 2, max_response_tokens: 64, max_observation_tokens: 192, max_context_tokens: 640, top_k: 2}
EOF
  start=$(date +%s)
  "$PYTHON" -m stepsearch evaluate --suite "$OUT/suite.yaml" > "$OUT/logs/evaluate.log" 2>&1
  echo "evaluate: $(( $(date +%s) - start )) s" | tee -a "$OUT/logs/times.txt"
fi
