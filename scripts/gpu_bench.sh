#!/usr/bin/env bash
# The benchmarks at GPU sizes, in one command on the device machine (repo root), each writing a JSON named by device:
#   here:   bash scripts/gpu_wheels.sh medseg            (once; and `nnunet` for the second group)
#   there:  bash scripts/gpu_bench.sh medseg "$OUT"       with carry [".whl/medseg"]   (~8 min on an H200)
#           bash scripts/gpu_bench.sh nnunet "$OUT"       with carry [".whl/nnunet"]
# Then copy the JSONs from the returned files into docs/ and the figures into BENCHMARKS.md.
# `--tiny` as the third argument runs every benchmark at its test size (CPU too: tests/test_gpu_bench.py).
set -uo pipefail
GROUP=${1:-medseg}
OUT=${2:-docs}
TINY=${3:-}
mkdir -p "$OUT"
# PYTHON=... (a venv with everything, e.g. here: tests/test_gpu_bench.py) skips the carried wheels; on the device
# machine its python3 gets them.
if [[ -z "${PYTHON:-}" ]] && compgen -G ".whl/$GROUP/*" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation --upgrade \
    --target /tmp/site .whl/"$GROUP"/* || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
DEVICE=$($PY -c "import jax; print(jax.default_backend())")
echo "# $(date -u '+%F %H:%M UTC') $(hostname) device=$DEVICE group=$GROUP"
$PY -c "import jax; print(jax.devices())"
failed=0
run() {  # one benchmark: its name, then its command; a failure is reported and the others still run
  local name=$1; shift
  echo "## $name: $*"
  local started=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local code=$?
  tail -n 25 "$OUT/$name.log"
  echo "## $name: exit $code after $((SECONDS - started)) s"
  [[ $code == 0 ]] || failed=1
}
if [[ $GROUP == medseg ]]; then
  if [[ -n $TINY ]]; then
    run bench_models $PY scripts/bench_models.py --patch 32 --batch 1 --steps 1 --only plain_unet \
      --out "$OUT/bench_models_$DEVICE.json"
    run bench_memory $PY scripts/bench_memory.py --patches 32 --spaces 1 --no-search \
      --out "$OUT/bench_memory_$DEVICE.json"
    run bench_augment $PY scripts/bench_augment.py --patch 32 --batch 1 --seconds 1 --repeats 1 \
      --out "$OUT/bench_augment_$DEVICE.json"
    run bench_infer $PY scripts/bench_infer.py --tiny --out "$OUT/bench_infer_$DEVICE.json"
  else
    run bench_models $PY scripts/bench_models.py --patch 128 --batch 2 --steps 5 --out "$OUT/bench_models_$DEVICE.json"
    run bench_memory $PY scripts/bench_memory.py --out "$OUT/bench_memory_$DEVICE.json"
    run bench_augment $PY scripts/bench_augment.py --patch 128 --batch 2 --out "$OUT/bench_augment_$DEVICE.json"
    run bench_infer $PY scripts/bench_infer.py --shape 512,512,256 --patch 128,128,128 --filters 16 --batch 4 \
      --out "$OUT/bench_infer_$DEVICE.json"
  fi
else
  if [[ -n $TINY ]]; then
    run bench_vs_nnunet $PY scripts/bench_vs_nnunet.py --tiny --out "$OUT/bench_vs_nnunet_$DEVICE.json"
  else
    run bench_vs_nnunet $PY scripts/bench_vs_nnunet.py --patch 128,128,128 --batch 2 --features 32,64,128,256,320,320 \
      --budget-seconds 240 --device cuda --out "$OUT/bench_vs_nnunet_$DEVICE.json"
  fi
fi
exit $failed
