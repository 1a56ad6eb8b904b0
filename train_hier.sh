#!/usr/bin/env bash
# Train the paper's model (dinov2/configs/train/hier_vitl14.yaml: DinoBloom-L start, ViT-L/14, HCE) on
# one node with 4 GPUs, one task per GPU, under SLURM. Run from the repository root:
#
#   mkdir -p logs && sbatch train_hier.sh
#
# Resources: sbatch options on the command line override the #SBATCH lines below.
# Settings: read from the environment, which sbatch passes on (--export=ALL,NAME=value,...):
#   CONFIG        run config (default dinov2/configs/train/hier_vitl14.yaml)
#   OUTPUT_DIR    checkpoints, metrics and the exported model; a job that finds a checkpoint
#                 there resumes from it (default output/hier_vitl14)
#   EXTRA         dotted config overrides, separated by spaces (e.g. "train.batch_size_per_gpu=32")
#   PYTHON        interpreter (default .venv/bin/python when the repository has one, else python3)
#   MAX_REQUEUES  how often a pre-empted job requeues itself before giving up (default 50)
#
# The same script on CPUs, with the demo config and 2 processes (gloo, FSDP2):
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 --time=30 \
#       --export=ALL,CONFIG=dinov2/configs/train/demo.yaml,OUTPUT_DIR=output/demo train_hier.sh
# (--export splits at commas: pass an EXTRA such as "crops.local_crops_scale=[0.05,0.32]" through
# the environment instead, `EXTRA=... sbatch ...`.)
#
# Pre-emption and time limits: SLURM sends SIGUSR1 to every training task 120 s before the time
# limit (--signal below; `scancel --signal=USR1 JOBID` does the same by hand) and SIGTERM when it
# pre-empts, requeues or cancels the job. The trainer then writes a checkpoint and exits with
# code 75; this script answers 75 with `scontrol requeue` while the job is still RUNNING, and the
# requeued job (same job id, same OUTPUT_DIR) resumes from the checkpoint. After `scancel` (and
# after `scontrol requeue` or a pre-emption, which requeue the job themselves) the job is already
# COMPLETING: it keeps its checkpoint and is not requeued from here.
#
#SBATCH --job-name=dino_hier
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=72:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# sbatch runs a copy of this file; the submit directory is the repository.
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"

CONFIG=${CONFIG:-dinov2/configs/train/hier_vitl14.yaml}
OUTPUT_DIR=${OUTPUT_DIR:-output/hier_vitl14}
EXTRA=${EXTRA:-}
MAX_REQUEUES=${MAX_REQUEUES:-50}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
read -r -a overrides <<<"$EXTRA"

# Rendezvous: rank 0 runs on the job's first host; the port follows the job id and the restart
# count, so that concurrent jobs and a requeued job do not collide on one port.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((20000 + (SLURM_JOB_ID % 1000) * 20 + ${SLURM_RESTART_COUNT:-0} % 20))
export MASTER_ADDR MASTER_PORT

echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:" \
    "$SLURM_NTASKS tasks, rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "config $CONFIG, output $OUTPUT_DIR, overrides: ${overrides[*]:-none}"

# One task per GPU. The trainer takes its rank, world size and local rank from SLURM_PROCID,
# SLURM_NTASKS and SLURM_LOCALID (dinov2/distributed); torchrun's variables, if the submitting
# shell passed them on, would take precedence, so they go.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
# srun runs in the background so that this shell can pass on a signal sent only to it
# (`scancel --batch --signal=...`); srun forwards it to every task. srun no longer inherits
# --cpus-per-task from sbatch since SLURM 22.05: it is passed on explicitly.
# --kill-on-bad-exit=1: when a task fails (out of GPU memory, say), srun ends the others at once
# (SIGTERM, then SIGKILL after the cluster's KillWait) instead of leaving them waiting in a
# collective until train.collective_timeout_s. After a pre-emption every task exits 75, and the
# first to exit makes srun send SIGTERM to the others while they shut down: each task starts with
# SIGTERM ignored (`trap '' TERM`, inherited through exec) so that a task that has written its
# checkpoint still exits 75, not 143. While it trains, the trainer's own handler takes SIGTERM
# (checkpoint, exit 75) and puts the ignored state back when it returns.
srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
    bash -c 'trap "" TERM; exec "$@"' trainer \
    "$PYTHON" -m dinov2.train.train --config-file "$CONFIG" --output-dir "$OUTPUT_DIR" \
    ${overrides[@]+"${overrides[@]}"} &
srun_pid=$!
trap 'kill -s USR1 "$srun_pid" 2>/dev/null || true' USR1
trap 'kill -s TERM "$srun_pid" 2>/dev/null || true' TERM
# `wait` returns early when a trapped signal arrives: wait again until srun has ended.
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid" || true; done
status=0
wait "$srun_pid" || status=$?

# 75: the trainer was signalled and wrote a checkpoint. Requeue unless SLURM is already ending the
# job (COMPLETING: cancelled, or requeued by `scontrol requeue` or by pre-emption, which requeues
# it without our help).
if [ "$status" -eq 75 ]; then
    state=$(scontrol show job -o "$SLURM_JOB_ID" | grep -o 'JobState=[A-Z_]*' || true)
    if [ "$state" != JobState=RUNNING ]; then
        echo "stopped with a checkpoint in $OUTPUT_DIR; ${state:-job state unknown}: not requeueing here"
        exit 75
    fi
    if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
        echo "stopped with a checkpoint in $OUTPUT_DIR after $MAX_REQUEUES requeues (MAX_REQUEUES): not requeueing" >&2
        exit 75
    fi
    echo "pre-empted: checkpoint written to $OUTPUT_DIR; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
