#!/bin/bash
# Preemptible StepSearch training on SLURM: checkpoint at the PPO-iteration boundary on SIGTERM
# (preemption) or SIGUSR1 (5 minutes before the time limit), requeue, resume into the same run.
#
#   mkdir -p runs/slurm && sbatch experiments/slurm_fit.sh             # the 3B recipe, seed 0
#   CONFIG=configs/grpo.yaml SEED=2 sbatch experiments/slurm_fit.sh --trainer.max_steps 500
#   TRAINER=configs/trainer/ddp.yaml sbatch experiments/slurm_fit.sh   # another trainer preset
#
# Every start runs the same command with `--ckpt_path auto`: the first starts the run, a requeued
# one resumes it from its run directory ({trainer.default_root_dir}/{config}-{algorithm}-seed{S}),
# in the same MLflow run. See docs/resume.md.
#SBATCH --job-name=stepsearch
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@300
#SBATCH --open-mode=append
#SBATCH --output=runs/slurm/%x-%j.out

set -euo pipefail
CONFIG=${CONFIG:-configs/stepsearch_qwen2.5_3b.yaml}
SEED=${SEED:-0}
TRAINER=${TRAINER:-}   # empty: the config's own trainer settings
PYTHON=${PYTHON:-.venv/bin/python}
echo "start ${SLURM_RESTART_COUNT:-0} of job ${SLURM_JOB_ID:-?}: $CONFIG seed $SEED $*"

# srun forwards SIGTERM/SIGUSR1 to every rank; each rank's handler only sets a flag, and all ranks
# agree at the next iteration boundary, save one checkpoint, and rank 0 calls `scontrol requeue`
# (SLURMEnvironment(auto_requeue=True), Lightning's default under SLURM). The exit code is then
# 128 + the signal (143 / 138); a finished run exits 0.
srun --kill-on-bad-exit=1 "$PYTHON" -m stepsearch fit --config "$CONFIG" ${TRAINER:+--trainer "$TRAINER"} \
    --trainer.num_nodes "${SLURM_NNODES:-1}" --trainer.devices "${SLURM_NTASKS_PER_NODE:-8}" \
    --seed "$SEED" --ckpt_path auto "$@"
