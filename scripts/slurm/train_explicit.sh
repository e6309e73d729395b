#!/bin/bash
# Without a scheduler: start one process per host yourself and name process 0's address.
#
#   host0$ scripts/slurm/train_explicit.sh host0:12355 2 0 experiments/my_task.py runs/my_task --mesh data=2,space=8
#   host1$ scripts/slurm/train_explicit.sh host0:12355 2 1 experiments/my_task.py runs/my_task --mesh data=2,space=8
#
# Arguments: COORDINATOR(host:port of process 0) NUM_PROCESSES PROCESS_ID EXPERIMENT_FILE RUN_DIR [medseg train args].
# The same command on one machine with two CPU processes (gloo collectives) is what tests/test_multiprocess.py runs.
set -euo pipefail
COORDINATOR=${1:?usage: train_explicit.sh HOST:PORT NUM_PROCESSES PROCESS_ID EXPERIMENT_FILE RUN_DIR [args]}
NUM_PROCESSES=${2:?}
PROCESS_ID=${3:?}
EXPERIMENT=${4:?}
RUN_DIR=${5:?}
shift 5
exec medseg train --config "${EXPERIMENT}" --workdir "${RUN_DIR}" --coordinator "${COORDINATOR}" \
  --num-processes "${NUM_PROCESSES}" --process-id "${PROCESS_ID}" "$@"
