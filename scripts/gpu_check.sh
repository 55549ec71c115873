#!/usr/bin/env bash
# The GPU checks of issue 17 as one prepared script, in two halves:
#
#   here (a CPU machine, ~15 min on 2 cores):  bash scripts/gpu_check.sh prepare
#       builds the CUDA wheel of ferrovlm (README "CUDA build": nvcc 13.0 from PyPI in $CUDA_VENV) and downloads
#       the wheels the GPU machine lacks (TRL and datasets, for bench/bench_sft.py's TRL side) into .gpu_carry/
#   there (the lent GPU machine, through the device tool, ~5 min):
#       run(command="bash scripts/gpu_check.sh run", carry=[".gpu_carry"], timeout_s=540)
#       installs them without a network, then runs tests/test_cuda.py (forward, generation, 3-step SFT and DPO
#       on cuda:0 against the CPU, 1e-4 in f32) and bench/bench_sft.py --device cuda (samples/s and peak GPU
#       memory against TRL + PEFT on the same GPU); logs and the benchmark's JSON land in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.gpu_carry
case "${1:-}" in
prepare)
  CUDA_VENV=${CUDA_VENV:-$HOME/cudaenv}
  # The GPU machine's driver is CUDA 13.0: nvcc, and NVVM which writes the PTX, must not be newer (a 13.5 NVVM
  # writes PTX 9.5, which the 13.0 ptxas and driver refuse).
  [ -x "$CUDA_VENV/bin/pip" ] || python3 -m venv "$CUDA_VENV"
  "$CUDA_VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
    "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.0.85"
  CUDA_ROOT=$(ls -d "$CUDA_VENV"/lib/python3*/site-packages/nvidia/cu13)
  export CUDA_ROOT CUDA_PATH=$CUDA_ROOT NVCC=$CUDA_ROOT/bin/nvcc PATH=$CUDA_ROOT/bin:$PATH CUDA_COMPUTE_CAP=90
  # candle-kernels links -lcudart: the wheel of nvidia-cuda-runtime has only libcudart.so.13
  ln -sf libcudart.so.13 "$CUDA_ROOT/lib/libcudart.so"
  export LIBRARY_PATH=$CUDA_ROOT/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
  [ -x .venv/bin/maturin ] || { python3 -m venv .venv && .venv/bin/pip install -q maturin; }
  rm -rf "$CARRY" && mkdir -p "$CARRY/wheels"
  .venv/bin/maturin build --release --features python,cuda --compatibility linux -i .venv/bin/python -o "$CARRY/wheels"
  # pure-Python wheels for the GPU machine's Python 3.12 (multiprocess has one per Python version)
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$CARRY/wheels" \
    trl datasets dill multiprocess
  ls -la "$CARRY/wheels"; du -sh "$CARRY"
  ;;
run)
  OUT=${OUT:-/tmp/gpu_check_out}; mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
  # --no-deps: everything else they need is on the image (torch, transformers, peft, accelerate, pyarrow, ...)
  python3 -m pip install -q --no-index --no-deps "$CARRY"/wheels/*.whl
  # cudarc opens libcuda (the driver) and cuBLAS / cuRAND / NVRTC 13 at run time: the image's torch has them.
  LIBS=$(python3 -c "import glob, os, site; print(':'.join(sorted({os.path.dirname(p) for d in site.getsitepackages() for p in glob.glob(d + '/nvidia/**/lib*.so*', recursive=True)})))")
  export LD_LIBRARY_PATH=${LIBS}:${LD_LIBRARY_PATH:-}
  python3 -c "import ferrovlm; from ferrovlm import _core; print('cuda built', _core.cuda_built(), 'available', _core.cuda_available(), _core.resolve_device('auto'))" 2>&1 | tee "$OUT/device.txt"
  set +e
  python3 -m pytest -q -s -rs tests/test_cuda.py tests/test_device.py 2>&1 | tee "$OUT/test_cuda.log"
  tests=${PIPESTATUS[0]}
  timeout 300 python3 bench/bench_sft.py --device cuda --steps 4 --out "$OUT/sft_cuda.json" 2>&1 | tee "$OUT/bench_sft.log"
  bench=${PIPESTATUS[0]}
  echo "tests exit $tests, bench exit $bench"
  exit $(( tests != 0 || bench != 0 ))
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh prepare   (here)  |  bash scripts/gpu_check.sh run   (on the GPU machine)" >&2
  exit 2
  ;;
esac
