#!/usr/bin/env bash
# Downloads, here, the wheels the GPU machine lacks (Python 3.12, x86-64; its image already holds jax[cuda], flax,
# optax, orbax, tensorstore, torch, scipy, ...: see /work/.library/device/KINDS.md) into .whl/, which .gitignore
# keeps out of git and `carry` takes along (64 MiB a call). Then scripts/gpu_bench.sh installs them there.
#   bash scripts/gpu_wheels.sh medseg   # .whl/medseg: the medseg-jax runtime + MONAI (~25 MB): every benchmark but
#                                       # bench_vs_nnunet
#   bash scripts/gpu_wheels.sh nnunet   # .whl/nnunet: nnU-Net v2 and its helpers, without SimpleITK (51 MB alone, over
#                                       # the carry limit with the rest; nnU-Net reads NIfTI with NibabelIO there)
# Carry one group per call (`carry: [".whl/medseg"]`): both together are over the 64 MiB a call takes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64"
# medseg-jax's own dependencies that the image lacks, and theirs (pure Python unless noted)
RUNTIME="nibabel==5.3.3 ml_collections==1.1.0 grain==0.2.15 array-record==0.8.3 dm-tree==0.1.9 tensorboardX==2.6.4
  pydicom==3.0.2 submitit==1.5.4 connected-components-3d==3.26.1 highdicom==0.28.2 pyjpegls==1.5.1
  monai==1.6.1 dynamic_network_architectures==0.4.4"
NNUNET="nnunetv2==2.8.1 acvl-utils==0.2.6 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 blosc2==4.15.0
  ndindex==1.10.1 py-cpuinfo==9.0.0 unittest2==1.1.0 linecache2==1.0.0 traceback2==1.4.0 numexpr==2.14.1
  fft-conv-pytorch==1.2.0 nibabel==5.3.3 ml_collections==1.1.0 grain==0.2.15 array-record==0.8.3 dm-tree==0.1.9
  tensorboardX==2.6.4 pydicom==3.0.2 connected-components-3d==3.26.1 dynamic_network_architectures==0.4.4"
GROUP=${1:-medseg}
case "$GROUP" in
  medseg) WANTED="$RUNTIME" ;;
  nnunet) WANTED="$NNUNET" ;;
  *) echo "usage: $0 medseg|nnunet" >&2; exit 2 ;;
esac
DEST=.whl/$GROUP
mkdir -p "$DEST"
for spec in $WANTED; do
  # binary wheels for cp312 where the package has them, else the pure-Python wheel
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLATFORMS \
    -d "$DEST" "$spec" 2>/dev/null || $PY -m pip download -q --no-deps -d "$DEST" "$spec"
done
du -sh "$DEST"
