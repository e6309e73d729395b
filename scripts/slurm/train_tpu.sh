#!/bin/bash
# medseg-jax on a Cloud TPU VM slice (e.g. v5p-32: 4 hosts x 4 chips). Run the same command on every host:
#
#   gcloud compute tpus tpu-vm ssh my-slice --worker=all --command \
#     "cd medseg-jax && scripts/slurm/train_tpu.sh experiments/my_task.py gs-or-nfs/runs/my_task --mesh data=4,space=4"
#
# --distributed lets jax.distributed.initialize() read the slice's topology from the TPU metadata. The run directory
# and store must be on storage every host sees (NFS/Filestore, or a GCS bucket mounted with gcsfuse).
set -euo pipefail
EXPERIMENT=${1:?usage: train_tpu.sh EXPERIMENT_FILE RUN_DIR [medseg train args]}
RUN_DIR=${2:?}
shift 2
source .venv/bin/activate   # `make install` plus `pip install -U "jax[tpu]"` on each host
RESUME=()
if [ -d "${RUN_DIR}/checkpoints/latest" ]; then
  RESUME=(--resume)
fi
exec medseg train --config "${EXPERIMENT}" --workdir "${RUN_DIR}" --distributed "${RESUME[@]}" "$@"
