#!/usr/bin/env bash
# Launch titanlm: one node, several nodes, or under Slurm. Extra arguments are config overrides.
#
#   NGPU=8 scripts/run_train.sh --training.steps 100          # one node, 8 processes
#   NGPU=2 scripts/run_train.sh                               # CPU machine: 2 gloo processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 NGPU=8 scripts/run_train.sh   # per node, by hand
#   srun -N 4 --ntasks-per-node=1 --gpus-per-task=8 scripts/run_train.sh # Slurm, torchrun per node
#   srun -N 4 -n 32 --ntasks-per-node=8 --gpus-per-task=1 scripts/run_train.sh  # Slurm, a task per GPU
#
# Variables: NGPU (processes per node; default: visible GPUs, else 1), CONFIG_FILE (default the
# debug config), LOG_RANK (ranks whose output is shown, default 0), MASTER_PORT (default 29500); for
# several nodes by hand NNODES, NODE_RANK (0 to NNODES - 1) and MASTER_ADDR (node 0's host).
#
# Relative paths, in CONFIG_FILE and in the arguments, mean what they mean where the command is typed.
# torchrun runs inside titanlm.launch, which relays SIGTERM, SIGUSR1 and Ctrl-C to the ranks (they save
# and stop) and exits 0 (130 after Ctrl-C), 2 after a user error, else the failed rank's code.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
CONFIG_FILE=${CONFIG_FILE:-$REPO/train_configs/debug_model.toml}
LOG_RANK=${LOG_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-python}

fail() { echo "error: $*" >&2; exit 2; }  # a user's mistake: one line and the trainer's exit code

if [[ -z ${NGPU:-} ]]; then
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ $NGPU -ge 1 ]] || NGPU=1
fi
[[ $NGPU =~ ^[1-9][0-9]*$ ]] || fail "NGPU=$NGPU is not a number of processes per node (1 or more)"

if [[ -n ${SLURM_JOB_ID:-} && -n ${SLURM_PROCID:-} ]]; then
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  tasks_per_node=$(( ${SLURM_NTASKS:-1} / ${SLURM_NNODES:-1} ))
  if [[ $tasks_per_node -gt 1 ]]; then
    # One Slurm task per GPU: Slurm already made the processes, so no torchrun.
    export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
    export LOCAL_WORLD_SIZE=$tasks_per_node MASTER_ADDR MASTER_PORT
    if [[ $RANK -ne $LOG_RANK ]]; then exec >/dev/null; fi
    exec "$PYTHON" -m titanlm.train --job.config_file "$CONFIG_FILE" "$@"
  fi
  NNODES=${SLURM_NNODES:-1}
  NODE_RANK=${SLURM_NODEID:-0}
fi

NNODES=${NNODES:-1}
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || fail "NNODES=$NNODES is not a number of nodes (1 or more)"
if [[ $NNODES -gt 1 ]]; then
  last=$((NNODES - 1))
  [[ -n ${NODE_RANK:-} ]] || fail "NNODES=$NNODES needs NODE_RANK, this node's number from 0 to $last, one per node"
  [[ $NODE_RANK =~ ^(0|[1-9][0-9]*)$ && $NODE_RANK -le $last ]] ||
    fail "NODE_RANK=$NODE_RANK is not from 0 to $last (NNODES=$NNODES)"
  [[ -n ${MASTER_ADDR:-} ]] || fail "NNODES=$NNODES needs MASTER_ADDR, the host of node 0, the same on every node"
  rendezvous=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
else
  rendezvous=(--standalone)
fi

exec "$PYTHON" -m titanlm.launch --nproc_per_node "$NGPU" "${rendezvous[@]}" \
  --local-ranks-filter "$LOG_RANK" --role rank --tee 3 \
  -m titanlm.train --job.config_file "$CONFIG_FILE" "$@"
